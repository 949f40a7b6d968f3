"""Checkpoints: atomic saves, the newest complete one, pruning, resume, preemption.

Layout inside ``output_dir``::

    .lock                        held by the run using this folder (OutputLock)
    checkpoints/step-N/          one DeepSpeed checkpoint (tag dir), complete
        mp_rank_00_model_states.pt   ... DeepSpeed's files, plus in client_state:
                                     {"trainer": TrainerState, "reflora": method state}
        trainer_state.json       the same TrainerState, readable without torch
        trainable_fp32.safetensors   the trainable fp32 masters, for export without unpickling
        rng_state_rank{R}.pt     each rank's RNG streams (dropout)
        COMPLETE                 written last: the size of every other file in it
    adapter/                     the final PEFT adapter (export.export_adapter)

A save goes to a private ``checkpoints/.tmp-step-N-<token>`` on every rank;
after a barrier rank 0 writes COMPLETE and renames the folder to ``step-N``. A
crash mid-save leaves only a ``.tmp-*`` folder, which is never resumed from
and is removed by the next run. COMPLETE lists each file's size, so a
checkpoint damaged later (a truncated or emptied file) is recognised and
skipped in favour of the one before it. Pruning is a separate call, made by
the trainer after the save and after the best-checkpoint record (best.py) is
up to date, so that the record never names a checkpoint already deleted; a
pruned folder is renamed away before it is deleted. The checkpoints folder
must be on storage every rank sees (as DeepSpeed itself requires for ZeRO
shards).

DeepSpeed's files are pickles: loading them (resume) runs whatever code they
name, so resume only from checkpoints you wrote. Export reads
trainable_fp32.safetensors, which holds tensors only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import atomic, dist
from .config import ConfigError
from .dist import barrier, rank

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable_fp32.safetensors"
LOCK = ".lock"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or used, with what to do about it."""

# --- finding checkpoints ---------------------------------------------------------


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (None: nothing found).

    COMPLETE lists every file's size; a file missing or of another size (a
    truncated copy, a 0-byte file) is damage. Checkpoints of earlier releases
    have no list: only that trainer_state.json reads is checked.
    """
    try:
        manifest = json.loads((path / COMPLETE).read_text())
    except (OSError, json.JSONDecodeError):
        manifest = None
    for name, size in (manifest or {}).get("files", {}).items():
        found = path / name
        if not found.is_file():
            return f"{found} is missing"
        if found.stat().st_size != size:
            return f"{found} has {found.stat().st_size} bytes, {size} were written"
    try:
        json.loads((path / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{path / TRAINER_STATE} does not read ({err})"
    return None


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


def find_latest_complete(output_dir: str | Path, warn=None) -> Path | None:
    """The newest complete, undamaged checkpoint under ``output_dir``, or None.

    A damaged one is passed over, and ``warn`` (if given) told why.
    """
    for _, path in reversed(list_complete(output_dir)):
        problem = damage(path)
        if problem is None:
            return path
        if warn is not None:
            warn(f"warning: skipping the damaged checkpoint {path}: {problem}")
    return None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path, warn=None) -> Path | None:
    """What to resume from: None (start fresh), "auto" (newest in output_dir, if any) or a path.

    A path may name a checkpoint folder (``.../checkpoints/step-N``) or a run's
    output_dir (its newest complete checkpoint). Damaged checkpoints are passed
    over for "auto" and a run folder, refused when named.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "auto":
        return find_latest_complete(output_dir, warn)
    path = Path(resume_from_checkpoint).expanduser()
    if is_complete(path):
        problem = damage(path)
        if problem is not None:
            raise CheckpointError(f"resume_from_checkpoint: {path} is damaged: {problem}; name an earlier one")
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    if checkpoint_root(run_dir).is_dir():
        latest = find_latest_complete(run_dir, warn)
        if latest is None:
            raise CheckpointError(f"resume_from_checkpoint: no complete checkpoint in {checkpoint_root(run_dir)}")
        return latest
    raise CheckpointError(
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
    config: dict | None = None  # the resolved run configuration that wrote it
    data: str | None = None  # fingerprint of the tokenized training and evaluation data

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
    try:
        return TrainerState.from_dict(json.loads((path / TRAINER_STATE).read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / TRAINER_STATE} does not read ({err}); resume from an earlier "
                              "checkpoint, or remove this one") from None


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
    changed = changed_keys(saved.config, now.config)
    if saved.data is not None and now.data is not None and saved.data != now.data:
        changed.append("the training or evaluation data (its content)")
    if changed:
        raise ConfigError(
            f"resume_from_checkpoint: the run in this output_dir was trained with other settings: "
            f"{'; '.join(changed)}. These cannot change when a run resumes (only {', '.join(RESUMABLE_CHANGES)} "
            "can): restore them, or choose another output_dir"
        )


# Keys a resumed run may set differently from the run it continues: how long, how
# often to log, evaluate and save, and how the same global batch is split.
RESUMABLE_CHANGES = (
    "max_steps", "num_epochs", "output_dir", "resume_from_checkpoint", "logging_steps", "eval_steps", "save_steps",
    "save_total_limit", "report_to", "eval_accuracy", "eval_accuracy_mode", "eval_accuracy_limit",
    "metric_for_best_model", "greater_is_better", "deepspeed", "gradient_checkpointing", "micro_batch_size",
    "gradient_accumulation_steps", "skip_nonfinite_steps", "trust_remote_code",
    "data_path", "eval_data_path",  # the data's content is compared instead (TrainerState.data)
)


def changed_keys(saved: dict | None, now: dict | None) -> list[str]:
    """``key: saved → now`` for every key that differs and may not change on resume."""
    if not saved or not now:
        return []
    return [f"{key}: {saved.get(key)!r} → {now.get(key)!r}" for key in sorted(set(saved) | set(now))
            if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key)]


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


