"""Every benchmark suite's --quick version runs and writes sane JSON and a plot (no timing assertions).

Each suite runs in its own process, as a user would run it: the suites start
DeepSpeed (which sets launcher variables) and child processes, none of which
may leak into other tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path

import pytest

# Selectable on their own: `pytest -m bench`.
pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent
_WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_quick(suite: str, tmp_path: Path) -> dict:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in _WORLD_VARS}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", REFLORA_DS_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", suite, "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert proc.returncode == 0, f"{suite}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / f"{suite}.json").read_text()), out


def check_common(record: dict, suite: str, out: Path, png: str | None = None, figures: tuple = ()) -> None:
    assert record["suite"] == suite and record["quick"] is True
    assert {"machine", "config", "results", "targets", "seconds"} <= set(record)
    assert record["machine"]["versions"]["torch"]
    for t in record["targets"]:
        assert {"name", "value", "limit", "direction", "met"} <= set(t)
        assert t["met"] in (True, False, None)
    for name in figures or (png or suite,):
        assert 1_000 < (out / f"{name}.png").stat().st_size < 300_000
    section = (out / f"{png or suite}.md").read_text()  # its BENCHMARKS.md section, rendered from the JSON
    assert f"python -m benchmarks {record['suite']} --quick" in section and f"![{png or suite}]" in section
    assert "\n| " in section  # at least one table


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_overhead_quick(tmp_path):
    record, out = run_quick("overhead", tmp_path)
    check_common(record, "overhead", out)
    step, ref = record["results"]["step"], record["results"]["refactor"]
    for clock in ("wall", "cpu"):
        for method in ("lora", "reflora", "reflora_s"):
            assert finite_positive(step["step_seconds"][clock][method]["median"])
        assert finite_positive(step["ratio"][clock]["reflora"]["median"])
    assert all(finite_positive(v) for v in step["component_ratio"].values())
    assert ref["shape"]["modules"] == 10 and ref["fallbacks"] == 0
    assert all(finite_positive(v["median"]) for v in ref["seconds"].values())
    assert ref["max_rel_diff_S_vs_stacked"] < 1e-6  # the earlier Gram routine gives the same refactor
    assert len(record["targets"]) == 5


def test_convergence_quick(tmp_path):
    record, out = run_quick("convergence", tmp_path)
    check_common(record, "convergence", out, figures=("convergence", "convergence_diagnostics"))
    runs = sorted((out / "convergence").glob("*.json"))
    assert len(runs) == 2 * 3 * 2  # tasks × methods × seeds, one JSON each
    run = json.loads(runs[0].read_text())
    assert {"task", "method", "lr", "seed", "steps", "refactor_warmup", "eval_curve", "diagnostics", "test",
            "machine"} <= set(run)
    from benchmarks.bf16_cpu import needs_fp32_linears

    assert run["dtype"] == "bfloat16" and run["bf16_linears_in_fp32"] is needs_fp32_linears("bfloat16", "cpu")
    assert run["eval_curve"][0][0] == 0 and run["eval_curve"][-1][0] == run["steps"]
    results = record["results"]
    assert results["done_of_stage1"] == results["planned_stage1"] == 12
    assert list(results["software"].values()) == [12]  # one machine, one set of versions
    assert f"torch {version('torch')}" in next(iter(results["software"]))
    for task in ("lm", "commonsense"):
        variants = results["tasks"][task]["variants"]
        assert set(variants) == {"lora", "reflora@rw0.34", "reflora_s@rw0.34"}
        cmp = variants["reflora@rw0.34"]["vs_lora"]
        assert cmp["final_diff"]["n"] == 2 and cmp["verdict"] in ("faster", "slower", "indistinguishable")
        diag = variants["reflora@rw0.34"]["diagnostics"]
        assert all(finite_positive(x) for x in diag["imbalance"] + diag["cond_S"] + diag["grad_ratio_A"][1:])
        assert all(finite_positive(x) for x in diag["adam_step_B"] if x is not None) and diag["adam_step_B"][-1]
        assert set(results["tasks"][task]["by_lr"]) == {"reflora@rw0.34", "reflora_s@rw0.34"}  # not LoRA
    assert 0.0 <= results["tasks"]["commonsense"]["variants"]["lora"]["test"]["accuracy"]["mean"] <= 1.0

    # Resumable: a second call finds every run done and trains nothing.
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    again, _ = run_quick("convergence", tmp_path)
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    assert again["results"]["runs"] == 12


def test_eval_quick(tmp_path):
    record, out = run_quick("eval", tmp_path)
    check_common(record, "eval", out)
    entry = record["results"]["sizes"]["8"]
    assert entry["same_predictions_as_per_option"] and entry["accuracy"]["reflora_ds"] == entry["accuracy"]["per_option"]
    assert entry["options"] > entry["rows"]  # several options a row: sharing their forward is what is measured
    assert all(finite_positive(s["median"]) for s in entry["seconds"].values())
    if "lm_eval" in entry["seconds"]:
        assert entry["same_predictions_as_lm_eval"]
    full = record["results"]["full"]
    assert full["rows"] == 16 and set(full["accuracy"]) == {"generate", "likelihood"} and finite_positive(full["loss"])


def test_memory_quick(tmp_path):
    record, out = run_quick("memory", tmp_path)
    check_common(record, "memory", out)
    runs = record["results"]["runs"]
    assert set(runs) == {"fp32", "bf16", "nf4"}
    fp32, bf16, nf4 = (runs[k]["weights"] for k in ("fp32", "bf16", "nf4"))
    assert fp32["linear"] == 2 * bf16["linear"] == 2 * fp32["linear_16bit"]
    assert nf4["quantized_layers"] > 0
    assert 0.2 < record["results"]["ratios"]["nf4_linear_vs_16bit"] < 0.35  # 4 bits + block scales
    for r in runs.values():
        assert r["peak_rss"] >= r["rss_after_load"] > 0
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["lora_grad_norms"][0] > 0  # the 4-bit base trains (put in train mode before any forward)


@pytest.mark.distributed
def test_zero_quick(tmp_path):
    record, out = run_quick("zero", tmp_path)
    check_common(record, "zero", out)
    res = record["results"]
    assert res["errors"] == 0
    assert res["summary"]["stage0"]["world2_vs_world1"] == pytest.approx(1.0, rel=0.01)
    for stage in (1, 2, 3):
        assert res["summary"][f"stage{stage}"]["world2_vs_world1"] == pytest.approx(0.5, rel=0.05)
    comm = res["comm"]
    assert comm["default_threshold"]["per_rank_bytes_per_step"] == [0, 0]  # small factors stay gathered
    assert all(b > 0 for b in comm["threshold_0"]["per_rank_bytes_per_step"])
    assert comm["lora_method_threshold_0"] == [0, 0]


def test_peer_quick(tmp_path):
    record, out = run_quick("peer", tmp_path)
    check_common(record, "peer", out)
    res = record["results"]
    assert set(res["tokens_per_s"]) == {"reflora_ds lora", "reflora_ds reflora", "hf_trainer lora"}
    assert all(finite_positive(v["median"]) for v in res["tokens_per_s"].values())
    assert res["tokens_per_step"] == record["config"]["micro_batch"] * record["config"]["seq_len"]
    mix = res["mix"]
    assert mix["packing"]["samples_per_sequence"] > 1 and finite_positive(mix["ratio"])
    for contender in ("reflora_ds_packed", "hf_trainer"):
        assert finite_positive(mix[contender]["target_tokens_per_s"]) and finite_positive(mix[contender]["eval_loss"])
    assert len(record["targets"]) == 3


def test_gpu_script_quick_on_cpu(tmp_path):
    record, out = run_quick("gpu", tmp_path)
    assert record["suite"] == "gpu" and record["results"]["parts_skipped"] == []
    assert record["results"]["parts_done"] == ["gpu_overhead", "gpu_convergence", "gpu_peer"]
    for part in record["results"]["parts_done"]:
        figures = (part, f"{part}_diagnostics") if part == "gpu_convergence" else ()
        check_common(json.loads((out / f"{part}.json").read_text()), part, out, figures=figures)


def test_unknown_suite_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "reflora_ds", "bench", "nonsense", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "overhead" in proc.stderr


@pytest.fixture
def quick_lm_study(monkeypatch):
    """The study's run loop with the quick recipe on the tiny LLaMA's lm task: (module, recipe, base, tokenizer, task)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import convergence as study_runs
    from benchmarks.common import base_model

    recipe = study_runs.QUICK_RECIPE
    base, tokenizer = base_model(True)
    return study_runs, recipe, base, tokenizer, study_runs.lm_task(tokenizer, recipe, quick=True)


