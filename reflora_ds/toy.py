"""The paper's matrix-factorisation experiment: minimise ½‖BA − Y‖²_F.

A PEFT LoRA adapter on a zero linear layer (scaling 1) is fitted to a target
``Y`` of known low rank by plain gradient descent, with the same start for
every method, through the same ``attach`` path as real training.  The start
is PEFT's: B = 0 and a random A (here of unit-order entries, so ‖A‖ ≫ ‖B‖),
the unbalanced regime where plain LoRA needs a small step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .optim import attach

TOY_METHODS = ("lora", "scaledgd", "reflora", "reflora_s")
TOY_LRS = (0.01, 0.03)


class _Zero(nn.Module):
    def __init__(self, m: int, n: int):
        super().__init__()
        self.proj = nn.Linear(m, n, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        return self.proj(x)


def toy_problem(m: int = 100, n: int = 100, rank: int = 4, seed: int = 0):
    """Target Y (n×m, rank 4, singular values 18) and the shared start (B = 0)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))
    Y = 18.0 * U @ V.T
    A0 = 1.3 * torch.randn(rank, m, generator=g, dtype=torch.float64)
    B0 = torch.zeros(n, rank, dtype=torch.float64)
    return Y, A0, B0


def run_toy(method: str, lr: float, iters: int = 100, seed: int = 0) -> list[float]:
    """Loss after 0..iters gradient-descent steps (NaN-free: inf once diverged)."""
    from peft import LoraConfig, get_peft_model

    Y, A0, B0 = toy_problem(seed=seed)
    rank = A0.shape[0]
    model = get_peft_model(_Zero(A0.shape[1], Y.shape[0]).double(),
                           LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A0)
        layer.lora_B["default"].weight.copy_(B0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    attach(model, opt, method)
    eye = torch.eye(A0.shape[1], dtype=torch.float64)

    def loss_fn():
        return 0.5 * (model(eye).T - Y).pow(2).sum()  # model(I) = (W0 + BA)ᵀ

    losses = []
    for _ in range(iters):
        loss = loss_fn()
        losses.append(_finite(loss.item()))
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        with torch.no_grad():
            losses.append(_finite(loss_fn().item()))
    losses += [math.inf] * (iters + 1 - len(losses))
    return losses


def _finite(x: float) -> float:
    return x if math.isfinite(x) and x < 1e30 else math.inf


def iters_to(losses: list[float], target: float = 1e-3) -> int | None:
    return next((i for i, x in enumerate(losses) if x <= target), None)


def run_all(out_dir: Path, iters: int = 100) -> dict:
    """Every method at every step size; writes toy.json and toy.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for lr in TOY_LRS:
        for method in TOY_METHODS:
            losses = run_toy(method, lr, iters)
            runs.append({"method": method, "lr": lr, "loss": [x if math.isfinite(x) else None for x in losses],
                         "iters_to_1e-3": iters_to(losses)})
    result = {"problem": "0.5*||BA - Y||_F^2, Y 100x100 of rank 4 (singular values 18), r=4, gradient descent, B0=0, A0~1.3*N(0,1)",
              "runs": runs}
    (out_dir / "toy.json").write_text(json.dumps(result, indent=1))
    plot_toy(result, out_dir / "toy.png")
    return result


def plot_toy(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in result["runs"]})
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.5 * len(lrs), 4), sharey=True)
    for ax, lr in zip(axes, lrs):
        for run in (r for r in result["runs"] if r["lr"] == lr):
            ys = [y if y is not None else float("nan") for y in run["loss"]]
            ax.semilogy(range(len(ys)), ys, label=run["method"])
        ax.axhline(1e-3, color="grey", lw=0.8, ls=":")
        ax.set_ylim(1e-12, 1e6)  # diverged runs leave the plot upwards
        ax.set_title(f"step size {lr}")
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("½‖BA − Y‖²")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