def save(engine, output_dir: str | Path, state: TrainerState, method_state: dict,
         trainable: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a checkpoint of step ``state.global_step`` atomically on every rank (a collective); returns its path.

    ``trainable``: the fp32 masters by parameter name (export.trainable_state_dict),
    written as safetensors beside DeepSpeed's files for export without unpickling.
    """
    step = state.global_step
    client_state = {"trainer": state.to_dict(), "reflora": method_state}
    root = checkpoint_root(output_dir)
    # A private name: never one that an earlier, interrupted save (or anyone else) is using.
    tmp_tag, tag = dist.broadcast_object(f".tmp-step-{step}-{uuid.uuid4().hex[:8]}"), f"step-{step}"
    tmp, final = root / tmp_tag, root / tag
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        torch.save(rng_state(), _rng_file(tmp, rank()))
        barrier()
        if rank() == 0:
            if trainable is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in trainable.items()}, tmp / TRAINABLE)
            (tmp / TRAINER_STATE).write_text(json.dumps(state.to_dict(), indent=2))
            sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            atomic.write_json(tmp / COMPLETE, {"tag": tag, "files": sizes}, durable=True)
            _put_in_place(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno != errno.ENOSPC:
            raise
        previous = find_latest_complete(output_dir)
        raise CheckpointError(
            f"no space left on {root} while saving step {step}; "
            + (f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists")
            + ": free space and run the same command again to resume") from None
    barrier()
    return final


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder to its name; the same step saved again replaces the old copy last."""
    old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    atomic.fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def prune(output_dir: str | Path, keep: int | None, protect: str | Path | None = None) -> None:
    """Keep only the newest ``keep`` complete checkpoints (None keeps all), and ``protect`` besides.

    ``protect`` names a checkpoint folder (the best one) that is kept however old.
    Each goes out of sight (renamed) before it is deleted, so a kill meanwhile
    leaves no half-deleted step-N folder.
    """
    if keep is None:
        return
    spared = Path(protect).name if protect is not None else None
    for _, path in list_complete(output_dir)[:-keep]:
        if path.name != spared:
            gone = path.with_name(f".old-{path.name}-{uuid.uuid4().hex[:8]}")
            os.rename(path, gone)
            shutil.rmtree(gone, ignore_errors=True)


def remove_stale(output_dir: str | Path) -> None:
    """Remove what interrupted saves and prunes left behind (``.tmp-*``, ``.old-*``, step folders
    without COMPLETE). Only the run holding the output_dir's lock may call this."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        incomplete = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir() and not is_complete(p)]
        for path in [*root.glob(".tmp-*"), *root.glob(".old-*"), *incomplete]:
            shutil.rmtree(path, ignore_errors=True)


# --- one run per output_dir ----------------------------------------------------------


class OutputLock:
    """An exclusive lock on output_dir for the whole run (rank 0 holds it; every rank learns the outcome).

    ``fcntl.flock`` on ``output_dir/.lock``: the kernel releases it when the
    holder dies however it dies, so a lock left by a killed run is never in
    the way. The file names the holder (host, pid, start) for the error a
    second run gets. A folder this lock created and nothing else used is
    removed again on release.
    """

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.handle = None
        self.created = False

    def __enter__(self) -> OutputLock:
        holder = None
        if rank() == 0:
            self.created = not self.output_dir.exists()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.output_dir / LOCK, "a+")
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.handle.truncate(0)
                self.handle.write(f"{socket.gethostname()} pid {os.getpid()} since "
                                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                self.handle.flush()
            except BlockingIOError:
                self.handle.seek(0)
                holder = self.handle.read().strip() or "another process"
                self.handle.close()
                self.handle = None
        holder = dist.broadcast_object(holder)
        if holder is not None:
            raise ConfigError(f"output_dir {self.output_dir} is in use by another run ({holder}); wait for it to "
                              "end, or choose another output_dir")
        return self

    def __exit__(self, *exc) -> bool:
        if self.handle is not None:
            self.handle.close()  # releases the lock
            self.handle = None
            if self.created and [p.name for p in self.output_dir.iterdir()] == [LOCK]:
                shutil.rmtree(self.output_dir, ignore_errors=True)
        return False


# --- loading ---------------------------------------------------------------------


def load(engine, path: Path) -> tuple[TrainerState, dict]:
    """Load a checkpoint into the engine, restore this rank's RNG; returns the trainer and method states."""
    try:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise CheckpointError(f"resume_from_checkpoint: {path} holds another configuration's run ({first}); "
                              "restore that run's settings, or choose another output_dir") from None
    if client_state is None:
        raise ConfigError(f"resume_from_checkpoint: DeepSpeed could not load {path}")
    rng = _rng_file(path, rank())
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return TrainerState.from_dict(client_state["trainer"]), client_state["reflora"]
