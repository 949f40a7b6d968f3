"""A LoRA method inside DeepSpeed ZeRO stages 0-3.

Where things live, and what this module does about it:

* Gradients: a tensor hook on each LoRA factor preconditions every
  micro-batch's *local* gradient before DeepSpeed accumulates, reduces and
  partitions it (identical in all stages).  The preconditioner is the same on
  every rank and the map is linear, so no gradient is ever gathered.
* Factors: the plan is made once per optimizer step, right after
  ``engine.step()``, from the full A and B.  Stages 0-2 hold them on every
  rank; under ZeRO-3 the LoRA factors (and only they) are gathered with
  ``GatheredParameters`` for that moment; ``comm_bytes`` counts what it costs.
* Weights and moments (RefLoRA-S, refactor): DeepSpeed keeps the fp32 master
  and the Adam moments in flat partitions.  They are edited at the
  accumulation boundary, before ``engine.step()``, whose own master → model
  copy then keeps the working (bf16) copy consistent.  RefLoRA-S's rescale is
  elementwise, so each rank edits only its own fragment; the refactor needs
  whole matrices and goes through DeepSpeed's full-tensor helpers.

Gradient clipping (``gradient_clipping`` in the DeepSpeed config) acts on the
reduced, already preconditioned gradient, as with ``optim.attach``.

    engine, *_ = deepspeed.initialize(model=peft_model, optimizer=opt, config=ds_config)
    method = ZeroRefLoRA(engine, MethodConfig("reflora", warmup=100))
    for batch in loader:
        engine.backward(engine(**batch).loss)
        method.step()                     # instead of engine.step()
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist
from torch import Tensor

from .lora_pairs import find_lora_pairs
from .methods import MethodConfig
from .stepper import LoraStepper, local_factors

MOMENTS = ("exp_avg", "exp_avg_sq")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_distributed_env() -> None:
    """Make ``deepspeed.init_distributed()`` work in a process no launcher started.

    Without the launcher's variables DeepSpeed falls back to MPI discovery,
    which fails without mpi4py; a lone process is rank 0 of a world of 1.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


