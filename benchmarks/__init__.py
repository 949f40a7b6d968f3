"""Benchmark suites behind ``reflora-ds bench SUITE [--quick] [--out DIR]``.

Each suite is one module with ``run(out: Path, quick: bool) -> dict``: it
writes ``<suite>.json`` (and a ``<suite>.png`` plot, except ``gpu`` which
writes its own files) into ``out``, prints its table and returns the JSON
payload; ``run_suite`` then renders each JSON's BENCHMARKS.md section as
``<suite>.md`` beside it (``reflora-ds bench report`` splices them in).
``--quick`` swaps SmolLM2 for a tiny random LLaMA and cuts the step counts, so
every suite finishes in well under a minute (the CI smoke test).

Modules are imported only when their suite runs: the suites pull in
DeepSpeed, bitsandbytes and the HF Trainer, which the rest of the CLI does
not need.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# Suite name -> module, in the order BENCHMARKS.md presents them.
SUITES = {
    "overhead": "reflora_ds.bench.overhead",
    "convergence": "reflora_ds.bench.convergence",
    "memory": "reflora_ds.bench.memory",
    "zero": "reflora_ds.bench.zero",
    "peer": "reflora_ds.bench.peer",
    "gpu": "reflora_ds.bench.gpu",
}

DEFAULT_OUT = Path("bench_results")


def run_suite(name: str, out: Path = DEFAULT_OUT, quick: bool = False) -> dict:
    """Run one suite; returns what it wrote to ``out/<name>.json``."""
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; choose one of {', '.join(SUITES)}")
    module = importlib.import_module(SUITES[name])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = module.run(out, quick)
    from .markdown import section

    for path in [out / f"{name}.json", *(out / f"{part}.json" for part in record["results"].get("parts_done", []))]:
        part = json.loads(path.read_text())
        (out / f"{path.stem}.md").write_text(section(part, "."))
    return record