def test_step_probe_sees_adams_first_step_and_leaves_the_run_alone(quick_lm_study):
    """The probe replays a study run unchanged, and its norms obey Adam's first step on LoRA's B = 0 start.

    Adam's bias-corrected first step is lr·g/(|g| + eps) entrywise, so from PEFT's B = 0 the step-1
    ‖B‖_F of each layer follows from the (clipped) gradient Adam saw, still in B.grad when the hook runs.
    """
    from statistics import median

    from benchmarks.step_probe import StepRecorder

    study_runs, recipe, base, tokenizer, task = quick_lm_study
    spec = study_runs.RunSpec("lm", "lora", 1e-2, seed=0, steps=6, refactor_warmup=0.34)
    plain = study_runs.train_run(spec, base, tokenizer, task, recipe)

    recorder, first_step = StepRecorder(), {}

    def after_step(step, stepper, lr):
        if step == 1:
            eps = stepper.optimizer.param_groups[0]["eps"]
            first_step["norm_B"] = [(lr * g / (g.abs() + eps)).norm().item()
                                    for g in (pair.B.grad.double() for pair in stepper.pairs)]
        recorder(step, stepper, lr)

    probed = study_runs.train_run(spec, base, tokenizer, task, recipe, after_step=after_step)
    for key in ("eval_curve", "train_loss", "diagnostics", "test"):
        assert probed[key] == plain[key], key

    first, rows = recorder.rows[0], recorder.rows
    assert [row["step"] for row in rows] == list(range(1, 7)) and first["lr"] > 0
    assert first["norm_B"] == pytest.approx(median(first_step["norm_B"]), rel=1e-5)
    # ‖BA‖ after step 1 is ‖Δ(BA)‖ of step 1; from step 2 on the probe reports the step's own Δ(BA).
    assert "step_BA_per_lr" not in first and all(row["step_BA_per_lr"] > 0 for row in rows[1:])


