"""Small runs for the training tests: a tiny LLaMA saved as an HF folder, tiny instruction data, configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def make_base(path: Path) -> Path:
    from tiny_models import tiny_llama

    tiny_llama(path, seed=0)
    return path


def make_rows(n: int) -> list[dict]:
    """Responses of different lengths, so that how a batch is split changes a per-batch mean."""
    return [{"instruction": f"Question {i}: which answer is right?", "input": "" if i % 3 else f"context {i}",
             "output": f"the correct answer is answer{i % 4 + 1}" + " indeed" * (i % 5),
             "answer": f"answer{i % 4 + 1}"}
            for i in range(n)]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows))
    return path


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def base_values(base: Path, data: Path, output_dir: Path, **overrides) -> dict:
    """A run of a few milliseconds per step: r=4, 2 × 2 samples per step, jsonl only."""
    values = dict(
        base_model=str(base), data_path=str(data), output_dir=str(output_dir), val_set_size=6,
        lora_r=4, lora_alpha=8, lora_dropout=0.1, method="reflora", refactor_warmup=2,
        learning_rate=2e-3, lr_scheduler="linear", warmup_steps=1, micro_batch_size=2,
        gradient_accumulation_steps=2, max_steps=6, logging_steps=1, eval_steps=3, save_steps=2,
        save_total_limit=None, report_to=["jsonl"], seed=7,
    )
    values.update(overrides)
    return values


def run_cli(args: list[str]):
    from typer.testing import CliRunner

    from reflora_ds.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def adapter_tensors(output_dir: Path, name: str = "adapter") -> dict:
    """The tensors of a run's final adapter (or of another adapter folder in output_dir, e.g. best_adapter)."""
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / name / "adapter_model.safetensors"))


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


# Set in this process once an in-process run has joined its world of one.
_WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(cache: Path) -> dict:
    """The environment for a trainer in a child process: its own world, this cache."""
    env = {k: v for k, v in os.environ.items() if k not in _WORLD_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "REFLORA_DS_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
