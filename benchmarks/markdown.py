"""BENCHMARKS.md sections rendered from a suite's JSON.

A suite's section is generated, never typed: the command that reproduces it,
the machine, the suite's own tables (the ones it prints, captured from
``print_table``), its targets and its plot.  ``update_benchmarks`` splices the
sections into BENCHMARKS.md between ``<!-- bench:SUITE -->`` and
``<!-- /bench:SUITE -->`` markers, so the prose around them (the reading of
the figures) stays hand-written.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

from . import common

VERDICT = {True: "met", False: "**missed**", None: "not measured"}


def tables_of(suite: str, record: dict) -> list[tuple[str, list[str], list[list]]]:
    """The tables the suite prints for this record, as (title, columns, rows)."""
    from . import SUITES

    module = importlib.import_module(SUITES[suite[4:] if suite.startswith("gpu_") else suite])
    with common.capture_tables() as captured:
        module.show(record)
    return [t for t in captured if t[0] != "targets"]


def section(record: dict, results_dir: str = "bench_results") -> str:
    m = record["machine"]
    load = f"load {m.get('load_average_1min')} → {m.get('load_average_1min_end')}"
    # A suite that aggregates runs trained earlier (the convergence study) says how to train those instead.
    reproduce = record.get("reproduce") or (
        f"`python -m benchmarks {record['suite']}{' --quick' if record['quick'] else ''}` "
        f"({record['seconds'] / 60:.1f} min here)")
    lines = [
        f"Reproduce: {reproduce}. Results: `{results_dir}/{record['suite']}.json`.",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch thread(s), "
        f"device {m['device']}, {load}; torch {m['versions']['torch']}, transformers "
        f"{m['versions']['transformers']}, peft {m['versions']['peft']}, deepspeed {m['versions']['deepspeed']}.",
        "",
        "Configuration: " + ", ".join(f"{k} {_inline(v)}" for k, v in record["config"].items()
                                      if not isinstance(v, dict)) + ".",
        "",
    ]
    for title, columns, rows in tables_of(record["suite"], record):
        lines += [f"*{title}*", "", *markdown_table(columns, rows), ""]
    if record["targets"]:
        rows = [[t["name"], t["value"], f"{t['direction']} {t['limit']}", VERDICT[t["met"]], t.get("note", "")]
                for t in record["targets"]]
        lines += ["*Targets*", "", *markdown_table(["target", "measured", "limit", "verdict", "note"], rows), ""]
    for figure in record.get("figures", [f"{record['suite']}.png"]):
        lines.append(f"![{Path(figure).stem}]({(Path(results_dir) / figure).as_posix()})")
    return "\n".join(lines).rstrip() + "\n"


def markdown_table(columns: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(common.cell(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return out


def _inline(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def update_benchmarks(results_dir: Path, md_path: Path) -> list[str]:
    """Regenerate every marked section of ``md_path`` whose ``SUITE.json`` is in ``results_dir``.

    Returns the suites updated.  A marker pair without a JSON is left as it
    is; a JSON without a marker pair is skipped, not appended (where a
    section goes is an editorial choice).
    """
    text = md_path.read_text()
    updated = []
    for path in sorted(Path(results_dir).glob("*.json")):
        suite = path.stem
        pattern = re.compile(rf"(<!-- bench:{re.escape(suite)} -->\n).*?(<!-- /bench:{re.escape(suite)} -->)", re.S)
        if not pattern.search(text):
            continue
        record = json.loads(path.read_text())
        body = section(record, os.path.relpath(results_dir, md_path.parent))
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
        updated.append(suite)
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, md_path)
    return updated
