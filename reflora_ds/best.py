"""The best checkpoint of a run by an evaluation metric (HF Trainer's metric_for_best_model).

With ``metric_for_best_model`` set, every evaluation saves a checkpoint and the
one that scored best so far is remembered:

    output_dir/best_checkpoint.json   metric, greater_is_better, value, step, and the
                                      checkpoint and adapter folders (relative to output_dir)
    output_dir/best_adapter/          that checkpoint's PEFT adapter

The best checkpoint is never pruned by save_total_limit. The record also
travels inside every checkpoint's trainer state, so a resumed run goes on
from the record of the step it resumes from; the files in output_dir are
only its copy for people and scripts to read.

Ties keep the earlier checkpoint, a NaN never wins, and the evaluation before
training (step 0) is not a candidate: there is no checkpoint of it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .checkpoint import CHECKPOINTS

BEST_RECORD = "best_checkpoint.json"
BEST_ADAPTER = "best_adapter"


@dataclass
class BestCheckpoint:
    """The best evaluation so far: its metric and direction, then its step and value (None before any)."""

    metric: str
    greater_is_better: bool
    step: int | None = None
    value: float | None = None

    def consider(self, step: int, value: float | None) -> bool:
        """Take (step, value) as the new best if it beats the current one; True if it did."""
        if value is None or not math.isfinite(value):
            return False
        if self.value is not None:
            better = value > self.value if self.greater_is_better else value < self.value
            if not better:
                return False
        self.step, self.value = step, value
        return True

    @property
    def checkpoint(self) -> str | None:
        """The best checkpoint's folder, relative to output_dir."""
        return None if self.step is None else f"{CHECKPOINTS}/step-{self.step}"

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def restore(cls, state: dict | None, metric: str, greater_is_better: bool) -> BestCheckpoint:
        """The record saved in a checkpoint, or a fresh one if it tracked another metric (or none)."""
        fresh = cls(metric, greater_is_better)
        if not state or (state.get("metric"), state.get("greater_is_better")) != (metric, greater_is_better):
            return fresh
        return cls(**state)

    def record(self) -> dict:
        """What best_checkpoint.json holds."""
        return {**self.state(), "checkpoint": self.checkpoint, "adapter": BEST_ADAPTER}

    def write(self, output_dir: str | Path) -> Path:
        """best_checkpoint.json, replaced atomically (readers never see half a file)."""
        path = Path(output_dir) / BEST_RECORD
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.record(), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


def read_record(output_dir: str | Path) -> dict | None:
    """best_checkpoint.json of a run, or None if it has none."""
    path = Path(output_dir) / BEST_RECORD
    return json.loads(path.read_text()) if path.is_file() else None