def test_convergence_run_resumes_bit_for_bit(tmp_path, quick_lm_study):
    """A study run stopped after an evaluation and resumed from its saved state ends exactly as an unbroken one."""
    study_runs, recipe, base, tokenizer, task = quick_lm_study
    spec = study_runs.RunSpec("lm", "reflora", 1e-2, seed=0, steps=8, refactor_warmup=0.25)
    whole = study_runs.train_run(spec, base, tokenizer, task, recipe)

    partial = tmp_path / "run.pt"
    assert study_runs.train_run(spec, base, tokenizer, task, recipe, partial, stop_after=recipe.eval_every) is None
    assert torch_load_step(partial) == recipe.eval_every
    resumed = study_runs.train_run(spec, base, tokenizer, task, recipe, partial)
    for key in ("eval_curve", "train_loss", "diagnostics", "test", "fallbacks", "diverged"):
        assert resumed[key] == whole[key], key
    assert whole["diagnostics"] and len(whole["train_loss"]) == 8

    # A saved state of another run, or of this run under another recipe, is not picked up.
    other = study_runs.RunSpec("lm", "lora", 1e-2, seed=0, steps=8, refactor_warmup=0.25)
    assert study_runs.load_partial(partial, other, recipe) is None
    assert study_runs.load_partial(partial, spec, recipe) is not None
    assert study_runs.load_partial(partial, spec, replace(recipe, base_dtype="float32")) is None


