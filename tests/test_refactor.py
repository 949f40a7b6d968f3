"""Closed-form identities of the RefLoRA mathematics (reflora_ds.refactor)."""

import pytest
import torch

from reflora_ds.refactor import (
    factor_grams,
    refactor,
    refactor_from_grams,
    refactor_layerwise,
    scalar_balance,
    scaledgd_preconditioners,
)

f64 = torch.float64


def random_pairs(L=5, r=4, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7 + i, 9 + 2 * i) for i in range(L)]  # (m, n) differ per layer
    As = [torch.randn(r, m, generator=g, dtype=f64).to(dtype) for m, _ in shapes]
    Bs = [torch.randn(n, r, generator=g, dtype=f64).to(dtype) for _, n in shapes]
    return As, Bs


def test_geometric_mean_solves_riccati_equation():
    As, Bs = random_pairs()
    sol = refactor(As, Bs)
    assert sol.ok.all() and sol.fallbacks == 0
    for i, (A, B) in enumerate(zip(As, Bs)):
        S = sol.S[i]
        torch.testing.assert_close(S @ (A @ A.T) @ S, B.T @ B, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(S @ sol.S_inv[i], torch.eye(4, dtype=f64), rtol=0, atol=1e-10)
        torch.testing.assert_close(sol.Q[i].T @ sol.Q[i], S, rtol=1e-10, atol=1e-10)
        assert torch.linalg.eigvalsh(S).min() > 0  # positive definite


def test_refactored_pair_is_balanced_with_singular_values_of_product():
    As, Bs = random_pairs(seed=1)
    sol = refactor(As, Bs)
    for i, (A, B) in enumerate(zip(As, Bs)):
        A2, B2 = sol.Q[i] @ A, B @ sol.Q_inv[i]
        torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-10, atol=1e-10)
        sv = torch.linalg.svdvals(B @ A)[:4].flip(0)
        torch.testing.assert_close(sol.sigma[i], sv, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(A2 @ A2.T, torch.diag(sv), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(B2.T @ B2, torch.diag(sv), rtol=1e-9, atol=1e-9)


def test_refactoring_minimises_the_sum_of_squared_norms():
    As, Bs = random_pairs(seed=2)
    sol = refactor(As, Bs)
    g = torch.Generator().manual_seed(3)
    for i, (A, B) in enumerate(zip(As, Bs)):
        nuclear = torch.linalg.svdvals(B @ A).sum()
        best = (sol.Q[i] @ A).pow(2).sum() + (B @ sol.Q_inv[i]).pow(2).sum()
        torch.testing.assert_close(best, 2 * nuclear, rtol=1e-10, atol=1e-10)
        for _ in range(200):
            Q = torch.randn(4, 4, generator=g, dtype=f64) + 0.5 * torch.eye(4, dtype=f64)
            other = (Q @ A).pow(2).sum() + (B @ torch.linalg.inv(Q)).pow(2).sum()
            assert other >= best * (1 - 1e-12)
        # the balanced pair is a fixed point: refactoring it again changes nothing
        again = refactor([sol.Q[i] @ A], [B @ sol.Q_inv[i]])
        torch.testing.assert_close(again.S[0], torch.eye(4, dtype=f64), rtol=0, atol=1e-9)


def test_batched_equals_layerwise_and_ranks_do_not_mix():
    As, Bs = random_pairs(L=6, seed=4)
    batched, single = refactor(As, Bs), refactor_layerwise(As, Bs)
    for field in ("S", "S_inv", "Q", "Q_inv", "sigma"):
        torch.testing.assert_close(getattr(batched, field), getattr(single, field), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["zero_B", "zero_A", "rank_deficient_A", "tiny", "nan", "inf"])
def test_degenerate_layers_fall_back_to_identity_without_nan(case):
    As, Bs = random_pairs(L=3, seed=5)
    if case == "zero_B":
        Bs[1] = torch.zeros_like(Bs[1])
    elif case == "zero_A":
        As[1] = torch.zeros_like(As[1])
    elif case == "rank_deficient_A":
        As[1][3] = As[1][0] * 2.0
    elif case == "tiny":
        As[1] = As[1] * 1e-200
        Bs[1] = Bs[1] * 1e-200
    elif case == "nan":
        Bs[1][0, 0] = float("nan")
    elif case == "inf":
        As[1][0, 0] = float("inf")
    sol = refactor(As, Bs)
    assert sol.ok.tolist() == [True, False, True]
    assert sol.fallbacks == 1
    eye = torch.eye(4, dtype=f64)
    for field in ("S", "S_inv", "Q", "Q_inv"):
        value = getattr(sol, field)
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value[1], eye, rtol=0, atol=0)
    # healthy layers are untouched by their degenerate neighbour
    healthy = refactor([As[0], As[2]], [Bs[0], Bs[2]])
    torch.testing.assert_close(sol.S[[0, 2]], healthy.S, rtol=1e-12, atol=1e-12)


def test_bf16_factors_are_solved_in_fp64():
    As, Bs = random_pairs(seed=6, dtype=torch.bfloat16)
    sol = refactor(As, Bs)
    assert sol.S.dtype == f64 and sol.ok.all()
    A, B = As[0].double(), Bs[0].double()
    # Grams of low-precision factors are formed in fp32: fp32-level agreement
    torch.testing.assert_close(sol.S[0] @ (A @ A.T) @ sol.S[0], B.T @ B, rtol=1e-5, atol=1e-5)


def test_grams_group_identical_shapes():
    As, Bs = random_pairs(L=2, seed=7)
    As, Bs = As + [As[0] * 2], Bs + [Bs[0] * 3]
    ga, gb = factor_grams(As, Bs)
    torch.testing.assert_close(ga[2], 4 * ga[0])
    torch.testing.assert_close(gb[2], 9 * gb[0])
    with pytest.raises(ValueError, match="not r×m and n×r"):
        factor_grams([As[0], torch.randn(3, 5)], [Bs[0], Bs[1]])
    sol = refactor_from_grams(ga, gb)
    assert sol.ok.all()


def test_scaledgd_preconditioners():
    As, Bs = random_pairs(L=2, seed=8)
    ga, gb = factor_grams(As, Bs)
    left, right = scaledgd_preconditioners(ga, gb, 1e-3)
    eye = torch.eye(4, dtype=f64)
    torch.testing.assert_close(left[0] @ (Bs[0].T @ Bs[0] + 1e-3 * eye), eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(right[1] @ (As[1] @ As[1].T + 1e-3 * eye), eye, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="delta"):
        scaledgd_preconditioners(ga, gb, 0.0)


def test_scalar_balance_equalises_norms():
    As, Bs = random_pairs(L=3, seed=9)
    Bs[0] = Bs[0] * 50
    sq_a = torch.stack([a.pow(2).sum() for a in As])
    sq_b = torch.stack([b.pow(2).sum() for b in Bs])
    p, ok = scalar_balance(sq_a, sq_b)
    assert ok.all()
    for i in range(3):
        torch.testing.assert_close((p[i] * As[i]).norm(), (Bs[i] / p[i]).norm(), rtol=1e-12, atol=0)
    p, ok = scalar_balance(torch.tensor([0.0, 1.0]), torch.tensor([1.0, float("nan")]))
    assert p.tolist() == [1.0, 1.0] and ok.tolist() == [False, False]
