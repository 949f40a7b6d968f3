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
    method = ZeroStepper(engine, MethodConfig("reflora", warmup=100))
    for batch in loader:
        engine.backward(engine(**batch).loss)
        method.step()                     # instead of engine.step()
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from . import dist
from .lora_pairs import find_lora_pairs
from .methods import MethodConfig
from .stepper import LoraStepper, local_factors

MOMENTS = ("exp_avg", "exp_avg_sq")


class ZeroStepper(LoraStepper):
    """A :class:`MethodConfig` running inside a DeepSpeed engine (ZeRO 0-3)."""

    def __init__(self, engine, method: MethodConfig):
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        if engine.fp16_enabled():
            raise ValueError("fp16 (loss scaling may skip steps) is not supported: use bf16 or fp32")
        check_internals(engine)
        if method.spec.needs_adam_moments and "betas" not in client_optimizer(engine).defaults:
            raise TypeError(f"{method.name} rescales Adam moments (exp_avg, exp_avg_sq): use Adam/AdamW")
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

    def _gathered_factors(self):
        import contextlib

        @contextlib.contextmanager
        def gather():
            params = [q for pair in self.pairs for q in (pair.A, pair.B)]
            with dist.gathered(params, only_released=True) as missing, torch.no_grad():
                # Every rank receives the (world-1)/world of each factor it does not hold.
                world = dist.rank_and_world()[1]
                self.last_comm_bytes = sum(q.ds_numel * q.element_size() for q in missing) * (world - 1) // world
                self.comm_bytes += self.last_comm_bytes
                yield [(pair.A.detach(), pair.B.detach()) for pair in self.pairs]

        return gather()

    def _sq_norms(self) -> tuple[Tensor, Tensor]:
        with self._full_factors() as factors:
            sq = lambda t: t.double().pow(2).sum()  # noqa: E731
            return torch.stack([sq(a) for a, _ in factors]), torch.stack([sq(b) for _, b in factors])

    # -- masters and moments ------------------------------------------------------

    @torch.no_grad()
    def _scale_param(self, param, weight: float, exp_avg: float, exp_avg_sq: float) -> None:
        have_moments = _has_moments(client_optimizer(self.engine))  # none before the first step
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
        if not _master_is_partitioned(param):
            master, _ = _stage0_master(self.engine, param)
            master.copy_(value)
            return
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())

    @torch.no_grad()
    def _map_moments(self, param, first, second) -> None:
        if not _has_moments(client_optimizer(self.engine)):
            return  # before the first step
        if not _master_is_partitioned(param):
            master, opt = _stage0_master(self.engine, param)
            state = opt.state.get(master, {})
            for key, mapping in zip(MOMENTS, (first, second)):
                if key in state:
                    state[key].copy_(mapping(state[key].double()))
            return
        from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

        for key, mapping in zip(MOMENTS, (first, second)):
            # Every rank gathers and maps the same full tensor, then keeps its own share.
            full = safe_get_full_optimizer_state(param, key)
            safe_set_full_optimizer_state(param, mapping(full.double()).float(), key)


ZeroRefLoRA = ZeroStepper  # the name of earlier releases


def full_fp32_master(engine, param) -> Tensor:
    """The full fp32 value the optimizer updates for ``param``, on every rank.

    A collective whenever DeepSpeed partitions the master (ZeRO 1-3, bf16):
    every rank must call it for the same parameters in the same order, also a
    rank that holds no piece of ``param``.
    """
    if _master_is_partitioned(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    master, _ = _stage0_master(engine, param)
    return master.detach().float().clone()


def _has_moments(opt: torch.optim.Optimizer) -> bool:
    # Not len(opt.state): a failed lookup leaves an empty entry behind.
    return any("exp_avg" in state for state in opt.state.values())


# --- DeepSpeed internals ------------------------------------------------------------------------
# Everything below reaches into attributes DeepSpeed does not document. It was
# written against DeepSpeed 0.16-0.19 (and checked on 0.19.8); check_internals()
# names whatever a later version no longer has, before training starts.

DEEPSPEED_WRITTEN_FOR = "0.16 to 0.19"


def release_shm_workspace() -> None:
    """Unlink the shared-memory segment DeepSpeed's CPU all-reduce made for this rank (call after init_distributed).

    On the CPU accelerator with every rank on one node, init_distributed()
    creates one POSIX shared-memory segment per rank (about 69 MB, in RAM) and
    never unlinks it, so each multi-rank CPU run would leave its segments in
    /dev/shm until reboot.  Once every rank has mapped its peers' segments
    (init_distributed has returned everywhere: the barrier) the names can go;
    the mappings stay valid and the memory is freed when the last rank exits,
    however it exits.  Every rank takes the same branch, so the barrier cannot
    hang.
    """
    from deepspeed.accelerator import get_accelerator

    rank, world = dist.rank_and_world()
    if get_accelerator().device_name() != "cpu" or int(os.environ.get("LOCAL_SIZE", 0)) != world:
        return  # DeepSpeed made no segment
    dist.barrier()
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(rank)])
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def client_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer the run built, inside DeepSpeed's wrappers."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _has_fp32_groups(engine) -> bool:
    return hasattr(engine.optimizer, "fp16_groups") and hasattr(engine.optimizer, "fp32_groups")


def check_internals(engine) -> None:
    """Fail with a clear message if this DeepSpeed lacks an internal attribute zero.py relies on."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    stage = engine.zero_optimization_stage()
    fragments = any(hasattr(p, "_hp_mapping") for p in params)
    missing = []
    if stage in (1, 2) and not (params and all(hasattr(p, "_hp_mapping") for p in params)):
        missing.append("param._hp_mapping (fp32 master fragments)")
    if stage in (1, 2) or fragments:
        for name in ("_hp_optimizer_states_linked", "_lazy_init_hp_params_optimizer_state"):
            if not hasattr(engine.optimizer, name):
                missing.append(f"{type(engine.optimizer).__name__}.{name}")
    if stage == 0 and engine.bfloat16_enabled() and not fragments and not _has_fp32_groups(engine):
        missing.append(f"{type(engine.optimizer).__name__}.fp16_groups / fp32_groups (bf16 masters)")
    if missing:
        import deepspeed

        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} lacks what reflora_ds's ZeRO support uses: {', '.join(missing)}. "
            f"It was written for DeepSpeed {DEEPSPEED_WRITTEN_FOR}: install one of those versions "
            "(pip install 'deepspeed>=0.16,<0.20')"
        )


def _master_is_partitioned(param) -> bool:
    """Whether DeepSpeed keeps this parameter's master in flat partitions (ZeRO 1-3, bf16)."""
    return dist.is_partitioned(param) or hasattr(param, "_hp_mapping")


def _stage0_master(engine, param):
    """Stage 0: the fp32 master of ``param`` and the torch optimizer that owns its state.

    fp32: the parameter itself.  bf16: DeepSpeed's mixed-precision wrapper keeps
    fp32 copies beside the model's bf16 parameters.
    """
    opt = engine.optimizer
    if _has_fp32_groups(engine):
        for low, high in zip(opt.fp16_groups, opt.fp32_groups):
            for q16, q32 in zip(low, high):
                if q16 is param:
                    return q32, opt.optimizer
        raise KeyError("parameter not found in the optimizer's fp32 groups")
    if getattr(param, "_hp_mapping", None) is not None:
        raise AssertionError("stage-0 path used for a fragment-mapped parameter")
    return param, client_optimizer(engine)


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
        if not mapping.optim_fragment and _has_moments(client_optimizer(engine)):
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
