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
from dataclasses import asdict, dataclass
from pathlib import Path

from . import atomic
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
        return atomic.write_json(Path(output_dir) / BEST_RECORD, self.record(), durable=True)


def read_record(output_dir: str | Path) -> dict | None:
    """best_checkpoint.json of a run, or None if it has none."""
    path = Path(output_dir) / BEST_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def publish(engine, tracker: BestCheckpoint, output_dir: Path, base_source: str, cfg, log) -> None:
    """A new best checkpoint: its adapter into best_adapter/, then best_checkpoint.json (call on all ranks)."""
    from . import dist
    from .export import export_adapter

    export_adapter(engine, output_dir / BEST_ADAPTER, base_model=base_source, run_config=cfg)
    if dist.is_main():
        tracker.write(output_dir)
    log(f"new best {tracker.metric} {tracker.value:.4f} at step {tracker.step}")


def resume(state: dict | None, cfg, output_dir: Path, log) -> BestCheckpoint:
    """The best record as of the checkpoint resumed from, with output_dir's best files brought in line.

    The files can disagree with it after a crash between a save and their
    update, or after resuming from an older checkpoint than the newest: the
    record in the checkpoint wins. (From a stage-0 bf16 checkpoint the
    re-exported adapter holds the bf16 weights: no fp32 master is stored by name.)
    """
    from . import dist
    from .checkpoint import is_complete
    from .export import export_from_checkpoint

    tracker = BestCheckpoint.restore(state, cfg.metric_for_best_model, cfg.greater_is_better)
    if tracker.step is None:
        return tracker
    if not is_complete(output_dir / tracker.checkpoint):
        log(f"the best checkpoint {tracker.checkpoint} is gone; the best is chosen afresh from here on")
        return BestCheckpoint(cfg.metric_for_best_model, cfg.greater_is_better)
    if dist.is_main() and read_record(output_dir) != tracker.record():
        # The run's own checkpoint (resume trusts it too); earlier releases wrote no safetensors copy.
        export_from_checkpoint(output_dir / tracker.checkpoint, output_dir / BEST_ADAPTER, cfg, trust_checkpoint=True)
        tracker.write(output_dir)
    return tracker
