"""The mathematics of RefLoRA, for a batch of LoRA factor pairs (torch only).

PEFT layout: ``A`` is r×m, ``B`` is n×r and the update is ``B @ A``.  Every
refactoring ``A' = Q A``, ``B' = B Q⁻¹`` keeps the product, and RefLoRA picks
the one that minimises ``tr(S·AAᵀ) + tr(S⁻¹·BᵀB)`` over ``S = QᵀQ``:

    S (A Aᵀ) S = Bᵀ B        i.e.  S = (A Aᵀ)⁻¹ # (Bᵀ B)  (geometric mean)

Everything below needs only the two r×r Gram matrices ``A Aᵀ`` and ``Bᵀ B``,
so the layers of one rank are solved together with two batched symmetric
eigendecompositions, whatever their in/out features.

Numerics: Grams are formed in fp32 (fp64 for fp64 factors) and the r×r work is
done in fp64.  A layer whose factor is zero, tiny or rank-deficient (smallest
eigenvalue below ``rank_tol`` times the largest) gets the identity instead,
and is counted as a fallback; no NaN or Inf ever leaves this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

# Eigenvalue ratio below which a Gram matrix is treated as rank-deficient.
# Gram eigenvalues are squared singular values, so 1e-8 bounds the singular
# value ratio of a factor at 1e-4.
DEFAULT_RANK_TOL = 1e-8


@dataclass
class Refactoring:
    """Closed-form RefLoRA quantities for a batch of L layers of rank r (fp64).

    ``S``/``S_inv`` precondition the gradients (∇A ← S⁻¹∇A, ∇B ← ∇B S);
    ``Q``/``Q_inv`` move the factors (A ← QA, B ← BQ⁻¹) to the balanced pair
    with ``A'A'ᵀ = B'ᵀB' = diag(sigma)``; ``sigma`` are the singular values of
    ``B A`` (ascending, in that diagonal's order).  Layers with ``ok == False``
    hold the identity and ``sigma = 0``.
    """

    S: Tensor  # [L, r, r]
    S_inv: Tensor  # [L, r, r]
    Q: Tensor  # [L, r, r]
    Q_inv: Tensor  # [L, r, r]
    sigma: Tensor  # [L, r]
    ok: Tensor  # [L] bool

    @property
    def fallbacks(self) -> int:
        return int((~self.ok).sum())


def gram_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def factor_grams(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack ``A Aᵀ`` and ``Bᵀ B`` (fp64, [L, r, r]) for layers sharing r.

    One product per factor, on the factor itself: stacking the factors of a
    shape group first (for one ``bmm``) copies them all, which on a CPU costs
    more than the products (LLaMA-7B shapes, 160 layers: 0.063 s against
    0.087 s).  Products accumulate in fp32 (fp64 for fp64 factors).
    """
    if len(As) != len(Bs) or not As:
        raise ValueError("need the same, non-zero number of A and B factors")
    r = As[0].shape[0]
    gram_a = torch.empty(len(As), r, r, dtype=torch.float64, device=As[0].device)
    gram_b = torch.empty_like(gram_a)
    for i, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"layer {i}: A {tuple(a.shape)} and B {tuple(b.shape)} are not r×m and n×r with r={r}"
            )
        a = a.to(gram_dtype(a))
        b = b.to(gram_dtype(b))
        gram_a[i] = a @ a.T
        gram_b[i] = b.T @ b
    return gram_a, gram_b


def _symmetrize(g: Tensor) -> Tensor:
    return 0.5 * (g + g.transpose(-1, -2))


def _well_conditioned(eigvals: Tensor, rank_tol: float) -> Tensor:
    """Per layer: finite, non-zero and not rank-deficient (eigvals ascending)."""
    top = eigvals[..., -1]
    tiny = torch.finfo(torch.float64).tiny ** 0.5
    return (
        torch.isfinite(eigvals).all(-1)
        & (top > tiny)
        & (eigvals[..., 0] > rank_tol * top)
    )