def test_convergence_refuses_a_folder_with_runs_of_another_recipe(tmp_path, monkeypatch):
    """A finished run of another recipe would be skipped as done and mixed into the report: refused, by name."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import convergence as study_runs

    recipe = study_runs.RECIPE
    ours = tmp_path / "lm-lora-lr0.0001-s0-n300-rw0.05-ri1.json"
    ours.write_text(json.dumps({"recipe": asdict(recipe)}))
    study_runs.check_folder(tmp_path, recipe)  # same recipe: fine
    (tmp_path / "old.json").write_text(json.dumps({"recipe": asdict(replace(recipe, base_dtype="float32"))}))
    with pytest.raises(SystemExit, match=r"old\.json.*differs in: base_dtype"):
        study_runs.check_folder(tmp_path, recipe)


def test_bf16_linear_in_fp32_is_the_exact_product_rounded_to_bf16(monkeypatch):
    """The emulated bf16 linear (forward and input gradient) is the fp64 product rounded to bf16, up to fp32 sums.

    Bound per element: half a bf16 ulp of the exact value (2^-9 relative, 2^-8 allowed) plus fp32
    accumulation over k terms (k·2^-24 of the sum of |terms|).  fp32 tensors pass through untouched.
    """
    import torch
    import torch.nn.functional as F

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bf16_cpu

    gen = torch.Generator().manual_seed(0)
    # bf16 values, held exactly in fp64: the input (64 × 96), the weight (80 × 96), the output's gradient
    x, w, g = (torch.randn(*shape, generator=gen).bfloat16().double() for shape in ((64, 96), (80, 96), (64, 80)))
    x_bf = x.bfloat16().requires_grad_(True)
    with bf16_cpu.Bf16LinearInFp32():
        out = F.linear(x_bf, w.bfloat16())
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() == "ToCopyBackward0"  # taken by the mode
    out.backward(g.bfloat16())
    assert x_bf.grad.dtype == torch.bfloat16

    for got, exact, terms in ((out, x @ w.T, x.abs() @ w.abs().T), (x_bf.grad, g @ w, g.abs() @ w.abs())):
        bound = 2.0 ** -8 * exact.abs() + 96 * 2.0 ** -24 * terms  # k ≤ 96 terms per sum
        assert ((got.double() - exact).abs() <= bound).all()
        assert (got == exact.bfloat16()).float().mean() > 0.99  # mostly the correctly rounded value itself

    plain = torch.randn(4, 96, generator=gen)
    with bf16_cpu.Bf16LinearInFp32():
        kept = F.linear(plain, w.float())
    assert torch.equal(kept, F.linear(plain, w.float()))

    monkeypatch.setattr(bf16_cpu, "has_bf16_gemm", lambda: False)
    assert bf16_cpu.needs_fp32_linears("bfloat16", "cpu")
    assert not bf16_cpu.needs_fp32_linears("float32", "cpu") and not bf16_cpu.needs_fp32_linears("bfloat16", "cuda")
    monkeypatch.setattr(bf16_cpu, "has_bf16_gemm", lambda: True)
    assert not bf16_cpu.needs_fp32_linears("bfloat16", "cpu")


def torch_load_step(path: Path) -> int:
    import torch

    return torch.load(path, weights_only=True)["step"]


def test_stage_two_is_fixed_and_2b_follows_the_selection_rule(tmp_path, monkeypatch):
    """Stage 2's grid is written down before its runs; 2b adds seeds at the lr the rule picks, once it can."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import convergence as study_runs

    first = study_runs.stage_specs("2", tmp_path)
    assert len(first) == 2 * 3 * len(study_runs.STAGE2_VARIANTS) and {s.seed for s in first} == {0}
    assert {(s.method, s.refactor_warmup, s.refactor_interval) for s in first} == set(study_runs.STAGE2_VARIANTS)
    assert study_runs.stage_specs("2b", tmp_path) == []  # no seed-0 runs yet: no learning rate chosen

    # Seed-0 runs of one cell: 5e-4 ends lowest, 3e-3 diverged.
    for spec in first:
        if (spec.task, spec.method, spec.refactor_interval) != ("lm", "reflora", 4):
            continue
        final = {1e-4: 3.5, 5e-4: 3.3, 3e-3: 3.0}[spec.lr]
        record = {"name": spec.name, "lr": spec.lr, "steps": spec.steps, "diverged": spec.lr == 3e-3,
                  "eval_curve": [[0, 3.7], [spec.steps, final]]}
        (tmp_path / f"{spec.name}.json").write_text(json.dumps(record))
    picked = study_runs.stage_specs("2b", tmp_path)
    assert [(s.lr, s.seed, s.refactor_interval) for s in picked] == [(5e-4, 1, 4), (5e-4, 2, 4)]


