"""Checkpoints: atomic saves, the newest complete one, pruning, resume, preemption.

Layout inside ``output_dir``::

    checkpoints/step-N/          one DeepSpeed checkpoint (tag dir), complete
        mp_rank_00_model_states.pt   ... DeepSpeed's files, plus in client_state:
                                     {"trainer": loop position, "reflora": method state}
        trainer_state.json       the same loop position, readable without torch
        rng_state_rank{R}.pt     each rank's RNG streams (dropout)
        COMPLETE                 written last
    adapter/                     the final PEFT adapter (export.export_adapter)

A save goes to ``checkpoints/.tmp-step-N`` on every rank; after a barrier rank 0
writes COMPLETE and renames the folder to ``step-N``. A crash mid-save leaves
only a ``.tmp-*`` folder, which is never resumed from and is removed by the
next run. Pruning is a separate call, made by the trainer after the save and
after the best-checkpoint record (best.py) is up to date, so that the record
never names a checkpoint already deleted. The checkpoints folder must be on
storage every rank sees (as DeepSpeed itself requires for ZeRO shards).

Preemption: SIGTERM sets a flag; at the next optimizer-step boundary every
rank agrees to stop, a checkpoint is saved and the command exits with status
143 (128 + SIGTERM, so requeue wrappers see a stopped, resumable run).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import atomic
from .config import ConfigError
from .dist import barrier, rank

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Exit status of a run stopped by SIGTERM after saving: 128 + SIGTERM, the
# shell's convention for "terminated", so requeue wrappers see it was stopped.
PREEMPTED_EXIT_CODE = 143


# --- finding checkpoints ---------------------------------------------------------


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def list_complete(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest_complete(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    found = list_complete(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """What to resume from: None (start fresh), "auto" (newest in output_dir, if any) or a path.

    A path may name a checkpoint folder (``.../checkpoints/step-N``) or a run's
    output_dir (its newest complete checkpoint).
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "auto":
        return find_latest_complete(output_dir)
    path = Path(resume_from_checkpoint).expanduser()
    if is_complete(path):
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    if checkpoint_root(run_dir).is_dir():
        latest = find_latest_complete(run_dir)
        if latest is None:
            raise ConfigError(f"resume_from_checkpoint: no complete checkpoint in {checkpoint_root(run_dir)}")
        return latest
    raise ConfigError(
        f"resume_from_checkpoint: {resume_from_checkpoint} is neither a complete checkpoint "
        f"(OUTPUT_DIR/{CHECKPOINTS}/step-N with a {COMPLETE} file) nor a run folder holding one"
    )


@dataclass
class TrainerState:
    """What a checkpoint records about the run besides weights and optimizer: where the loop is,
    what it was run with, and what it has measured.

    ``save`` writes it twice from this one object: into DeepSpeed's client
    state (what ``load`` restores) and as trainer_state.json (readable without
    torch, e.g. to decide whether a run is finished before loading a model).
    """

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in this epoch
    global_step: int = 0  # optimizer steps done in all
    total_steps: int = 0
    world_size: int = 1
    global_batch_size: int = 0
    method: str = "reflora"
    loss_kind: str = "train"  # "eval" when there is an evaluation set
    loss_before: float | None = None
    loss_after: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    best: dict | None = None  # best.BestCheckpoint.state()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainerState:
        data = dict(data)
        data.update(data.pop("position", {}))  # the layout of earlier releases
        if "optimizer" in data:
            data["method"] = data.pop("optimizer")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def read_trainer_state(path: Path) -> TrainerState:
    return TrainerState.from_dict(json.loads((path / TRAINER_STATE).read_text()))


def check_compatible(saved: TrainerState, now: TrainerState) -> None:
    """A checkpoint this run can resume from: the same world size, global batch and method."""
    if saved.world_size != now.world_size:
        raise ConfigError(
            f"resume_from_checkpoint: the checkpoint was written by {saved.world_size} ranks, this run has "
            f"{now.world_size}; resume with {saved.world_size} ranks, or convert it with DeepSpeed's universal "
            "checkpoint (python -m deepspeed.checkpoint.ds_to_universal)"
        )
    if saved.global_batch_size != now.global_batch_size:
        raise ConfigError(
            f"resume_from_checkpoint: the checkpoint used a global batch of {saved.global_batch_size}, this "
            f"run {now.global_batch_size}; keep micro_batch_size × gradient_accumulation_steps × ranks the same "
            "to resume"
        )
    if saved.method != now.method:
        raise ConfigError(f"resume_from_checkpoint: the checkpoint was trained with method "
                          f"{saved.method!r}, this run uses {now.method!r}")


# --- RNG streams -----------------------------------------------------------------
# Per rank, since dropout draws differ between ranks; DeepSpeed's client_state
# is written by rank 0 only, so each rank keeps its own small file.


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_state_rank{rank}.pt"


# --- saving ----------------------------------------------------------------------


def save(engine, output_dir: str | Path, state: TrainerState, method_state: dict) -> Path:
    """Save a checkpoint of step ``state.global_step`` atomically on every rank (a collective); returns its path."""
    step = state.global_step
    client_state = {"trainer": state.to_dict(), "reflora": method_state}
    root = checkpoint_root(output_dir)
    tmp_tag, tag = f".tmp-step-{step}", f"step-{step}"
    tmp, final = root / tmp_tag, root / tag
    if rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)  # debris of an earlier, interrupted save of this step
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), _rng_file(tmp, rank()))
    barrier()
    if rank() == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(state.to_dict(), indent=2))
        atomic.write_text(tmp / COMPLETE, f"{tag}\n", durable=True)
        old = root / f".old-{tag}"
        if final.exists():  # the same step saved again: set the old copy aside until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        atomic.fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def prune(output_dir: str | Path, keep: int | None, protect: str | Path | None = None) -> None:
    """Keep only the newest ``keep`` complete checkpoints (None keeps all), and ``protect`` besides.

    ``protect`` names a checkpoint folder (the best one) that is kept however old.
    """
    if keep is None:
        return
    spared = Path(protect).name if protect is not None else None
    for _, path in list_complete(output_dir)[:-keep]:
        if path.name != spared:
            shutil.rmtree(path, ignore_errors=True)


def remove_stale(output_dir: str | Path) -> None:
    """Remove what interrupted saves left behind (``.tmp-*``, ``.old-*`` folders)."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for path in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
            shutil.rmtree(path, ignore_errors=True)


# --- loading ---------------------------------------------------------------------


def load(engine, path: Path) -> tuple[TrainerState, dict]:
    """Load a checkpoint into the engine, restore this rank's RNG; returns the trainer and method states."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise ConfigError(f"resume_from_checkpoint: DeepSpeed could not load {path}")
    rng = _rng_file(path, rank())
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return TrainerState.from_dict(client_state["trainer"]), client_state["reflora"]


# --- preemption ------------------------------------------------------------------


class PreemptionGuard:
    """Turns SIGTERM (a Slurm preemption, a launcher's shutdown) into a flag.

    The loop checks ``requested`` at each optimizer-step boundary, where all
    ranks agree (via the step's all-reduce) to save and stop together.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
