"""The learning-rate schedule: a multiplier per optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Learning-rate multiplier per optimizer step: linear warmup, then constant, linear or cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
