"""RefLoRA attached to plain PyTorch optimizers: exact trajectories and state."""

import copy

import pytest
import torch

from reflora_ds import attach, find_lora_pairs, param_groups
from reflora_ds.refactor import refactor

from conftest import delta_weights, regression_batches, tiny_peft

f64 = torch.float64


def train(model, opt, batches):
    """Plain loop; returns the ΔW of every LoRA layer after each step."""
    trajectory = []
    for x, y in batches:
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        trajectory.append(delta_weights(model))
    return trajectory


def assert_same_trajectory(t1, t2, rtol):
    assert len(t1) == len(t2)
    for step, (a, b) in enumerate(zip(t1, t2)):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=rtol, msg=f"step {step}, {name}")


def sgd(model, lr=0.05):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def test_preconditioning_equals_refactor_then_step_under_sgd():
    batches = regression_batches(60)
    m1, m2 = tiny_peft(), tiny_peft()
    o1, o2 = sgd(m1), sgd(m2)
    r1 = attach(m1, o1, "reflora")
    r2 = attach(m2, o2, "refactor")
    t1, t2 = train(m1, o1, batches), train(m2, o2, batches)
    assert_same_trajectory(t1, t2, rtol=1e-10)
    assert r1.stats["fallbacks"] == 0 and r1.stats["refactored_steps"] == 61
    assert r2.stats["fallbacks"] == 0 and r2.stats["refactored_steps"] == 61
    # the refactor method really keeps the factors balanced (before each step)
    for pair in find_lora_pairs(m2):
        A, B = pair.A.detach(), pair.B.detach()
        assert (A @ A.T - B.T @ B).abs().max() < 0.5  # one SGD step away from balance
    # and plain LoRA does move differently
    m3 = tiny_peft()
    t3 = train(m3, sgd(m3), batches)
    assert (t3[-1]["base_model.model.up[default]"] - t1[-1]["base_model.model.up[default]"]).abs().max() > 1e-3


def test_reflora_trajectory_is_invariant_to_the_starting_factorisation():
    batches = regression_batches(50, seed=3)
    m1, m2 = tiny_peft(seed=3), tiny_peft(seed=3)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for pair in find_lora_pairs(m2):
            Q = torch.randn(4, 4, generator=g, dtype=f64) + 2 * torch.eye(4, dtype=f64)
            pair.A.copy_(Q @ pair.A)
            pair.B.copy_(pair.B @ torch.linalg.inv(Q))
    o1, o2 = sgd(m1), sgd(m2)
    attach(m1, o1, "reflora")
    attach(m2, o2, "reflora")
    assert_same_trajectory(train(m1, o1, batches), train(m2, o2, batches), rtol=1e-10)


def test_gradient_hooks_apply_the_preconditioners():
    model, raw = tiny_peft(seed=5), tiny_peft(seed=5)
    opt = sgd(model)
    attach(model, opt, "reflora")
    x, y = regression_batches(1, seed=5)[0]
    for m in (model, raw):
        (m(x) - y).pow(2).mean().backward()
    for pair, raw_pair in zip(find_lora_pairs(model), find_lora_pairs(raw)):
        sol = refactor([pair.A.detach()], [pair.B.detach()])
        torch.testing.assert_close(pair.A.grad, sol.S_inv[0] @ raw_pair.A.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pair.B.grad, raw_pair.B.grad @ sol.S[0], rtol=1e-12, atol=1e-12)

    sg, raw2 = tiny_peft(seed=5), tiny_peft(seed=5)
    attach(sg, sgd(sg), "scaledgd", scaledgd_delta=1e-3)
    for m in (sg, raw2):
        (m(x) - y).pow(2).mean().backward()
    eye = torch.eye(4, dtype=f64)
    for pair, raw_pair in zip(find_lora_pairs(sg), find_lora_pairs(raw2)):
        A, B = pair.A.detach(), pair.B.detach()
        torch.testing.assert_close(pair.A.grad, torch.linalg.solve(B.T @ B + 1e-3 * eye, raw_pair.A.grad))
        torch.testing.assert_close(pair.B.grad, torch.linalg.solve(A @ A.T + 1e-3 * eye, raw_pair.B.grad.T).T)