def synthetic_run(method: str, lr: float, seed: int, curve: list[tuple[int, float]], diverged: bool = False) -> dict:
    return {"task": "lm", "method": method, "lr": lr, "seed": seed, "steps": curve[-1][0], "refactor_warmup": 0.05,
            "refactor_interval": 1, "eval_curve": [list(p) for p in curve], "diagnostics": [], "test": {},
            "seconds": 1.0, "fallbacks": 0, "diverged": diverged}


def test_adam_step_scale_against_hand_computed_values(monkeypatch):
    """The model of how Adam's second moment meets a gradient rescaling that starts mid-run."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import study

    # beta2 = 0.5: the bias-corrected weights of steps 1..t are 0.5^(t-i+1) / (1 - 0.5^t).
    v3 = (0.125 + 0.25 + 0.5 * 0.1**2) / 0.875  # ratio 1 at steps 1-2, 0.1 from step 3
    v5 = (0.03125 + 0.0625 + (0.125 + 0.25) * 0.1**2 + 0.5 * 0.2**2) / 0.96875  # 0.1 held at step 4
    scales = study.adam_step_scale(2, [(3, 0.1), (5, 0.2)], beta2=0.5)
    assert scales == pytest.approx([0.1 / math.sqrt(v3), 0.2 / math.sqrt(v5)])
    # Adam is blind to a rescaling in force from the first step, and to none at all.
    assert study.adam_step_scale(0, [(5, 7.0), (10, 7.0)]) == pytest.approx([1.0, 1.0])
    assert study.adam_step_scale(15, [(20, 1.0)]) == pytest.approx([1.0])
    # A shrink that starts late is remembered: the step is far below the ratio's own long-run effect (1).
    assert study.adam_step_scale(15, [(20, 0.05), (300, 0.05)])[0] < 0.1


def test_study_statistics_against_hand_computed_values(monkeypatch):
    """Best lr, the paired t interval, its verdict, steps to LoRA's final loss and the area, on made-up curves."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import study

    lora = [synthetic_run("lora", 1e-3, s, [(0, 4.0), (100, 3.0 + d)]) for s, d in enumerate((0.0, 0.1, 0.2))]
    worse_lr = [synthetic_run("lora", 1e-2, s, [(0, 4.0), (100, 3.5)]) for s in range(3)]
    diverged = [synthetic_run("reflora", 1e-2, 0, [(0, 4.0), (50, math.nan)], diverged=True)]
    # RefLoRA is 0.2, 0.3, 0.1 below LoRA seed by seed, and at step 50 already at 3.0 + its offset.
    offsets = (-0.2, -0.3, -0.1)
    reflora = [synthetic_run("reflora", 1e-3, s, [(0, 4.0), (50, 3.0 + d), (100, 3.0 + d + o)])
               for s, (d, o) in enumerate(zip((0.0, 0.1, 0.2), offsets))]
    summary = study.summarise_task(lora + worse_lr + diverged + reflora)

    assert summary["best_lr"] == {"lora": 1e-3, "reflora": 1e-3}  # the diverged lr counts as infinite
    cmp = summary["variants"]["reflora"]["vs_lora"]
    mean, sd = -0.2, 0.1  # of the paired differences (-0.2, -0.3, -0.1)
    half = 4.303 * sd / math.sqrt(3)
    assert cmp["final_diff"]["mean"] == pytest.approx(mean)
    assert (cmp["final_diff"]["low"], cmp["final_diff"]["high"]) == pytest.approx((mean - half, mean + half))
    assert cmp["verdict"] == "indistinguishable"  # -0.2 ± 0.248 straddles 0
    # LoRA's final mean is 3.1; RefLoRA's mean curve is 4.0, 3.1, 2.9 at steps 0, 50, 100: it gets there at 50.
    assert cmp["steps_to_lora_final"] == pytest.approx(50.0) and cmp["fraction_of_budget"] == pytest.approx(0.5)
    # Paired by seed at the steps both evaluated (0 and 100): 0 at the start, then the offsets.
    diff = cmp["diff_curve"]
    assert diff["steps"] == [0, 100] and diff["n"] == 3
    assert diff["mean"] == pytest.approx([0.0, -0.2]) and diff["min"] == pytest.approx([0.0, -0.3])
    assert diff["max"] == pytest.approx([0.0, -0.1])
    # Area: LoRA seed 0 is (4 + 3) / 2 = 3.5; RefLoRA seed 0 is ((4 + 3) / 2 + (3 + 2.8) / 2) / 2 = 3.2.
    assert study.area(lora[0]) == pytest.approx(3.5) and study.area(reflora[0]) == pytest.approx(3.2)

    targets = study.claim_targets({"tasks": {"lm": summary}})
    assert [t["met"] for t in targets] == [True, False]  # 0.5 ≤ 0.7; the interval's top is above 0

    # One seed decides nothing: both targets stay unmeasured.
    one = study.summarise_task([lora[0], reflora[0]])
    assert one["variants"]["reflora"]["vs_lora"]["verdict"] == "too few seeds"
    assert [t["met"] for t in study.claim_targets({"tasks": {"lm": one}})] == [None, None]

    # A best lr at an end of a grid of three is flagged (the optimum may lie beyond); inside it, or with two, not.
    assert summary["variants"]["lora"]["lr_edge"] is None  # two learning rates only
    low = [synthetic_run("lora", 1e-4, s, [(0, 4.0), (100, 3.3)]) for s in range(3)]
    assert study.summarise_task(lora + worse_lr + low)["variants"]["lora"]["lr_edge"] is None
    best_low = [synthetic_run("lora", 1e-4, s, [(0, 4.0), (100, 2.0)]) for s in range(3)]
    assert study.summarise_task(lora + worse_lr + best_low)["variants"]["lora"]["lr_edge"] == "lowest"
    best_high = [synthetic_run("lora", 1e-2, s, [(0, 4.0), (100, 2.0)]) for s in range(3)]
    assert study.summarise_task(lora + low + best_high)["variants"]["lora"]["lr_edge"] == "highest"


