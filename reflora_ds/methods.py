"""What each training method does to LoRA gradients, weights and moments.

Every method is described by a :class:`StepPlan`, made once per optimizer
step from the current factors and then applied by a backend (plain PyTorch in
``optim.py``, DeepSpeed ZeRO in ``zero.py``):

* ``grad_A[i]`` / ``grad_B[i]``: ∇A ← grad_A·∇A and ∇B ← ∇B·grad_B, applied to
  every micro-batch gradient before it is accumulated or reduced (the map is
  linear, so this equals preconditioning the reduced gradient);
* ``rescale``: RefLoRA-S's ``A ← pA, B ← B/p`` with the Adam moments;
* ``refactor``: move the factors, ``A ← QA, B ← BQ⁻¹``.

The methods:

=========  =================================================================
lora       nothing (plain LoRA with the base optimizer)
loraplus   nothing per step; B gets ``loraplus_lr_ratio`` × the learning rate
scaledgd   ∇A ← (BᵀB + δI)⁻¹∇A, ∇B ← ∇B(AAᵀ + δI)⁻¹ (Riemannian LoRA)
reflora    ∇A ← S⁻¹∇A, ∇B ← ∇B·S (RefLoRA's optimal refactoring as a
           preconditioner; exactly refactor-then-step under SGD)
reflora_s  p = sqrt(‖B‖/‖A‖); A ← pA, B ← B/p, ∇A ← ∇A/p, ∇B ← p∇B,
           m_A ← m_A/p, v_A ← v_A/p², m_B ← p·m_B, v_B ← p²·v_B
refactor   A ← QA, B ← BQ⁻¹ (weights moved to the balanced pair; the
           gradient, taken at the old pair, is mapped: ∇A ← Q⁻ᵀ∇A, ∇B ← ∇B·Qᵀ;
           optimizer moments are left as they are)
=========  =================================================================

The weight edits (rescale, refactor) are applied at the optimizer-step
boundary, just before the base optimizer's update, from the factors as they
were after the previous step: the same as editing right after that step, but
it keeps DeepSpeed's fp32 master and its low-precision copy consistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .refactor import (
    DEFAULT_RANK_TOL,
    refactor_from_grams,
    scalar_balance,
    scaledgd_preconditioners,
)

# A gradient multiplier: an r×r matrix, a scalar, or None for "leave as is".
Multiplier = Tensor | float | None


@dataclass
class StepPlan:
    grad_A: list[Multiplier]
    grad_B: list[Multiplier]
    rescale: list[float] | None = None  # p per pair (reflora_s)
    refactor: list[tuple[Tensor, Tensor] | None] | None = None  # (Q, Q⁻¹) per pair
    fallbacks: int = 0  # layers left as they are (degenerate factors)


@dataclass(frozen=True)
class Method:
    """What a method is, declared once; backends, configuration, CLI and benchmarks read it.

    ``needs``: what its per-step plan is made from ("grams": A Aᵀ and Bᵀ B per
    layer, "norms": the squared norms, None: no plan).  ``edits_weights``: it
    moves the factors at the step boundary.  ``needs_adam_moments``: it
    rescales Adam's moments.  ``transports_moments``: when it moves the
    factors it carries Adam's moments into the new coordinates too (see
    stepper.transport_maps).  ``b_lr_ratio``: B trains at
    ``loraplus_lr_ratio`` × the learning rate.
    """

    name: str
    summary: str
    needs: str | None = None
    edits_weights: bool = False
    needs_adam_moments: bool = False
    transports_moments: bool = False
    b_lr_ratio: bool = False
    plan: Callable[["MethodConfig", Tensor, Tensor], StepPlan] | None = None


def _scaledgd_plan(cfg: "MethodConfig", gram_a: Tensor, gram_b: Tensor) -> StepPlan:
    left_a, right_b = scaledgd_preconditioners(gram_a, gram_b, cfg.scaledgd_delta)
    return StepPlan(grad_A=list(left_a), grad_B=list(right_b))


def _reflora_plan(cfg: "MethodConfig", gram_a: Tensor, gram_b: Tensor) -> StepPlan:
    sol = refactor_from_grams(gram_a, gram_b, rank_tol=cfg.rank_tol)
    ok = sol.ok.tolist()
    return StepPlan(grad_A=[sol.S_inv[i] if good else None for i, good in enumerate(ok)],
                    grad_B=[sol.S[i] if good else None for i, good in enumerate(ok)], fallbacks=sol.fallbacks)


def _refactor_plan(cfg: "MethodConfig", gram_a: Tensor, gram_b: Tensor) -> StepPlan:
    sol = refactor_from_grams(gram_a, gram_b, rank_tol=cfg.rank_tol)
    ok = sol.ok.tolist()
    return StepPlan(grad_A=[sol.Q_inv[i].T if good else None for i, good in enumerate(ok)],
                    grad_B=[sol.Q[i].T if good else None for i, good in enumerate(ok)],
                    refactor=[(sol.Q[i], sol.Q_inv[i]) if good else None for i, good in enumerate(ok)],
                    fallbacks=sol.fallbacks)


def _reflora_s_plan(cfg: "MethodConfig", sq_norm_a: Tensor, sq_norm_b: Tensor) -> StepPlan:
    p, ok = scalar_balance(sq_norm_a, sq_norm_b)
    p = p.tolist()
    return StepPlan(grad_A=[1.0 / x for x in p], grad_B=list(p), rescale=p, fallbacks=int((~ok).sum()))


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("reflora", "RefLoRA: ∇A ← S⁻¹∇A, ∇B ← ∇B·S each step", needs="grams", plan=_reflora_plan),
    Method("reflora_s", "RefLoRA-S: A, B and Adam's moments rescaled to equal norms each step", needs="norms",
           edits_weights=True, needs_adam_moments=True, plan=_reflora_s_plan),
    Method("refactor", "the factors moved to the balanced pair A ← QA, B ← BQ⁻¹ each step", needs="grams",
           edits_weights=True, plan=_refactor_plan),
    Method("refactor_adam", "refactor, with Adam's moments carried into the new coordinates "
                            "(m_A ← Q⁻ᵀm_A, m_B ← m_B·Qᵀ; the second moments by the squared maps)", needs="grams",
           edits_weights=True, needs_adam_moments=True, transports_moments=True, plan=_refactor_plan),
    Method("lora", "plain LoRA with AdamW"),
    Method("loraplus", "LoRA+: B at loraplus_lr_ratio × the learning rate", b_lr_ratio=True),
    Method("scaledgd", "ScaledGD: ∇A ← (BᵀB + δI)⁻¹∇A, ∇B ← ∇B(AAᵀ + δI)⁻¹", needs="grams",
           plan=_scaledgd_plan),
)}
METHODS = tuple(REGISTRY)


def methods_help() -> str:
    """One line per method, for command-line and configuration help."""
    return "; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values())


@dataclass(frozen=True)
class MethodConfig:
    """How to train the LoRA factors: a registered method and its options.

    ``warmup``: optimizer steps before the first refactor (PEFT starts from
    B = 0, where the refactor is undefined).  ``interval``: refactor every
    this many steps after that.
    """

    name: str = "reflora"
    warmup: int = 0
    interval: int = 1
    loraplus_lr_ratio: float = 16.0
    scaledgd_delta: float = 1e-6
    rank_tol: float = DEFAULT_RANK_TOL

    def __post_init__(self):
        if self.name not in REGISTRY:
            raise ValueError(f"method {self.name!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.warmup < 0:
            raise ValueError(f"refactor_warmup must be >= 0, got {self.warmup}")
        if self.interval < 1:
            raise ValueError(f"refactor_interval must be >= 1, got {self.interval}")
        if self.loraplus_lr_ratio <= 0:
            raise ValueError(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}")
        if self.scaledgd_delta <= 0:
            raise ValueError(f"scaledgd_delta must be > 0, got {self.scaledgd_delta}")

    @property
    def spec(self) -> Method:
        return REGISTRY[self.name]

    @property
    def needs(self) -> str | None:
        return self.spec.needs

    def active(self, steps_done: int) -> bool:
        """Whether the window leading to optimizer step ``steps_done + 1`` is refactored."""
        if self.needs is None or steps_done < self.warmup:
            return False
        return (steps_done - self.warmup) % self.interval == 0

    def make_plan(self, stats_a: Tensor, stats_b: Tensor) -> StepPlan:
        """The plan for layers stacked along dim 0, from what ``needs`` names (fp64)."""
        return self.spec.plan(self, stats_a, stats_b)


def merge_plans(plans: list[tuple[list[int], StepPlan]], n: int) -> StepPlan:
    """Join plans made for groups of pairs (one per LoRA rank) into one."""
    out = StepPlan(grad_A=[None] * n, grad_B=[None] * n)
    for idx, plan in plans:
        for j, i in enumerate(idx):
            out.grad_A[i] = plan.grad_A[j]
            out.grad_B[i] = plan.grad_B[j]
        if plan.rescale is not None:
            out.rescale = out.rescale or [1.0] * n
            for j, i in enumerate(idx):
                out.rescale[i] = plan.rescale[j]
        if plan.refactor is not None:
            out.refactor = out.refactor or [None] * n
            for j, i in enumerate(idx):
                out.refactor[i] = plan.refactor[j]
        out.fallbacks += plan.fallbacks
    return out


def apply_multiplier(grad: Tensor, m: Multiplier, side: str) -> Tensor:
    """``m @ grad`` (side "A") or ``grad @ m`` (side "B"), in the multiplier's precision."""
    if m is None:
        return grad
    if isinstance(m, float):
        return grad * m
    g = grad.to(m.dtype)
    out = m @ g if side == "A" else g @ m
    return out.to(grad.dtype)


def moment_scales(p: float, side: str) -> tuple[float, float, float]:
    """(weight, exp_avg, exp_avg_sq) factors of RefLoRA-S for factor A or B."""
    if side == "A":
        return p, 1.0 / p, 1.0 / (p * p)
    return 1.0 / p, p, p * p


def lora_param_groups(pairs, other_params, lr: float, cfg: MethodConfig, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: LoRA+ gives B its own learning rate."""
    if not cfg.spec.b_lr_ratio:
        params = [q for pair in pairs for q in (pair.A, pair.B)] + list(other_params)
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]
    groups = [
        {"params": [pair.A for pair in pairs] + list(other_params), "lr": lr, "weight_decay": weight_decay},
        {"params": [pair.B for pair in pairs], "lr": lr * cfg.loraplus_lr_ratio, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def to_factor_dtype(m: Multiplier, like: Tensor) -> Multiplier:
    """Store a matrix multiplier in fp32 (fp64 for fp64 factors) on the factor's device."""
    if m is None or isinstance(m, float):
        return m
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return m.to(device=like.device, dtype=dtype)
