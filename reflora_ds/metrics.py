"""What a training run reports: printed lines, the progress bar, metrics.jsonl, TensorBoard, the loss plot, the summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import dist
from .checkpoint import ADAPTER

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_PLOT = "loss.png"

# The order of the keys in a metrics record (others follow).
# Record keys measured by the clock: they differ between runs that are otherwise the same.
WALL_CLOCK_KEYS = ("tokens_per_s", "target_tokens_per_s", "step_seconds")
_KEY_ORDER = ("step", "epoch", "loss", "eval_loss", "eval_accuracy", "lr", "tokens_per_s", "refactor_fallbacks")


def quiet_libraries() -> None:
    """One progress bar (ours): no per-library bars for cache writes and weight loading."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def printer(rank: int):
    """``log(message)``: printed by rank 0 only."""

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    return log


def progress_bar(rank: int, total: int, initial: int):
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, unit="step", disable=rank != 0, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30, desc="train")


def ordered(record: dict) -> dict:
    return {k: record[k] for k in _KEY_ORDER if k in record} | record


class Window:
    """Training loss and throughput since the last logged step (this rank's share).

    Throughput counts the tokens processed (padding excluded) and the target
    tokens (those the loss is computed on), per second of forward, backward and
    optimizer step.
    """

    def __init__(self):
        self.loss, self.steps, self.tokens, self.targets, self.seconds = 0.0, 0, 0, 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float, targets: int = 0) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        self.tokens, self.targets, self.seconds = self.tokens + tokens, self.targets + targets, self.seconds + seconds

    def flush(self, device) -> dict:
        """The window's global loss (sum of the ranks' shares) and throughput; then start a new one."""
        loss, tokens, targets = dist.all_reduce([self.loss, self.tokens, self.targets], device)
        (seconds,) = dist.all_reduce([self.seconds], device, op="max")
        seconds = max(seconds, 1e-9)
        record = {"loss": loss / max(self.steps, 1), "tokens_per_s": tokens / seconds,
                  "target_tokens_per_s": targets / seconds, "step_seconds": seconds / max(self.steps, 1)}
        self.__init__()
        return record


class MetricsLog:
    """metrics.jsonl (always: the loss curve and the summary are drawn from it) and TensorBoard.

    Written by rank 0. A resumed run first drops the records past its
    checkpoint, so the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path = output_dir / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        kept = [r for r in self.records() if r["step"] <= resume_step] if resume_step is not None else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
                    self.writer.add_scalar(tag, value, record["step"])
            self.writer.flush()

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_records(output_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return MetricsLog(output_dir, enabled=False, tensorboard=False, resume_step=None).records()


def is_finished(output_dir: Path) -> bool:
    """A run's ending is complete: its adapter and, written last, summary.json."""
    adapter = output_dir / ADAPTER
    return (output_dir / SUMMARY_FILE).is_file() and (adapter / "adapter_model.safetensors").is_file() \
        and (adapter / "adapter_config.json").is_file()


def fallback_warning(new: int, step: int, refactor_warmup: int, layers: int) -> str | None:
    """Refactor fallbacks past the first refactored step mean degenerate or overflowing factors: say so."""
    if new <= 0 or step <= refactor_warmup + 1:
        return None
    return (f"warning: the refactor fell back to the identity {new} times since the last log (step {step}, "
            f"{layers} layers): zero, rank-deficient or overflowing factors; is the learning rate too high?")


def plot_loss(records: list[dict], path: Path) -> Path:
    """Training loss per logged step, and evaluation loss where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    eval_pts = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss", lw=1.2)
    if eval_pts:
        ax.plot(*zip(*eval_pts), "o--", label="eval loss", ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def describe_scores(scores: dict) -> str:
    return ", ".join(f"{key.removeprefix('eval_')} {value:.4f}" for key, value in scores.items())


def before_after(state, scored: str | None) -> str:
    """The closing lines: loss (and accuracy, with how it was scored) before and after training."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    text = f"{state.loss_kind} loss before → after: {fmt(state.loss_before)} → {fmt(state.loss_after)}"
    if state.accuracy_before is not None or state.accuracy_after is not None:
        how = f" ({scored})" if scored else ""
        text += f"\neval accuracy{how} before → after: {fmt(state.accuracy_before)} → {fmt(state.accuracy_after)}"
    return text


def summary(status: str, state, tracker, output_dir: Path, ckpt: Path | None, started: float) -> dict:
    """summary.json: how the run ended, its loss and accuracy before and after, where things are."""
    return {
        "status": status,
        "global_step": state.global_step,
        "total_steps": state.total_steps,
        "loss_kind": state.loss_kind,
        "loss_before": state.loss_before,
        "loss_after": state.loss_after,
        "accuracy_before": state.accuracy_before,
        "accuracy_after": state.accuracy_after,
        "best": tracker.record() if tracker is not None and tracker.step is not None else None,
        "output_dir": str(output_dir),
        "checkpoint": str(ckpt) if ckpt else None,
        "adapter": str(output_dir / ADAPTER) if status != "preempted" else None,
        "wall_time_s": round(time.time() - started, 1),
    }
