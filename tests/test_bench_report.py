"""BENCHMARKS.md sections are generated from the suites' JSON and spliced between markers."""

from __future__ import annotations

import json


def peer_record() -> dict:
    return {"suite": "peer", "quick": True, "seconds": 6.0, "targets": [
                {"name": "x / y", "value": 0.98, "limit": 1.0, "direction": ">=", "met": False, "note": ""}],
            "machine": {"cpu": "CPU", "logical_cpus": 2, "torch_threads": 1, "device": "cpu",
                        "load_average_1min": 0.1, "load_average_1min_end": 0.2,
                        "versions": {"torch": "t", "transformers": "tf", "peft": "p", "deepspeed": "d"}},
            "config": {"micro_batch": 2, "seq_len": 8},
            "results": {"tokens_per_step": 16, "rounds": 1,
                        "tokens_per_s": {c: {"median": 10.0, "q25": 9.0, "q75": 11.0, "n": 2}
                                         for c in ("reflora_ds lora", "reflora_ds reflora", "hf_trainer lora")},
                        "ratio_to_hf_trainer": {c: {"median": 0.98, "q25": 0.97, "q75": 0.99, "n": 1}
                                                for c in ("reflora_ds lora", "reflora_ds reflora")}}}


def test_report_splices_sections_between_markers(tmp_path):
    """`bench report` rewrites only the marked section of a suite with a JSON, and leaves the prose alone."""
    from typer.testing import CliRunner

    from reflora_ds.cli import app

    results = tmp_path / "bench_results"
    results.mkdir()
    record = peer_record()
    (results / "peer.json").write_text(json.dumps(record))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# B\nprose before\n<!-- bench:peer -->\nstale\n<!-- /bench:peer -->\nprose after\n"
                  "<!-- bench:zero -->\nuntouched\n<!-- /bench:zero -->\n")
    result = CliRunner().invoke(app, ["bench", "report", "--out", str(results), "--md", str(md)])
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert "stale" not in text and "prose before" in text and "prose after" in text and "untouched" in text
    assert "`python -m benchmarks peer --quick`" in text and "| x / y | 0.98 | >= 1.0 | **missed** |" in text
    assert "| reflora_ds reflora | 10 |" in text and "![peer](bench_results/peer.png)" in text


def test_a_record_that_aggregates_earlier_runs_names_their_command_not_its_own_time():
    """The convergence report takes seconds; its section must point at the study that took hours."""
    from benchmarks.markdown import section

    record = {**peer_record(), "reproduce": "`python -m benchmarks peer --stage 1` (2 runs, 1.5 CPU-hours)"}
    first = section(record).splitlines()[0]
    assert first == ("Reproduce: `python -m benchmarks peer --stage 1` (2 runs, 1.5 CPU-hours). "
                     "Results: `bench_results/peer.json`."), first
    assert "min here" in section(peer_record()).splitlines()[0]
