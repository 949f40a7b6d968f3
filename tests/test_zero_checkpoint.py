"""DeepSpeed checkpoints of a RefLoRA run: LoRA-sized, SIGKILL-safe, exact to resume, any world size.

Every resumed run is compared with the uninterrupted single-process reference
(fp32, ‖ΔW − ΔW_ref‖_F / ‖ΔW_ref‖_F ≤ 1e-5 per layer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reflora_ds.dist import free_port

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "dist"))
import checkpoint_worker as CW  # noqa: E402
import equivalence_worker as W  # noqa: E402
from test_zero import max_rel_dev, reference  # noqa: E402

pytestmark = pytest.mark.distributed
STEPS, SAVE_AT = 6, 3
WORKER = HERE / "dist" / "checkpoint_worker.py"


def command(world: int, *args) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()),
            str(WORKER), "--steps", str(STEPS), *map(str, args)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}


def run(world: int, *args) -> None:
    proc = subprocess.run(command(world, *args), env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def run_until_saved_then_kill(world: int, ckpt: Path, *args) -> None:
    """Start a run that saves after step SAVE_AT, then SIGKILL every process of it."""
    proc = subprocess.Popen(command(world, "--ckpt", ckpt, "--save-at", SAVE_AT, "--hang-after-save", *args),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (ckpt / "SAVED").exists():
        assert proc.poll() is None, f"run ended ({proc.returncode}) before its checkpoint"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def resumed_matches_reference(out: Path, method: str) -> float:
    result = json.loads(out.read_text())
    assert result["steps_done"] == STEPS
    assert sorted(map(int, result["losses"])) == list(range(SAVE_AT, STEPS))  # really resumed
    ref = reference(method, W.MICRO * CW.GLOBAL_MICROS, steps=STEPS)
    resumed_losses = [result["losses"][str(t)] for t in range(SAVE_AT, STEPS)]
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(ref["losses"][SAVE_AT:]), rtol=1e-5, atol=0)
    dev = max_rel_dev(result, ref)
    assert dev <= 1e-5
    return dev


def lora_state_bytes() -> tuple[int, int]:
    model = W.build_model()
    lora = sum(p.numel() * 4 for n, p in model.named_parameters() if p.requires_grad)
    base = sum(p.numel() * 4 for n, p in model.named_parameters() if not p.requires_grad)
    return lora, base


@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_after_checkpoint_then_resume_continues_exactly(tmp_path, stage):
    ckpt = tmp_path / "ckpt"
    run_until_saved_then_kill(2, ckpt, "--stage", stage, "--method", "reflora_s", "--out", tmp_path / "killed.json")
    assert not (tmp_path / "killed.json").exists()

    # the checkpoint holds the LoRA state only
    tag = ckpt / f"step{SAVE_AT}"
    states = torch.load(next(tag.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    module = states["module"] or {}
    assert all("lora_" in name for name in module), [n for n in module if "lora_" not in n]
    assert states["reflora"] == {"method": "reflora_s", "steps_done": SAVE_AT,
                                 "stats": states["reflora"]["stats"]}
    lora, base = lora_state_bytes()
    size = sum(f.stat().st_size for f in tag.iterdir())
    # fp32 weights + master + two Adam moments, plus pickling overhead; the base is excluded
    assert size < 4 * lora + 96_000, (size, lora, base)
    assert size < lora + base  # a checkpoint with the frozen base would be larger

    run(2, "--stage", stage, "--method", "reflora_s", "--ckpt", ckpt, "--resume", f"step{SAVE_AT}",
        "--out", tmp_path / "resumed.json")
    resumed_matches_reference(tmp_path / "resumed.json", "reflora_s")


def convert_to_universal(ckpt: Path, tag: str) -> str:
    out = f"{tag}_universal"
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(ckpt / tag), "--output_folder", str(ckpt / out), "--inject_missing_state"],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("stage,saved_world,resumed_world", [(2, 2, 1), (3, 1, 2)])
def test_resume_at_another_world_size_through_a_universal_checkpoint(tmp_path, stage, saved_world, resumed_world):
    ckpt = tmp_path / "ckpt"
    run(saved_world, "--stage", stage, "--method", "reflora", "--ckpt", ckpt, "--save-at", SAVE_AT,
        "--out", tmp_path / "first.json")
    universal = convert_to_universal(ckpt, f"step{SAVE_AT}")
    run(resumed_world, "--stage", stage, "--method", "reflora", "--ckpt", ckpt, "--resume", universal,
        "--universal", "--out", tmp_path / "resumed.json")
    resumed_matches_reference(tmp_path / "resumed.json", "reflora")
