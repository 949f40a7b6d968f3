"""How balanced a model's LoRA factors are, and how strongly RefLoRA reshapes their gradients.

Per pair, from the two r×r Grams alone (refactor.py):

* imbalance ``‖AAᵀ − BᵀB‖_F / ‖BA‖_F``: 0 for a balanced pair (what a refactor
  produces), large when one factor dwarfs the other (PEFT's start, B = 0);
* ``cond(S)``: the condition number of RefLoRA's metric S, i.e. how far its
  preconditioner is from a multiple of the identity (RefLoRA-S's scalar);
* with a gradient probe (``LoraStepper.grad_probe``), ``‖S⁻¹∇A‖ / ‖∇A‖`` and
  ``‖∇B·S‖ / ‖∇B‖``: how much the method scales each factor's gradient.

Layers whose refactor falls back (degenerate factors) have no cond(S).
"""

from __future__ import annotations

import math
from statistics import median
from typing import Sequence

import torch
from torch import Tensor

from .refactor import DEFAULT_RANK_TOL, factor_grams, refactor_from_grams


def pair_diagnostics(gram_a: Tensor, gram_b: Tensor, rank_tol: float = DEFAULT_RANK_TOL) -> dict[str, list[float]]:
    """Imbalance and cond(S) per layer from stacked Grams ``A Aᵀ`` and ``Bᵀ B`` ([L, r, r])."""
    gram_a, gram_b = gram_a.double(), gram_b.double()
    # ‖BA‖²_F = tr(BᵀB · AAᵀ), an elementwise product for symmetric matrices.
    product = (gram_a * gram_b).sum((1, 2)).clamp_min(0).sqrt()
    gap = torch.linalg.matrix_norm(gram_a - gram_b)
    imbalance = torch.where(product > 0, gap / product, torch.full_like(gap, math.inf))
    sol = refactor_from_grams(gram_a, gram_b, rank_tol)
    eig = torch.linalg.eigvalsh(sol.S)
    cond = torch.where(sol.ok, eig[:, -1] / eig[:, 0], torch.full_like(eig[:, 0], math.nan))
    return {"imbalance": imbalance.tolist(), "cond_S": cond.tolist()}


def factor_diagnostics(factors: Sequence[tuple[Tensor, Tensor]]) -> dict[str, list[float]]:
    """Per-layer imbalance and cond(S) of (A, B) pairs; layers of different ranks are solved apart."""
    out: dict[str, list[float]] = {"imbalance": [math.nan] * len(factors), "cond_S": [math.nan] * len(factors)}
    by_rank: dict[int, list[int]] = {}
    for i, (a, _) in enumerate(factors):
        by_rank.setdefault(a.shape[0], []).append(i)
    with torch.no_grad():
        for idx in by_rank.values():
            grams = factor_grams([factors[i][0] for i in idx], [factors[i][1] for i in idx])
            for key, values in pair_diagnostics(*grams).items():
                for i, v in zip(idx, values):
                    out[key][i] = v
    return out


def gradient_ratios(probe: dict[tuple[int, str], list[float]]) -> dict[str, list[float]]:
    """``‖m·∇‖ / ‖∇‖`` per layer and side from a stepper's gradient probe."""
    out: dict[str, list[float]] = {"grad_ratio_A": [], "grad_ratio_B": []}
    for (_, side), (before, after) in sorted(probe.items()):
        if before > 0:
            out[f"grad_ratio_{side}"].append(math.sqrt(after / before))
    return out


def summarise(values: Sequence[float]) -> dict[str, float] | None:
    """Median, mean and max over the finite values (None when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return {"median": median(finite), "mean": sum(finite) / len(finite), "max": max(finite)}