class ZeroRefLoRA(LoraStepper):
    """A :class:`MethodConfig` running inside a DeepSpeed engine (ZeRO 0-3)."""

    def __init__(self, engine, method: MethodConfig):
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        if engine.fp16_enabled():
            raise ValueError("fp16 (loss scaling may skip steps) is not supported: use bf16 or fp32")
        if method.name == "reflora_s" and "betas" not in _client_optimizer(engine).defaults:
            raise TypeError("reflora_s rescales Adam moments (exp_avg, exp_avg_sq): use Adam/AdamW")
        self.comm_bytes = 0  # bytes of LoRA factors gathered for refactoring, all steps
        self.last_comm_bytes = 0
        super().__init__(find_lora_pairs(engine.module), method)
        self.refresh()

    def step(self) -> None:
        """``engine.step()`` with the method's boundary edits before and its plan after."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self.apply_weight_edits()
        self.engine.step()
        if boundary:
            self.after_step()

    # -- factors ------------------------------------------------------------------

    def _full_factors(self):
        if self.stage != 3:
            return local_factors(self.pairs)
        return self._gathered_factors()

    @contextlib.contextmanager
    def _gathered_factors(self):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus

        params = [q for pair in self.pairs for q in (pair.A, pair.B)]
        # Factors below stage3_param_persistence_threshold stay gathered; passing
        # them in would re-partition them on exit and cost a gather next forward.
        missing = [q for q in params if q.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        # Every rank receives the (world-1)/world of each factor it does not hold.
        world = dist.get_world_size()
        self.last_comm_bytes = sum(q.ds_numel * q.element_size() for q in missing) * (world - 1) // world
        self.comm_bytes += self.last_comm_bytes
        with GatheredParameters(missing, modifier_rank=None), torch.no_grad():
            yield [(pair.A.detach(), pair.B.detach()) for pair in self.pairs]

    def _sq_norms(self) -> tuple[Tensor, Tensor]:
        with self._full_factors() as factors:
            sq = lambda t: t.double().pow(2).sum()
            return torch.stack([sq(a) for a, _ in factors]), torch.stack([sq(b) for _, b in factors])

    # -- masters and moments ------------------------------------------------------

    @torch.no_grad()
    def _scale_param(self, param, weight: float, exp_avg: float, exp_avg_sq: float) -> None:
        have_moments = _has_moments(_client_optimizer(self.engine))  # none before the first step
        if self.stage == 3:
            from deepspeed.utils import (
                safe_get_local_fp32_param,
                safe_get_local_optimizer_state,
                safe_set_local_fp32_param,
                safe_set_local_optimizer_state,
            )

            safe_set_local_fp32_param(param, safe_get_local_fp32_param(param) * weight)
            if have_moments:
                for key, c in zip(MOMENTS, (exp_avg, exp_avg_sq)):
                    safe_set_local_optimizer_state(param, safe_get_local_optimizer_state(param, key) * c, key)
            return
        views = _local_views(self.engine, param)
        for key, c in (("master", weight), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if views.get(key) is not None:
                views[key].mul_(c)

    def _get_full_master(self, param) -> Tensor:
        return full_fp32_master(self.engine, param)

    @torch.no_grad()
    def _set_full_master(self, param, value: Tensor) -> None:
        if not _is_partitioned(param):
            master, _ = _stage0_master(self.engine, param)
            master.copy_(value)
            return
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())


def full_fp32_master(engine, param) -> Tensor:
    """The full fp32 value the optimizer updates for ``param``, on every rank.

    A collective whenever DeepSpeed partitions the master (ZeRO 1-3, bf16):
    every rank must call it for the same parameters in the same order, also a
    rank that holds no piece of ``param``.
    """
    if _is_partitioned(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    master, _ = _stage0_master(engine, param)
    return master.detach().float().clone()


def _has_moments(opt: torch.optim.Optimizer) -> bool:
    # Not len(opt.state): a failed lookup leaves an empty entry behind.
    return any("exp_avg" in state for state in opt.state.values())


def _is_partitioned(param) -> bool:
    """Whether DeepSpeed keeps this parameter's master in flat partitions (ZeRO 1-3, bf16)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _client_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _stage0_master(engine, param):
    """Stage 0: the fp32 master of ``param`` and the torch optimizer that owns its state.

    fp32: the parameter itself.  bf16: DeepSpeed's mixed-precision wrapper keeps
    fp32 copies beside the model's bf16 parameters.
    """
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        for low, high in zip(opt.fp16_groups, opt.fp32_groups):
            for q16, q32 in zip(low, high):
                if q16 is param:
                    return q32, opt.optimizer
        raise KeyError("parameter not found in the optimizer's fp32 groups")
    if getattr(param, "_hp_mapping", None) is not None:
        raise AssertionError("stage-0 path used for a fragment-mapped parameter")
    return param, _client_optimizer(engine)


def _local_views(engine, param) -> dict[str, Tensor | None]:
    """In-place-editable views of this rank's share of ``param``'s fp32 master and Adam moments.

    ZeRO-1/2 (and DeepSpeed's bf16 optimizer) map each parameter onto a
    fragment of a flat fp32 partition (``param._hp_mapping``; None when no
    element of it lives on this rank).  Stage 0 keeps everything whole.
    """
    views: dict[str, Tensor | None] = {"master": None, "exp_avg": None, "exp_avg_sq": None}
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        if mapping is None:
            return views
        if not mapping.optim_fragment and _has_moments(_client_optimizer(engine)):
            # Loading a checkpoint re-creates the mappings but leaves DeepSpeed's
            # "moments linked" flag set, so the moment views would never come back.
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
            mapping = param._hp_mapping
        views["master"] = mapping.get_hp_fragment()
        if mapping.optim_fragment:  # empty until the first optimizer step
            for key in MOMENTS:
                views[key] = mapping.get_hp_fragment(key)
        return views
    master, opt = _stage0_master(engine, param)
    views["master"] = master.data
    state = opt.state.get(master, {})
    for key in MOMENTS:
        views[key] = state.get(key)
    return views