def test_a_variant_keeps_its_plot_colour_in_every_panel(monkeypatch):
    """Colours follow the method, not a task's list of variants; RefLoRA's schedule variants get its colour, dashed."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import study

    results = {"tasks": {
        "lm": {"variants": dict.fromkeys(["lora", "loraplus", "reflora", "reflora@rw0.01"]), "grid": {}},
        "commonsense": {"variants": dict.fromkeys(["lora", "reflora", "reflora@ri4"]), "grid": {}},
    }}
    styles = study.plot_styles(results)
    assert styles["lora"] == {"color": "C0", "linestyle": "-"}
    rank = list(study.LABELS)
    assert styles["reflora"]["color"] == f"C{rank.index('reflora')}" != styles["loraplus"]["color"]
    changed = [styles["reflora@ri4"], styles["reflora@rw0.01"]]
    assert all(s["color"] == styles["reflora"]["color"] and s["linestyle"] != "-" for s in changed)
    assert changed[0]["linestyle"] != changed[1]["linestyle"]
    assert study.label("reflora@rw0.01") == "RefLoRA (warm-up 1 %)"
    assert study.label("reflora@rw0.1@ri4") == "RefLoRA (warm-up 10 %, every 4 steps)"
    assert study.label("refactor_adam") == "refactor + moments"
