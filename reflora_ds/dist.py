"""The distributed world, in one place: who am I, collectives, launchers, and ZeRO-3 parameters.

Everything here works in a lone process too (rank 0 of a world of 1, the
collectives then do nothing), so callers never branch on "am I distributed".

ZeRO-3 partitions each parameter: ``param.data`` is an empty placeholder, the
real shape is ``param.ds_shape``, and reading the values needs a gather that
every rank joins.  ``is_partitioned``, ``full_shape`` and ``gathered`` are
the only places that know this.  (DeepSpeed's private optimizer internals
live in zero.py alone.)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import socket
import sys
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")


# --- who am I -------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def rank() -> int:
    return rank_and_world()[0]


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


# --- collectives (no-ops in a world of one) ----------------------------------------------------


def barrier() -> None:
    if rank_and_world()[1] > 1:
        tdist.barrier()


def all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    """Element-wise sum (or max) of a short list of numbers over all ranks, in fp64."""
    if rank_and_world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    parts: list = [None] * world
    tdist.all_gather_object(parts, obj)
    return parts


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def local_rank_zero_first(fn: Callable[[], T], device=None) -> T:
    """Run fn on each node's first rank, then on the others (which then read what it cached).

    If the first rank fails, the others still run fn and meet the same error
    rather than waiting forever at a collective.
    """
    first = local_rank() == 0
    result, error = None, None
    if first:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the others were told
            error = err
    if device is None:
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().current_device_name()
    all_reduce([float(error is not None)], device)
    if error is not None:
        raise error
    return result if first else fn()


# --- launchers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launcher_env() -> None:
    """Make ``deepspeed.init_distributed()`` work in a process no launcher started.

    Without the launcher's variables DeepSpeed falls back to MPI discovery,
    which fails without mpi4py; a lone process is rank 0 of a world of 1.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_from_launcher() -> None:
    """Join the process group a launcher (deepspeed, torchrun) describes; nothing to do for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        leave_gloo_group_at_exit()


@functools.cache  # one handler per process, however many runs it starts
def leave_gloo_group_at_exit() -> None:
    """Destroy a gloo process group when the interpreter exits, while Python is still whole (call after joining).

    Left to the interpreter's own teardown, gloo's worker threads may still hold
    the tensors of finished async collectives (ZeRO's reduce-scatters); freeing
    them then aborts the process with SIGABRT ("terminate called without an
    active exception"), and a launch whose every step succeeded fails.  NCCL
    groups are left alone: destroying one whose peer has died can block.
    """
    atexit.register(_destroy_gloo_group)


def _destroy_gloo_group() -> None:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_backend() == "gloo":
        tdist.destroy_process_group()


def start_deepspeed(backend: str | None = None) -> tuple[int, int]:
    """The DeepSpeed world of this process (launched or alone), its device set and no /dev/shm left: (rank, world).

    ``backend`` None lets DeepSpeed choose for the accelerator (gloo on CPU).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from .zero import release_shm_workspace  # DeepSpeed's internals live in zero.py (which imports this module)

    ensure_launcher_env()
    get_accelerator().set_device(local_rank())
    deepspeed.init_distributed(dist_backend=backend)
    leave_gloo_group_at_exit()
    release_shm_workspace()
    return rank_and_world()


# --- models inside engines, and ZeRO-3 parameters ------------------------------------------------


def unwrap(model):
    """The module inside a DeepSpeed engine (or DDP), else the model itself."""
    if "deepspeed" in sys.modules:
        from deepspeed import DeepSpeedEngine

        if isinstance(model, DeepSpeedEngine):
            return model.module
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def is_engine(model) -> bool:
    if "deepspeed" not in sys.modules:  # no engine can exist without it
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """Whether ZeRO-3 partitions this parameter (its data is then a placeholder)."""
    return hasattr(param, "ds_id")


def has_partitioned_params(model) -> bool:
    """Whether ZeRO-3 partitions the model (each forward is then a collective)."""
    return any(is_partitioned(p) for p in model.parameters())


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's real shape, also for a ZeRO-3 placeholder."""
    return tuple(getattr(param, "ds_shape", param.shape))


def gathered(params: Iterable[torch.nn.Parameter], only_released: bool = False):
    """A context in which every ZeRO-3 parameter of ``params`` is whole on every rank (a collective).

    ``only_released``: leave out parameters that are gathered already (below
    DeepSpeed's persistence threshold): passing them in would release them on
    exit and cost a gather at the next forward.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if only_released:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        partitioned = [p for p in partitioned if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not partitioned:
        return contextlib.nullcontext(partitioned)
    import deepspeed

    return _gathering(deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None), partitioned)


@contextlib.contextmanager
def _gathering(context, params):
    with context:
        yield params