def test_reflora_s_adam_rescale_is_an_exact_change_of_variables():
    """With ε = 0 the rescaled step is Adam's own step in the variables (pA, B/p)."""
    model = tiny_peft(seed=7)
    with torch.no_grad():  # make the two factors' norms very different
        for pair in find_lora_pairs(model):
            pair.B.mul_(20.0)
    lr, betas = 1e-2, (0.9, 0.99)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas, eps=0.0)
    refl = attach(model, opt, "reflora_s", warmup=2)
    batches = regression_batches(3, seed=7)
    train(model, opt, batches[:2])  # warm-up: plain Adam, moments now exist
    assert refl.plan is not None and refl.plan.rescale is not None

    pairs = find_lora_pairs(model)
    before = {id(q): (q.detach().clone(), opt.state[q]["exp_avg"].clone(), opt.state[q]["exp_avg_sq"].clone())
              for pair in pairs for q in (pair.A, pair.B)}
    # the raw gradient at the current point, from a copy without hooks
    x, y = batches[2]
    raw = tiny_peft(seed=7)
    raw.load_state_dict(model.state_dict())
    (raw(x) - y).pow(2).mean().backward()
    raw_grads = {id(q): r.grad.clone() for pair, rp in zip(pairs, find_lora_pairs(raw)) for q, r in ((pair.A, rp.A), (pair.B, rp.B))}

    refl_p = list(refl.plan.rescale)
    train(model, opt, [batches[2]])
    step = 3
    for i, pair in enumerate(pairs):
        sq_a = before[id(pair.A)][0].pow(2).sum()
        sq_b = before[id(pair.B)][0].pow(2).sum()
        p = (sq_b / sq_a) ** 0.25
        assert refl_p[i] == pytest.approx(p.item(), rel=1e-12)
        for q, scale, side in ((pair.A, p, "A"), (pair.B, 1 / p, "B")):
            w0, m0, v0 = before[id(q)]
            g = raw_grads[id(q)]
            # reference: Adam run in the original variables...
            m1 = betas[0] * m0 + (1 - betas[0]) * g
            v1 = betas[1] * v0 + (1 - betas[1]) * g * g
            u = (m1 / (1 - betas[0] ** step)) / (v1 / (1 - betas[1] ** step)).sqrt()
            # ...is the same direction in the rescaled variables: new w = c·w0 − lr·u, moments in new units
            torch.testing.assert_close(q.detach(), scale * w0 - lr * u, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[q]["exp_avg"], m1 / scale, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(opt.state[q]["exp_avg_sq"], v1 / scale**2, rtol=1e-12, atol=1e-16)
    # after the step the factors are (close to) balanced in norm
    for pair in pairs:
        ratio = pair.B.detach().norm() / pair.A.detach().norm()
        assert 0.8 < ratio < 1.25


def test_reflora_s_needs_adam_moments():
    model = tiny_peft()
    with pytest.raises(TypeError, match="exp_avg"):
        attach(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "reflora_s")
    attach(model, sgd(model), "reflora_s")  # stateless SGD has nothing to rescale: fine


def test_warmup_and_interval_schedule():
    model = tiny_peft(seed=2)
    opt = sgd(model)
    refl = attach(model, opt, "reflora", warmup=3, interval=2)
    active = []
    for x, y in regression_batches(10, seed=2):
        active.append(refl.plan is not None)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert active == [False, False, False, True, False, True, False, True, False, True]
    # during warm-up the run is plain LoRA, to the last bit
    m_ref = tiny_peft(seed=2)
    m_w = tiny_peft(seed=2)
    o_w = sgd(m_w)
    attach(m_w, o_w, "reflora", warmup=3)
    batches = regression_batches(4, seed=2)
    t_ref, t_w = train(m_ref, sgd(m_ref), batches), train(m_w, o_w, batches)
    assert_same_trajectory(t_ref[:3], t_w[:3], rtol=0)
    assert not torch.equal(t_ref[3]["base_model.model.up[default]"], t_w[3]["base_model.model.up[default]"])


def test_peft_initialisation_with_zero_b_falls_back_then_refactors():
    model = tiny_peft(randomize_b=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    refl = attach(model, opt, "reflora")
    assert refl.stats["last_fallbacks"] == 2  # B = 0: identity for both layers
    train(model, opt, regression_batches(3))
    assert refl.stats["last_fallbacks"] == 0
    for pair in find_lora_pairs(model):
        assert torch.isfinite(pair.A).all() and torch.isfinite(pair.B).all()
        assert pair.B.abs().max() > 0


@pytest.mark.parametrize("method", ["reflora", "reflora_s", "scaledgd", "refactor"])
def test_bf16_parameters_train_without_nan(method):
    model = tiny_peft(dtype=torch.bfloat16, seed=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    refl = attach(model, opt, method)
    before = delta_weights(model)
    train(model, opt, regression_batches(5, seed=4, dtype=torch.bfloat16))
    assert refl.stats["fallbacks"] == 0
    for pair in find_lora_pairs(model):
        assert pair.A.dtype == torch.bfloat16 and torch.isfinite(pair.A.float()).all()
        assert pair.A.grad.dtype == torch.bfloat16
    after = delta_weights(model)
    assert all((after[k] - before[k]).abs().max() > 0 for k in after)


@pytest.mark.parametrize("method", ["reflora", "reflora_s", "loraplus", "scaledgd"])
def test_resume_through_state_dict_continues_exactly(method):
    batches = regression_batches(10, seed=9)

    def fresh():
        model = tiny_peft(seed=9)
        opt = torch.optim.AdamW(param_groups(model, 1e-2, method), lr=1e-2)
        return model, opt, attach(model, opt, method, warmup=2)

    m_full, o_full, _ = fresh()
    full = train(m_full, o_full, batches)

    m1, o1, r1 = fresh()
    train(m1, o1, batches[:5])
    saved = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict(), "reflora": r1.state_dict()})
    m2, o2, r2 = fresh()
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    r2.load_state_dict(saved["reflora"])
    assert r2.steps_done == 5
    resumed = train(m2, o2, batches[5:])
    assert_same_trajectory(full[5:], resumed, rtol=0)


def test_resume_refuses_another_method():
    model = tiny_peft()
    refl = attach(model, sgd(model), "reflora")
    other = tiny_peft()
    with pytest.raises(ValueError, match="method 'reflora'"):
        attach(other, sgd(other), "scaledgd").load_state_dict(refl.state_dict())


def test_loraplus_learning_rates():
    model = tiny_peft()
    groups = param_groups(model, 1e-3, "loraplus")
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    b_ids = {id(p.B) for p in find_lora_pairs(model)}
    assert {id(p) for p in groups[1]["params"]} == b_ids
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        attach(model, sgd(model), "loraplus")
    attach(model, torch.optim.AdamW(groups), "loraplus")


def test_unknown_method_and_bad_options():
    model = tiny_peft()
    with pytest.raises(ValueError, match="unknown"):
        attach(model, sgd(model), "lora_ultra")
    with pytest.raises(ValueError, match="refactor_interval"):
        attach(model, sgd(model), "reflora", interval=0)


def test_refactor_adam_carries_the_moments_into_the_new_coordinates():
    """At a boundary: m ← β₁·(Q⁻ᵀ m) + (1-β₁)·g and v ← β₂·((Q⁻ᵀ)∘² v) + (1-β₂)·g² for A (for B the maps act
    from the right), g the gradient in the new coordinates; plain refactor leaves the old moments as they were."""
    from reflora_ds.stepper import transport_maps

    batches = regression_batches(6, seed=4)
    for method, carried in (("refactor_adam", True), ("refactor", False)):
        model = tiny_peft(seed=4)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.9),
                                weight_decay=0.0)
        stepper = attach(model, opt, method)
        pair = find_lora_pairs(model)[0]
        for k, (x, y) in enumerate(batches):
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            if k == len(batches) - 1:
                old = {side: [opt.state[p][key].clone().double() for key in ("exp_avg", "exp_avg_sq")]
                       for side, p in (("A", pair.A), ("B", pair.B))}
                grads = {"A": pair.A.grad.clone().double(), "B": pair.B.grad.clone().double()}
                Q, Q_inv = stepper.plan.refactor[0]
            opt.step()
        assert (Q - torch.eye(Q.shape[0], dtype=Q.dtype)).abs().max() > 1e-3  # a real change of coordinates
        maps = dict(zip("AB", transport_maps(Q, Q_inv)))
        for side, p in (("A", pair.A), ("B", pair.B)):
            first, second = maps[side] if carried else (lambda m: m, lambda v: v)
            (m_old, v_old), g = old[side], grads[side]
            torch.testing.assert_close(opt.state[p]["exp_avg"].double(), 0.8 * first(m_old) + 0.2 * g,
                                       rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), 0.9 * second(v_old) + 0.1 * g.square(),
                                       rtol=1e-9, atol=1e-12)
