"""How far one optimizer step moves each layer's LoRA update BA, method by method.

    python -m benchmarks.step_probe --task lm --lr 1e-4 --seed 0 --methods lora,reflora,refactor_adam --until 50

Replays the first steps of a convergence-study run (the same recipe,
initialisation, data order and schedule: it is ``convergence.train_run``,
stopped early) and records after every optimizer step, as medians over the
adapted layers, ``‖A‖_F``, ``‖B‖_F``, ``‖BA‖_F`` and the step's
``‖Δ(BA)‖_F`` divided by the learning rate the step used.

Why: Adam moves each entry of a factor by about the learning rate whatever
the factor's size, so its step on the update, ``Δ(BA) ≈ ΔB·A + B·ΔA``, grows
with the factors' norms. A refactor changes those norms (it balances the pair
to ``AAᵀ = BᵀB``) and leaves BA itself unchanged, so ``Δ(BA)`` is the
optimizer's step alone and its size per unit of learning rate shows what a
method's factor norms do to Adam's step. Writes
``<out>/step_probe/<task>-lr<lr>-s<seed>.json``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from statistics import median

import torch

from reflora_ds import atomic

from .common import base_model, machine
from .convergence import QUICK_RECIPE, RECIPE, TASKS, RunSpec, train_run


class StepRecorder:
    """``train_run``'s ``after_step`` hook: the factor norms and the step on BA, medians over layers."""

    def __init__(self):
        self.rows: list[dict] = []
        self._previous: list[torch.Tensor] | None = None  # each layer's BA after the last step

    @torch.no_grad()
    def __call__(self, step: int, stepper, lr: float) -> None:
        factors = [(pair.A.detach().double(), pair.B.detach().double()) for pair in stepper.pairs]
        products = [b @ a for a, b in factors]
        row = {"step": step, "lr": lr,
               "norm_A": median(a.norm().item() for a, _ in factors),
               "norm_B": median(b.norm().item() for _, b in factors),
               "norm_BA": median(p.norm().item() for p in products)}
        if self._previous is not None and lr > 0:
            row["step_BA_per_lr"] = median((p - q).norm().item() / lr for p, q in zip(products, self._previous))
        self._previous = products
        self.rows.append(row)


def probe(task: str, methods: list[str], lr: float, seed: int, until: int, quick: bool = False) -> dict:
    """Each method's first ``until`` steps (at least; the run stops at the next evaluation) of one study run."""
    recipe = QUICK_RECIPE if quick else RECIPE
    base, tokenizer = base_model(quick, recipe.base_dtype)
    data = TASKS[task](tokenizer, recipe, quick)
    series = {}
    for method in methods:
        # The study's run of this method: stage 1's horizon and refactor warm-up (the quick suite's in quick mode).
        horizon = dict(steps=6, refactor_warmup=0.34) if quick else {}
        spec = RunSpec(task, method, lr, seed, **horizon)
        recorder = StepRecorder()
        train_run(spec, base, tokenizer, data, recipe, stop_after=until, after_step=recorder)
        series[method] = {"spec": asdict(spec), "rows": recorder.rows}
    return {"recipe": asdict(recipe), "quick": quick, "machine": machine(), "series": series}


def show(record: dict, steps: tuple[int, ...] = (5, 10, 15, 16, 20, 25, 30, 40, 50)) -> None:
    for method, run in record["series"].items():
        print(f"{method} (lr {run['spec']['lr']:g}, seed {run['spec']['seed']}): step, ‖A‖, ‖B‖, ‖BA‖, ‖Δ(BA)‖/lr")
        for row in run["rows"]:
            if row["step"] in steps:
                print(f"  {row['step']:4d} {row['norm_A']:9.4f} {row['norm_B']:9.4f} {row['norm_BA']:9.4f} "
                      f"{row.get('step_BA_per_lr', float('nan')):10.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="lm", choices=sorted(TASKS))
    p.add_argument("--methods", default="lora,reflora,refactor_adam")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--until", type=int, default=50, help="probe up to this step (rounded up to an evaluation)")
    p.add_argument("--quick", action="store_true", help="the tiny random LLaMA and the quick recipe")
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    args = p.parse_args(argv)
    record = probe(args.task, args.methods.split(","), args.lr, args.seed, args.until, args.quick)
    show(record)
    target = args.out / "step_probe" / f"{args.task}-lr{args.lr:g}-s{args.seed}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(target, record, indent=1)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
