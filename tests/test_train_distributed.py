"""`reflora-ds train` under the deepspeed launcher: 2 CPU ranks, ZeRO-3, a 4-bit NF4 base.

One launch (``deepspeed --num_gpus 2 --module reflora_ds train CONFIG``) is
checked against its 1-rank twin (same global batch, ZeRO-3, in this process):
the same loss curve, eval losses and final adapter. The launch also shows that
the launcher's ``--local_rank`` argument is accepted, that only rank 0 prints
and writes metrics, that evaluation (loss and accuracy) with uneven shards does
not hang under ZeRO-3, and that checkpoints hold both ranks' shards and RNG streams.
"""

from __future__ import annotations

import subprocess
import sys
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

from reflora_ds.dist import free_port

pytestmark = pytest.mark.distributed

WORLD = 2
SETTINGS = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", deepspeed="zero3", lora_dropout=0.0, max_steps=4,
                save_steps=2, eval_steps=2, val_set_size=5)  # 5: eval shards of 3 and 2 rows


def launch_with_twin(root: Path, settings: dict) -> dict:
    """A 2-rank launch (1 sample × 2 accumulation × 2 ranks a step) and its 1-rank twin (2 × 2 × 1)."""
    base, data, cache = make_base(root / "base"), write_rows(root / "train.json", make_rows(40)), root / "cache"
    two = write_config(root / "two.yaml", **base_values(base, data, root / "two", micro_batch_size=1, **settings))
    one = write_config(root / "one.yaml", **base_values(base, data, root / "one", micro_batch_size=2, **settings))

    deepspeed, port = Path(sys.executable).parent / "deepspeed", free_port()
    cmd = [str(deepspeed), "--num_gpus", str(WORLD), "--master_port", str(port),
           "--module", "reflora_ds", "train", str(two)]
    proc = subprocess.run(cmd, env=subprocess_env(cache), capture_output=True, text=True, timeout=300)

    mp = pytest.MonkeyPatch()
    mp.setenv("REFLORA_DS_CACHE", str(cache))
    twin = run_cli(["train", one])
    mp.undo()
    return {"launch": proc, "two": root / "two", "twin": twin, "one": root / "one", "port": port}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return launch_with_twin(tmp_path_factory.mktemp("dist"), SETTINGS)


def test_two_rank_run_leaves_no_shared_memory_behind(runs):
    """DeepSpeed's CPU all-reduce makes a ~69 MB /dev/shm segment per rank and never removes it; we unlink ours."""
    assert runs["launch"].returncode == 0
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{runs['port']}_*"))
    assert not left, left


def test_two_rank_zero3_4bit_run_completes(runs):
    proc = runs["launch"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("eval loss before → after") == 1  # rank 0 alone reports
    assert [r["step"] for r in metrics(runs["two"])] == [0, 1, 2, 3, 4]  # written once, not per rank
    for step in ("step-2", "step-4"):
        path = runs["two"] / "checkpoints" / step
        assert (path / "COMPLETE").is_file()
        names = {p.name for p in path.iterdir()}
        for rank in range(WORLD):
            assert f"rng_state_rank{rank}.pt" in names
            assert any(n.startswith(f"zero_pp_rank_{rank}_") and n.endswith("optim_states.pt") for n in names), names


def test_two_ranks_match_their_one_rank_twin(runs):
    assert runs["launch"].returncode == 0, runs["launch"].stderr[-4000:]
    assert runs["twin"].exit_code == 0, runs["twin"].output
    two, one = metrics(runs["two"]), metrics(runs["one"])
    for key in ("loss", "eval_loss", "eval_accuracy", "lr"):
        curve = lambda records: [r[key] for r in records if key in r]  # noqa: E731
        assert [r["step"] for r in two if key in r] == [r["step"] for r in one if key in r]
        assert curve(two) == pytest.approx(curve(one), rel=1e-5), key
    a, b = adapter_tensors(runs["two"]), adapter_tensors(runs["one"])
    assert a.keys() == b.keys() and any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


PACKED = dict(deepspeed="zero3", sample_packing=True, cutoff_len=256, lora_dropout=0.0, max_steps=2, save_steps=0,
              eval_steps=1, val_set_size=5)


@pytest.fixture(scope="module")
def packed_runs(tmp_path_factory):
    """Packed sequences under ZeRO-3 at 2 ranks, and their 1-rank twin."""
    return launch_with_twin(tmp_path_factory.mktemp("packed"), PACKED)


def test_packed_zero3_two_ranks_match_their_one_rank_twin(packed_runs):
    """The global target-token count (and so the loss's normalisation) is exact with packed sequences."""
    assert packed_runs["launch"].returncode == 0, packed_runs["launch"].stderr[-4000:]
    assert packed_runs["twin"].exit_code == 0, packed_runs["twin"].output
    assert "packed into" in packed_runs["twin"].output
    two, one = metrics(packed_runs["two"]), metrics(packed_runs["one"])
    for key in ("loss", "eval_loss"):
        curve = lambda records: [r[key] for r in records if key in r]  # noqa: E731
        assert len(curve(one)) >= 2 and curve(two) == pytest.approx(curve(one), rel=1e-5), key
    a, b = adapter_tensors(packed_runs["two"]), adapter_tensors(packed_runs["one"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
