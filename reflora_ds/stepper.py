"""The per-step cycle of a LoRA method, shared by every backend.

One optimizer step of a refactoring method looks the same in plain PyTorch
and in DeepSpeed ZeRO; only the place where factors, gradients and moments
live differs.  This class owns the cycle; a backend fills in five accessors.

    refresh()              after each optimizer step (and once at the start):
                           read the factors, make the StepPlan for the next
                           accumulation window
    gradient hooks         during backward: precondition each micro-batch's
                           local LoRA gradient with the fixed plan
    apply_weight_edits()   at the step boundary, before the base optimizer
                           updates: RefLoRA-S rescale / refactor
    after_step()           count the step, then refresh()
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterator

import torch
from torch import Tensor

from .lora_pairs import LoraPair, group_by_rank
from .methods import (
    MethodConfig,
    StepPlan,
    apply_multiplier,
    merge_plans,
    moment_scales,
    to_factor_dtype,
)
from .refactor import factor_grams


class LoraStepper:
    """Hooks a :class:`MethodConfig` onto the LoRA pairs of a model."""

    def __init__(self, pairs: list[LoraPair], method: MethodConfig):
        self.pairs = pairs
        self.method = method
        self.steps_done = 0
        self.plan: StepPlan | None = None
        self.stats = {"refactored_steps": 0, "fallbacks": 0, "last_fallbacks": 0}
        # Set to {} to have the hooks add up, per (pair, side), ‖∇‖² before and after the multiplier.
        self.grad_probe: dict[tuple[int, str], list[float]] | None = None
        self._hooks = []
        if method.needs is not None:
            for i, pair in enumerate(pairs):
                self._hooks.append(pair.A.register_hook(partial(self._grad_hook, i, "A")))
                self._hooks.append(pair.B.register_hook(partial(self._grad_hook, i, "B")))

    # -- what a backend provides -------------------------------------------------

    def _full_factors(self) -> contextlib.AbstractContextManager[list[tuple[Tensor, Tensor]]]:
        """Context giving the full (A, B) values of every pair on every rank."""
        raise NotImplementedError

    def _sq_norms(self) -> tuple[Tensor, Tensor]:
        """Squared Frobenius norms of all A and all B (full tensors, [n] each)."""
        raise NotImplementedError

    def _scale_param(self, param, weight: float, exp_avg: float, exp_avg_sq: float) -> None:
        """Scale a factor's (master) weight and its Adam moments in place."""
        raise NotImplementedError

    def _get_full_master(self, param) -> Tensor:
        """The full value of a factor in the precision the optimizer updates."""
        raise NotImplementedError

    def _set_full_master(self, param, value: Tensor) -> None:
        raise NotImplementedError

    def _map_moments(self, param, first: Callable[[Tensor], Tensor], second: Callable[[Tensor], Tensor]) -> None:
        """Replace ``param``'s full Adam moments by ``first(exp_avg)`` and ``second(exp_avg_sq)`` (fp64 in,
        any dtype out); nothing before the first step."""
        raise NotImplementedError

    # -- the cycle ----------------------------------------------------------------

    def _grad_hook(self, index: int, side: str, grad: Tensor):
        plan = self.plan
        if plan is None:
            return None
        m = plan.grad_A[index] if side == "A" else plan.grad_B[index]
        if m is None:
            return None
        out = apply_multiplier(grad, m, side)
        if self.grad_probe is not None:
            sums = self.grad_probe.setdefault((index, side), [0.0, 0.0])
            sums[0] += float(grad.double().pow(2).sum())
            sums[1] += float(out.double().pow(2).sum())
        return out

    def refresh(self) -> None:
        """Make the plan for the coming window from the current factors."""
        self.plan = None
        if not self.method.active(self.steps_done):
            return
        n = len(self.pairs)
        if self.method.needs == "grams":
            parts = []
            with self._full_factors() as factors:
                for idx in group_by_rank(self.pairs).values():
                    gram_a, gram_b = factor_grams([factors[i][0] for i in idx], [factors[i][1] for i in idx])
                    parts.append((idx, self.method.make_plan(gram_a, gram_b)))
            plan = merge_plans(parts, n)
        else:
            sq_a, sq_b = self._sq_norms()
            plan = merge_plans([(list(range(n)), self.method.make_plan(sq_a, sq_b))], n)
        for i, pair in enumerate(self.pairs):
            plan.grad_A[i] = to_factor_dtype(plan.grad_A[i], pair.A)
            plan.grad_B[i] = to_factor_dtype(plan.grad_B[i], pair.B)
        self.plan = plan
        self.stats["refactored_steps"] += 1
        self.stats["last_fallbacks"] = plan.fallbacks
        self.stats["fallbacks"] += plan.fallbacks

    def apply_weight_edits(self) -> None:
        """RefLoRA-S rescale or refactor, at the boundary before the base update."""
        plan = self.plan
        if plan is None or not self.method.spec.edits_weights:
            return
        if plan.rescale is not None:
            for pair, p in zip(self.pairs, plan.rescale):
                if p != 1.0:
                    self._scale_param(pair.A, *moment_scales(p, "A"))
                    self._scale_param(pair.B, *moment_scales(p, "B"))
        if plan.refactor is not None:
            for pair, qq in zip(self.pairs, plan.refactor):
                if qq is None:
                    continue
                Q, Q_inv = qq
                A = self._get_full_master(pair.A)
                B = self._get_full_master(pair.B)
                self._set_full_master(pair.A, (Q.to(A.device) @ A.double()).to(A.dtype))
                self._set_full_master(pair.B, (B.double() @ Q_inv.to(B.device)).to(B.dtype))
                if self.method.spec.transports_moments:
                    for param, (first, second) in zip((pair.A, pair.B), transport_maps(Q, Q_inv)):
                        self._map_moments(param, first, second)

    def after_step(self) -> None:
        self.steps_done += 1
        self.refresh()

    # -- persistence --------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"method": self.method.name, "steps_done": self.steps_done, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count; the plan is recomputed from the loaded factors."""
        if state.get("method") != self.method.name:
            raise ValueError(
                f"checkpoint was trained with method {state.get('method')!r}, "
                f"this run uses {self.method.name!r}: set method to {state.get('method')!r} to resume"
            )
        self.steps_done = int(state["steps_done"])
        self.stats = dict(state.get("stats", self.stats))
        self.refresh()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.plan = None


def transport_maps(Q: Tensor, Q_inv: Tensor):
    """How Adam's moments of A and B follow the refactor A ← QA, B ← BQ⁻¹: ((first, second) for A, for B).

    A gradient in the new coordinates is Q⁻ᵀ∇A and ∇B·Qᵀ, and the first
    moment, a running mean of gradients, maps the same way. The second moment
    is elementwise and has no exact image; it maps by the elementwise squares
    of the same matrices, E[(Mg)ᵢ²] = Σⱼ Mᵢⱼ² E[gⱼ²], exact when the gradient's
    entries are uncorrelated with mean zero. That keeps it positive, and exact
    when Q is diagonal (a per-direction rescale, as RefLoRA-S's scalar).
    """
    left, right = Q_inv.T, Q.T

    def on_a(matrix):
        return lambda m: matrix.to(m.device) @ m

    def on_b(matrix):
        return lambda m: m @ matrix.to(m.device)

    return (on_a(left), on_a(left.square())), (on_b(right), on_b(right.square()))


@contextlib.contextmanager
def local_factors(pairs: list[LoraPair]) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """The factors as they sit on this process (every rank holds them whole)."""
    with torch.no_grad():
        yield [(p.A.detach(), p.B.detach()) for p in pairs]
