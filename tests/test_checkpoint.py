"""Checkpoints: atomic layout, finding the newest, exact resume, and SIGTERM (a Slurm preemption)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import (
    adapter_tensors,
    base_values,
    make_base,
    make_rows,
    metrics,
    run_cli,
    subprocess_env,
    write_config,
    write_rows,
)

from reflora_ds import checkpoint, stops
from reflora_ds.best import BestCheckpoint
from reflora_ds.config import ConfigError
from reflora_ds.metrics import WALL_CLOCK_KEYS

# --- finding checkpoints ----------------------------------------------------------------------


def fake_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    (path / checkpoint.TRAINER_STATE).write_text("{}")
    if complete:
        (path / checkpoint.COMPLETE).write_text(name)  # an earlier release's marker: no list of files
    return path


def test_only_complete_checkpoints_count(tmp_path):
    assert checkpoint.find_latest_complete(tmp_path) is None
    fake_checkpoint(tmp_path, "step-2")
    newest = fake_checkpoint(tmp_path, "step-10")
    fake_checkpoint(tmp_path, "step-12", complete=False)  # died before COMPLETE
    fake_checkpoint(tmp_path, ".tmp-step-14")  # died before the rename
    assert checkpoint.find_latest_complete(tmp_path) == newest  # by step number, not by name
    checkpoint.remove_stale(tmp_path)
    assert not (tmp_path / "checkpoints" / ".tmp-step-14").exists()
    checkpoint.prune(tmp_path, keep=1)
    assert [p.name for _, p in checkpoint.list_complete(tmp_path)] == ["step-10"]


def test_pruning_spares_the_protected_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, f"step-{step}")
    checkpoint.prune(tmp_path, keep=1, protect="checkpoints/step-2")
    assert [p.name for _, p in checkpoint.list_complete(tmp_path)] == ["step-2", "step-4"]
    checkpoint.prune(tmp_path, keep=1)
    assert [p.name for _, p in checkpoint.list_complete(tmp_path)] == ["step-4"]


def test_best_checkpoint_comparison():
    lowest = BestCheckpoint("eval_loss", greater_is_better=False)
    assert not lowest.consider(1, math.nan) and lowest.step is None  # a NaN never wins
    assert lowest.consider(1, 2.0) and lowest.consider(2, 1.5)
    assert not lowest.consider(3, 1.5)  # a tie keeps the earlier checkpoint
    assert not lowest.consider(4, 1.7)
    assert (lowest.step, lowest.value, lowest.checkpoint) == (2, 1.5, "checkpoints/step-2")
    highest = BestCheckpoint("eval_accuracy", greater_is_better=True)
    assert highest.consider(1, 0.25) and not highest.consider(2, 0.125) and highest.consider(3, 0.5)
    assert highest.step == 3
    # a record kept for another metric (or direction) does not carry over
    assert BestCheckpoint.restore(lowest.state(), "eval_loss", False) == lowest
    assert BestCheckpoint.restore(lowest.state(), "eval_accuracy", True).step is None
    assert BestCheckpoint.restore(None, "eval_loss", False).step is None


def test_resume_from_checkpoint_values(tmp_path):
    run = tmp_path / "run"
    assert checkpoint.resolve_resume(None, run) is None
    assert checkpoint.resolve_resume("auto", run) is None  # nothing yet: a fresh start
    step = fake_checkpoint(run, "step-4")
    assert checkpoint.resolve_resume("auto", run) == step
    assert checkpoint.resolve_resume(str(step), tmp_path / "elsewhere") == step
    assert checkpoint.resolve_resume(str(run), tmp_path / "elsewhere") == step
    assert checkpoint.resolve_resume(str(run / "checkpoints"), tmp_path / "elsewhere") == step
    with pytest.raises(ConfigError, match="neither a complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), run)
    incomplete = fake_checkpoint(tmp_path / "other", "step-1", complete=False)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        checkpoint.resolve_resume(str(incomplete.parent.parent), run)


# --- real runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    mp = pytest.MonkeyPatch()
    mp.setenv("REFLORA_DS_CACHE", str(root / "cache"))
    yield {"root": root, "base": make_base(root / "base"), "data": write_rows(root / "train.json", make_rows(40))}
    mp.undo()


@pytest.fixture(scope="module")
def interrupted(env):
    """A 6-step run (dropout on, linear schedule, RefLoRA active from step 2), its final
    adapter kept aside, then cut back to its step-2 checkpoint as if it had crashed there."""
    out = env["root"] / "run"
    config = write_config(env["root"] / "run.yaml", **base_values(env["base"], env["data"], out))
    first = run_cli(["train", config])
    assert first.exit_code == 0, first.output
    reference = {"adapter": adapter_tensors(out), "metrics": metrics(out)}
    for name in ("step-4", "step-6"):
        shutil.rmtree(out / "checkpoints" / name)
    shutil.rmtree(out / "adapter")
    return {"config": config, "out": out, "reference": reference}


def test_resumed_run_equals_the_uninterrupted_one(interrupted):
    out = interrupted["out"]
    stale = out / "checkpoints" / ".tmp-step-4"  # debris of a save the crash interrupted
    stale.mkdir()
    result = run_cli(["train", interrupted["config"]])  # resume_from_checkpoint: auto is the default
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "step-2 at step 2/6" in result.output
    assert not stale.exists()
    got, want = adapter_tensors(out), interrupted["reference"]["adapter"]
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    # the same curve, read as one run (throughput aside, which is wall-clock)
    got_curve, want_curve = metrics(out), interrupted["reference"]["metrics"]
    assert len(got_curve) == len(want_curve)
    for got_record, want_record in zip(got_curve, want_curve):
        for key in WALL_CLOCK_KEYS:
            got_record.pop(key, None), want_record.pop(key, None)
        assert got_record == pytest.approx(want_record, rel=1e-6)


def test_finished_run_is_not_trained_again_and_can_be_extended(interrupted):
    out = interrupted["out"]
    again = run_cli(["train", interrupted["config"]])
    assert again.exit_code == 0, again.output
    assert "already holds a finished run" in again.output and "loss before → after" in again.output
    longer = run_cli(["train", interrupted["config"], "--max-steps", "8"])
    assert longer.exit_code == 0, longer.output
    assert "at step 6/8" in longer.output
    assert [r["step"] for r in metrics(out)][-2:] == [7, 8]


def test_resume_refuses_other_optimizer_and_fresh_start_over_old_checkpoints(interrupted):
    other = run_cli(["train", interrupted["config"], "--optimizer", "reflora_s"])
    assert other.exit_code == 2 and "trained with method 'reflora'" in other.output
    fresh = run_cli(["train", interrupted["config"], "--resume-from-checkpoint", "null"])
    assert fresh.exit_code == 2 and "holds checkpoints of an earlier run" in fresh.output
    batch = run_cli(["train", interrupted["config"], "--micro-batch-size", "4"])
    assert batch.exit_code == 2 and "global batch" in batch.output


# --- SIGTERM ------------------------------------------------------------------------------------


def test_sigterm_saves_a_complete_checkpoint_that_resumes(env, tmp_path):
    out = tmp_path / "run"
    values = base_values(env["base"], env["data"], out, max_steps=5000, save_steps=0, eval_steps=0,
                         lr_scheduler="constant")
    config = write_config(tmp_path / "run.yaml", **values)
    proc = subprocess.Popen([sys.executable, "-m", "reflora_ds", "train", str(config)], env=subprocess_env(
        env["root"] / "cache"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == stops.PREEMPTED_EXIT_CODE == 143, output
    assert "stopped by SIGTERM" in output
    saved = checkpoint.find_latest_complete(out)
    assert saved is not None and not list((out / "checkpoints").glob(".tmp-*"))
    step = checkpoint.read_trainer_state(saved).global_step
    assert 1 <= step < 5000 and saved.name == f"step-{step}"
    assert not (out / "adapter").exists()

    result = run_cli(["train", config, "--max-steps", str(step + 2)])
    assert result.exit_code == 0, result.output
    assert f"at step {step}/{step + 2}" in result.output
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, step + 3))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# --- the best checkpoint across a resume ----------------------------------------------------------


@pytest.fixture(scope="module")
def best_run(env):
    """4 steps, evaluated and saved at every one, one checkpoint kept besides the best.

    greater_is_better on the loss makes the highest evaluation loss the best: the
    loss falls as training goes, so the best is an early checkpoint, which pruning
    must spare and a resumed run must remember.
    """
    out = env["root"] / "best"
    values = base_values(env["base"], env["data"], out, max_steps=4, eval_steps=1, save_steps=0,
                         save_total_limit=1, metric_for_best_model="eval_loss", greater_is_better=True)
    config = write_config(env["root"] / "best.yaml", **values)
    result = run_cli(["train", config])
    assert result.exit_code == 0, result.output
    return {"config": config, "out": out, "record": json.loads((out / "best_checkpoint.json").read_text()),
            "adapter": adapter_tensors(out, "best_adapter")}


def test_an_early_best_checkpoint_survives_pruning(best_run):
    out, record = best_run["out"], best_run["record"]
    evals = {r["step"]: r["eval_loss"] for r in metrics(out) if "eval_loss" in r and r["step"] > 0}
    best_step = max(evals, key=evals.get)
    assert best_step < 4, f"the evaluation loss did not fall: {evals}"
    assert (record["step"], record["value"], record["greater_is_better"]) == (best_step, evals[best_step], True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{best_step}", "step-4"]
    final = adapter_tensors(out)
    assert any(not torch.equal(best_run["adapter"][k], final[k]) for k in final)


def test_resume_keeps_the_best_record(best_run):
    """Extended from step 4 to 6: the record saved with step 4 still names the early best, and the
    best files, deleted as if a crash had lost them, are restored from it."""
    out, record = best_run["out"], best_run["record"]
    (out / "best_checkpoint.json").unlink()
    shutil.rmtree(out / "best_adapter")
    result = run_cli(["train", best_run["config"], "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    assert "at step 4/6" in result.output
    assert json.loads((out / "best_checkpoint.json").read_text()) == record
    restored = adapter_tensors(out, "best_adapter")
    assert restored.keys() == best_run["adapter"].keys()
    for key in restored:
        torch.testing.assert_close(restored[key], best_run["adapter"][key], rtol=0, atol=0)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{record['step']}", "step-6"]
    assert [r["step"] for r in metrics(out) if "eval_loss" in r] == [0, 1, 2, 3, 4, 5, 6]
    assert json.loads((out / "summary.json").read_text())["best"] == record