def refactor_from_grams(gram_a: Tensor, gram_b: Tensor, rank_tol: float = DEFAULT_RANK_TOL) -> Refactoring:
    """Solve ``S (A Aᵀ) S = Bᵀ B`` for every layer from its two Gram matrices.

    With ``A Aᵀ = V_A Σ_A² V_Aᵀ`` and ``M = B V_A Σ_A`` (so ``MᵀM = V_M Σ_M² V_Mᵀ``):
    ``S = V_A Σ_A⁻¹ V_M Σ_M V_Mᵀ Σ_A⁻¹ V_Aᵀ`` and ``Q = Σ_M^½ V_Mᵀ Σ_A⁻¹ V_Aᵀ``.
    """
    gram_a = _symmetrize(gram_a.double())
    gram_b = _symmetrize(gram_b.double())
    L, r, _ = gram_a.shape
    eye = torch.eye(r, dtype=torch.float64, device=gram_a.device).expand(L, r, r)

    # Replace non-finite Grams before eigh: it must never see a NaN.
    finite = torch.isfinite(gram_a).flatten(1).all(1) & torch.isfinite(gram_b).flatten(1).all(1)
    gram_a = torch.where(finite[:, None, None], gram_a, eye)
    gram_b = torch.where(finite[:, None, None], gram_b, eye)

    lam_a, V_A = torch.linalg.eigh(gram_a)
    ok = finite & _well_conditioned(lam_a, rank_tol)
    sig_a = lam_a.clamp_min(0).sqrt()
    # Keep the algebra finite on bad layers; they are replaced below anyway.
    sig_a = torch.where(ok[:, None], sig_a, torch.ones_like(sig_a))

    # Mᵀ M = Σ_A V_Aᵀ (BᵀB) V_A Σ_A, built without ever forming M.
    K = sig_a[:, :, None] * (V_A.transpose(1, 2) @ gram_b @ V_A) * sig_a[:, None, :]
    lam_m, V_M = torch.linalg.eigh(_symmetrize(K))
    ok = ok & _well_conditioned(lam_m, rank_tol)
    sig_m = lam_m.clamp_min(0).sqrt()
    sig_m = torch.where(ok[:, None], sig_m, torch.ones_like(sig_m))

    inv_a = 1.0 / sig_a
    # P = V_A Σ_A⁻¹ V_M, so S = P Σ_M Pᵀ; R = V_A Σ_A V_M, so S⁻¹ = R Σ_M⁻¹ Rᵀ.
    P = (V_A * inv_a[:, None, :]) @ V_M
    R = (V_A * sig_a[:, None, :]) @ V_M
    S = (P * sig_m[:, None, :]) @ P.transpose(1, 2)
    S_inv = (R / sig_m[:, None, :]) @ R.transpose(1, 2)
    root = sig_m.sqrt()
    Q = root[:, :, None] * P.transpose(1, 2)
    Q_inv = R / root[:, None, :]

    keep = ok[:, None, None]
    S, S_inv, Q, Q_inv = (torch.where(keep, X, eye) for X in (S, S_inv, Q, Q_inv))
    sigma = torch.where(ok[:, None], sig_m, torch.zeros_like(sig_m))
    # Final guard: any surviving non-finite value (overflow) means identity.
    bad = ~(
        torch.isfinite(S).flatten(1).all(1)
        & torch.isfinite(S_inv).flatten(1).all(1)
        & torch.isfinite(Q).flatten(1).all(1)
        & torch.isfinite(Q_inv).flatten(1).all(1)
    )
    if bad.any():
        ok = ok & ~bad
        keep = ok[:, None, None]
        S, S_inv, Q, Q_inv = (torch.where(keep, X, eye) for X in (S, S_inv, Q, Q_inv))
        sigma = torch.where(ok[:, None], sigma, torch.zeros_like(sigma))
    return Refactoring(S=S, S_inv=S_inv, Q=Q, Q_inv=Q_inv, sigma=sigma, ok=ok)


def refactor(As: Sequence[Tensor], Bs: Sequence[Tensor], rank_tol: float = DEFAULT_RANK_TOL) -> Refactoring:
    """RefLoRA quantities for layers that share rank r (one batched solve)."""
    return refactor_from_grams(*factor_grams(As, Bs), rank_tol=rank_tol)


def refactor_layerwise(As: Sequence[Tensor], Bs: Sequence[Tensor], rank_tol: float = DEFAULT_RANK_TOL) -> Refactoring:
    """The same result one layer at a time (the reference for benchmarks)."""
    parts = [refactor([a], [b], rank_tol) for a, b in zip(As, Bs)]
    return Refactoring(*(torch.cat([getattr(p, f) for p in parts]) for f in ("S", "S_inv", "Q", "Q_inv", "sigma", "ok")))


def scaledgd_preconditioners(gram_a: Tensor, gram_b: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """Riemannian (ScaledGD) preconditioners ``(BᵀB + δI)⁻¹`` for ∇A and ``(AAᵀ + δI)⁻¹`` for ∇B."""
    if delta <= 0:
        raise ValueError(f"scaledgd_delta must be > 0, got {delta}")
    r = gram_a.shape[-1]
    eye = torch.eye(r, dtype=torch.float64, device=gram_a.device)
    left_a = torch.linalg.inv(_symmetrize(gram_b.double()) + delta * eye)
    right_b = torch.linalg.inv(_symmetrize(gram_a.double()) + delta * eye)
    return left_a, right_b


def scalar_balance(sq_norm_a: Tensor, sq_norm_b: Tensor) -> tuple[Tensor, Tensor]:
    """RefLoRA-S: the factor ``p = sqrt(‖B‖/‖A‖)`` for ``A ← pA, B ← B/p``.

    Takes squared Frobenius norms (which sum across shards).  A zero or
    non-finite norm gives ``p = 1`` and ``ok = False``.
    """
    na = sq_norm_a.double()
    nb = sq_norm_b.double()
    ok = torch.isfinite(na) & torch.isfinite(nb) & (na > 0) & (nb > 0)
    p = torch.where(ok, (nb / torch.where(ok, na, torch.ones_like(na))) ** 0.25, torch.ones_like(na))
    return p, ok
