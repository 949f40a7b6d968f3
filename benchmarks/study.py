"""The convergence study's statistics: what the per-run JSONs say, however many of them exist.

The rules, fixed before the first run:

* A cell is (task, variant, learning rate); the variant is the method, with
  ``@rw<fraction>`` / ``@ri<interval>`` appended when the refactor warm-up or
  interval differs from stage 1's (5 %, every step).
* A run's final evaluation loss is its last evaluation (at the last step); a
  diverged run counts as infinite.
* Best learning rate of a variant on a task: the lowest seed-mean final
  evaluation loss among its learning rates.  Test accuracy never chooses.
* Against LoRA (each at its best learning rate), paired by seed: the mean
  difference of the final evaluation loss with its 95 % t interval.  The
  verdict: *faster* when the whole interval is below 0 (a lower loss in the
  same number of steps), *slower* when it is above 0, else
  *indistinguishable*; fewer than two pairs: *too few seeds*.
* Steps to LoRA's final loss: the first step at which the variant's
  seed-mean evaluation curve reaches LoRA's seed-mean final evaluation loss
  (linear between evaluations), also as a fraction of the budget.
* Area under the evaluation-loss curve: the mean evaluation loss over the
  run (trapezoids, step 0 included), its paired difference with an interval.
* The paper's claim as our target: steps to LoRA's final ≤ 0.7 × the budget
  and the final-loss interval below 0.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

from reflora_ds.methods import REGISTRY

from .common import machine, payload, print_table, print_targets, pyplot, save_figure, target, write_json

STAGE1_WARMUP, STAGE1_INTERVAL = 0.05, 1
LABELS = {"lora": "LoRA", "loraplus": "LoRA+", "scaledgd": "ScaledGD", "dora": "DoRA", "reflora": "RefLoRA",
          "reflora_s": "RefLoRA-S", "refactor": "refactor",
          "refactor_adam": "refactor + moments"}
CLAIM_FRACTION = 0.7
# Methods whose plan starts after the refactor warm-up and follows the interval; the others ignore both.
REFACTORING = tuple(name for name, method in REGISTRY.items() if method.needs is not None)
# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
        2.042)


# --- reading runs ------------------------------------------------------------------------------------


def load_runs(runs_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(runs_dir).glob("*.json"))]


def variant(run: dict) -> str:
    name = run["method"]
    if name not in REFACTORING:
        return name
    if run["refactor_warmup"] != STAGE1_WARMUP:
        name += f"@rw{run['refactor_warmup']:g}"
    if run["refactor_interval"] != STAGE1_INTERVAL:
        name += f"@ri{run['refactor_interval']}"
    return name


def final_loss(run: dict) -> float:
    curve = run["eval_curve"]
    return math.inf if run["diverged"] or curve[-1][0] != run["steps"] else curve[-1][1]


def area(run: dict) -> float:
    """Mean evaluation loss over the run (trapezoids over the evaluation steps)."""
    if run["diverged"]:
        return math.inf
    steps, losses = zip(*run["eval_curve"])
    total = sum((steps[i + 1] - steps[i]) * (losses[i] + losses[i + 1]) / 2 for i in range(len(steps) - 1))
    return total / (steps[-1] - steps[0])


def mean_curve(runs: list[dict]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, seed mean, min and max of the evaluation loss (only steps every run reached)."""
    finished = [r for r in runs if not r["diverged"]]
    if not finished:
        return [], [], [], []
    n = min(len(r["eval_curve"]) for r in finished)
    steps = [p[0] for p in finished[0]["eval_curve"][:n]]
    columns = [[r["eval_curve"][i][1] for r in finished] for i in range(n)]
    return steps, [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def paired_diff_curve(pairs: list[tuple[dict, dict]]) -> dict:
    """Per evaluation step, a run's loss minus its LoRA partner's (same seed): mean, min and max over the pairs."""
    pairs = [(a, b) for a, b in pairs if not a["diverged"] and not b["diverged"]]
    if not pairs:
        return {"steps": [], "mean": [], "min": [], "max": [], "n": 0}
    curves = [(dict(map(tuple, a["eval_curve"])), dict(map(tuple, b["eval_curve"]))) for a, b in pairs]
    steps = sorted(set.intersection(*(set(a) & set(b) for a, b in curves)))  # evaluated in every run of both
    columns = [[a[step] - b[step] for a, b in curves] for step in steps]
    return {"steps": steps, "mean": [statistics.fmean(c) for c in columns], "min": [min(c) for c in columns],
            "max": [max(c) for c in columns], "n": len(pairs)}


def step_reaching(steps: list[int], losses: list[float], level: float) -> float | None:
    """First step at which the curve is at or below ``level``, linear between points."""
    for i, (s, v) in enumerate(zip(steps, losses)):
        if v <= level:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], losses[i - 1]
            return s0 + (s - s0) * (v0 - level) / (v0 - v)
    return None


def interval(diffs: list[float]) -> dict:
    """Mean and 95 % t interval of paired differences."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2 or not all(map(math.isfinite, diffs)):
        return {"n": n, "mean": mean, "low": None, "high": None}
    half = T975[min(n - 1, len(T975)) - 1] * statistics.stdev(diffs) / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def verdict(ci: dict) -> str:
    if ci["low"] is None:
        return "too few seeds"
    if ci["high"] < 0:
        return "faster"
    if ci["low"] > 0:
        return "slower"
    return "indistinguishable"


def _mean_std(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    return {"n": len(values), "mean": statistics.fmean(values) if finite == values else math.inf,
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0}


# --- aggregation ---------------------------------------------------------------------------------------


def best_lr(by_lr: dict[float, list[dict]]) -> float:
    """The rule: the learning rate with the lowest seed-mean final evaluation loss (a diverged run: infinite)."""
    return min(by_lr, key=lambda lr: statistics.fmean(final_loss(r) for r in by_lr[lr]))


def grid_edge(lrs, best: float) -> str | None:
    """"highest"/"lowest" when the best lr is at an end of a grid of three or more: the optimum may lie beyond."""
    lrs = sorted(lrs)
    if len(lrs) < 3:
        return None
    return "highest" if best == lrs[-1] else "lowest" if best == lrs[0] else None


def summarise_task(runs: list[dict]) -> dict:
    cells: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        cells[variant(r)][r["lr"]].append(r)
    grid = {v: {f"{lr:g}": {**_mean_std([final_loss(r) for r in rs]), "seeds": sorted(r["seed"] for r in rs)}
                for lr, rs in sorted(by_lr.items())} for v, by_lr in cells.items()}
    best = {v: best_lr(by_lr) for v, by_lr in cells.items()}
    out = {"grid": grid, "best_lr": {v: lr for v, lr in best.items()}, "variants": {},
           "by_lr": gradient_scaling_by_lr(cells)}
    lora = cells["lora"][best["lora"]] if "lora" in cells else None
    lora_final = statistics.fmean(final_loss(r) for r in lora) if lora else None
    for v, by_lr in cells.items():
        rs = by_lr[best[v]]
        steps, mean, low, high = mean_curve(rs)
        entry = {
            "lr": best[v], "lr_edge": grid_edge(by_lr, best[v]), "seeds": sorted(r["seed"] for r in rs),
            "final": _mean_std([final_loss(r) for r in rs]),
            "auc": _mean_std([area(r) for r in rs]), "curve": {"steps": steps, "mean": mean, "min": low, "max": high},
            "test": test_summary(rs), "diagnostics": diagnostics_curve(rs),
            "budget": rs[0]["steps"], "seconds": statistics.fmean(r["seconds"] for r in rs),
        }
        if lora and v != "lora":
            by_seed = {r["seed"]: r for r in lora}
            pairs = [(r, by_seed[r["seed"]]) for r in rs if r["seed"] in by_seed]
            entry["vs_lora"] = {
                "lora_lr": best["lora"], "lora_final": lora_final,
                "final_diff": interval([final_loss(a) - final_loss(b) for a, b in pairs]),
                "auc_diff": interval([area(a) - area(b) for a, b in pairs]),
                "diff_curve": paired_diff_curve(pairs),
            }
            entry["vs_lora"]["verdict"] = verdict(entry["vs_lora"]["final_diff"])
            reached = step_reaching(steps, mean, lora_final) if math.isfinite(lora_final) else None
            entry["vs_lora"]["steps_to_lora_final"] = reached
            entry["vs_lora"]["fraction_of_budget"] = None if reached is None else reached / entry["budget"]
        out["variants"][v] = entry
    return out


def gradient_scaling_by_lr(cells: dict[str, dict[float, list[dict]]], early: int = 50) -> dict:
    """For each variant that rescales gradients, at every learning rate: the factors' imbalance, B's gradient
    scaling and Adam's estimated step on B (at step ``early`` and at the end), beside the final-loss gap to
    LoRA at the same learning rate and seed.  What explains a gap that grows or shrinks with the lr."""
    out: dict[str, dict[str, dict]] = {}
    for v, by_lr in cells.items():
        for lr, rs in sorted(by_lr.items()):
            d = diagnostics_curve(rs)
            if not d or all(x is None for x in d["grad_ratio_B"]):
                continue  # LoRA: nothing rescales its gradients
            at = lambda key, step: next((x for s, x in zip(d["steps"], d[key]) if s >= step), None)  # noqa: E731
            lora = {r["seed"]: r for r in cells.get("lora", {}).get(lr, [])}
            gaps = [final_loss(r) - final_loss(lora[r["seed"]]) for r in rs if r["seed"] in lora]
            out.setdefault(v, {})[f"{lr:g}"] = {
                "imbalance": d["imbalance"][-1], "grad_ratio_B": d["grad_ratio_B"][-1],
                "adam_step_B_early": at("adam_step_B", early), "adam_step_B_end": d["adam_step_B"][-1],
                "final_minus_lora": statistics.fmean(gaps) if gaps else None, "pairs": len(gaps)}
    return out


def test_summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("accuracy", "loss"):
        values = [r["test"][key] for r in runs if key in r.get("test", {})]
        if values:
            out[key] = _mean_std(values)
    return out


DIAG_KEYS = ("imbalance", "cond_S", "grad_ratio_A", "grad_ratio_B")
ADAM_BETA2 = 0.999  # torch.optim.AdamW's default, which every run uses


def adam_step_scale(onset: int, logged: list[tuple[int, float]], beta2: float = ADAM_BETA2) -> list[float]:
    """Estimated factor by which a gradient rescaling changes Adam's step, at each logged step.

    A method that multiplies a factor's gradient by ``ratio`` from step ``onset + 1`` on (``logged``:
    (step, ratio) pairs after the onset, held constant between them) changes Adam's step at step t by
    ratio(t) / sqrt(v(t)), where v(t) is Adam's bias-corrected average of ratio² up to t (ratio 1 up to the
    onset).  A model, not a measurement: it takes the raw gradient's scale as constant.  It shows how
    long Adam's second moment remembers the gradients from before the refactor started.
    """
    if not logged:
        return []
    ratio_at, out = dict(logged), []
    weighted = weight = 0.0
    current = logged[0][1]  # the steps between the onset and the first log take the first logged ratio
    for t in range(1, logged[-1][0] + 1):
        if t > onset:
            current = ratio_at.get(t, current)
        ratio = current if t > onset else 1.0
        weighted, weight = beta2 * weighted + (1 - beta2) * ratio**2, beta2 * weight + (1 - beta2)
        if t in ratio_at:
            out.append(ratio / math.sqrt(weighted / weight))
    return out


def diagnostics_curve(runs: list[dict]) -> dict:
    """Seed means of each diagnostic's layer median per logged step, and the fallbacks at the end."""
    finished = [r for r in runs if r["diagnostics"]]
    if not finished:
        return {}
    n = min(len(r["diagnostics"]) for r in finished)
    out = {"steps": [d["step"] for d in finished[0]["diagnostics"][:n]],
           "fallbacks": statistics.fmean(r["fallbacks"] for r in finished)}
    for key in DIAG_KEYS:
        column = []
        for i in range(n):
            values = [r["diagnostics"][i].get(key) for r in finished]
            values = [v["median"] for v in values if v]
            column.append(statistics.fmean(values) if values else None)
        out[key] = column
    for side in "AB":  # Adam's step on each factor, against the same gradient unscaled (a model: see above)
        curves = []
        for r in finished:
            logged = [(d["step"], d[f"grad_ratio_{side}"]["median"]) for d in r["diagnostics"][:n]
                      if d.get(f"grad_ratio_{side}")]
            scales = dict(zip((s for s, _ in logged), adam_step_scale(r["refactor_warmup_steps"], logged)))
            curves.append([scales.get(step) for step in out["steps"]])
        out[f"adam_step_{side}"] = [statistics.fmean(c) if None not in c else None for c in zip(*curves)]
    return out


def report(out: Path, quick: bool, planned: list, suite: str = "convergence", runs_dir: str = "convergence") -> dict:
    """Aggregate every run in ``out/<runs_dir>`` into ``<suite>.json``, its plots and tables."""
    started = time.perf_counter()
    runs = [r for r in load_runs(Path(out) / runs_dir) if r.get("quick", False) == quick]
    done = {r["name"] for r in runs}
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_task[r["task"]].append(r)
    results = {
        "planned_stage1": len(planned), "done_of_stage1": sum(s.name in done for s in planned), "runs": len(runs),
        "cpu_hours": round(sum(r["cpu_seconds"] for r in runs) / 3600, 2),
        "software": software(runs),
        "tasks": {task: summarise_task(rs) for task, rs in sorted(by_task.items())},
    }
    recipe = runs[0]["recipe"] if runs else {}
    dtype = runs[0].get("dtype", "float32") if runs else "float32"
    config = {"model": "tiny random LLaMA" if quick else f"SmolLM2-135M-Instruct ({dtype})", **{
        k: recipe.get(k) for k in ("r", "alpha", "dropout", "batch", "chunk_tokens", "cutoff_len", "lr_warmup",
                                   "max_grad_norm", "eval_every", "diag_every")},
        "optimizer": "AdamW", "schedule": "linear warm-up, linear decay to 0", "runs_dir": f"{runs_dir}/"}
    record = payload(suite, quick, config, results, claim_targets(results), started, machine())
    record["figures"] = [f"{suite}.png", f"{suite}_diagnostics.png"]
    if suite == "convergence" and not quick:
        record["reproduce"] = ("`python -m benchmarks convergence --stage 1`, then `--stage 2` and `--stage 2b` "
                               f"(resumable; the {results['runs']} runs so far took {results['cpu_hours']} "
                               "CPU-hours here)")
    write_json(out, suite, record)
    if results["tasks"]:
        plot_curves(results, out, suite)
        plot_diagnostics(results, out, suite)
    show(record)
    return record


def software(runs: list[dict]) -> dict[str, int]:
    """How many runs each set of library versions trained (runs spanning upgrades stay visible as such).

    Runs whose bf16 linear layers ran as fp32 GEMMs (bf16_cpu.py) are counted apart.
    """
    return dict(Counter(", ".join(f"{k} {v}" for k, v in sorted(r["machine"]["versions"].items()))
                        + ("; bf16 linears as fp32 GEMMs" if r.get("bf16_linears_in_fp32") else "")
                        for r in runs).most_common())


def claim_targets(results: dict) -> list[dict]:
    targets = []
    for task, s in results["tasks"].items():
        cmp = s["variants"].get("reflora", {}).get("vs_lora")
        if cmp is None:
            continue
        frac, ci = cmp["fraction_of_budget"], cmp["final_diff"]
        t = target(f"{task}: RefLoRA steps to LoRA's final eval loss / budget (best lr each)", frac,
                   CLAIM_FRACTION, note=f"RefLoRA lr {s['variants']['reflora']['lr']:g}, LoRA lr {cmp['lora_lr']:g}"
                   + ("" if frac is not None else "; not reached"))
        # One seed decides nothing: below two pairs both targets stay unmeasured.
        t["met"] = None if ci["n"] < 2 else frac is not None and frac <= CLAIM_FRACTION
        targets.append(t)
        t = target(f"{task}: RefLoRA − LoRA final eval loss, 95 % interval below 0", ci["high"], 0.0,
                   note=f"mean {ci['mean']:+.4f}, n = {ci['n']}, verdict: {cmp['verdict']}")
        t["met"] = None if ci["high"] is None else ci["high"] < 0
        targets.append(t)
    return targets


# --- tables and plots ----------------------------------------------------------------------------------


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged"
    return f"{x:.{digits}f}"


def _pm(stat: dict) -> str:
    return f"{_fmt(stat['mean'])} ± {_fmt(stat['std'])}" if stat else "-"


def _ci(ci: dict) -> str:
    if ci["low"] is None:
        return f"{_fmt(ci['mean'])} (n={ci['n']})"
    return f"{ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]"


def _order(names) -> list[str]:
    rank = list(LABELS)
    return sorted(names, key=lambda v: (rank.index(v.split("@")[0]) if v.split("@")[0] in rank else 99, v))


def label(v: str) -> str:
    """A variant's name for a legend: "RefLoRA (warm-up 1 %)" for ``reflora@rw0.01``."""
    method, *changes = v.split("@")
    words = [f"warm-up {float(c[2:]) * 100:g} %" if c.startswith("rw") else f"every {c[2:]} steps"
             for c in changes]
    return LABELS.get(method, method) + (f" ({', '.join(words)})" if words else "")


def plot_styles(results: dict) -> dict[str, dict]:
    """Colour and line per variant, the same in every panel of a figure.

    The colour follows the method (LoRA is always C0), so a method keeps its colour however many other
    variants a task has; RefLoRA's warm-up and interval variants share RefLoRA's colour, each with its own dashes.
    """
    rank = list(LABELS)
    dashes = ("--", ":", "-.", (0, (5, 1)), (0, (1, 3)))
    names = _order({v for s in results["tasks"].values() for v in (*s["variants"], *s["grid"])})
    styles, changed = {}, Counter()
    for v in names:
        method = v.split("@")[0]
        line = "-"
        if v != method:
            line = dashes[changed[method] % len(dashes)]
            changed[method] += 1
        styles[v] = {"color": f"C{rank.index(method)}" if method in rank else "0.4", "linestyle": line}
    return styles


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def show(record: dict) -> None:
    res = record["results"]
    print_table("runs in", ["planned (stage 1)", "done of them", "runs in all", "CPU hours"],
                [[res["planned_stage1"], res["done_of_stage1"], res["runs"], res["cpu_hours"]]])
    print_table("library versions the runs were trained with", ["versions", "runs"],
                [[versions, n] for versions, n in res.get("software", {}).items()])
    for task, s in res["tasks"].items():
        lrs = sorted({lr for cells in s["grid"].values() for lr in cells}, key=float)
        rows = [[v] + [(lambda c: f"{_pm(c)} ({len(c['seeds'])})" if c else "-")(s["grid"][v].get(lr))
                       for lr in lrs] for v in _order(s["grid"])]
        print_table(f"{task}: final eval loss by learning rate (seed mean ± std, seeds)", ["variant"] + lrs, rows)
        rows = []
        for v in _order(s["variants"]):
            e = s["variants"][v]
            cmp = e.get("vs_lora", {})
            test = e["test"].get("accuracy") or e["test"].get("loss")
            edge = f" ({e['lr_edge']} tried)" if e.get("lr_edge") else ""
            rows.append([v, f"{e['lr']:g}{edge}", len(e["seeds"]), _pm(e["final"]),
                         _ci(cmp["final_diff"]) if cmp else "-", cmp.get("verdict", "-"),
                         "-" if not cmp else ("not reached" if cmp["steps_to_lora_final"] is None else
                                              f"{cmp['steps_to_lora_final']:.0f} ({cmp['fraction_of_budget']:.2f})"),
                         _pm(e["auc"]), _ci(cmp["auc_diff"]) if cmp else "-", _pm(test) if test else "-"])
        test_name = "test accuracy" if any(e["test"].get("accuracy") for e in s["variants"].values()) else "test loss"
        print_table(f"{task}: each variant at its best lr against LoRA at its best (paired by seed, 95 % t interval)",
                    ["variant", "best lr", "seeds", "final eval loss", "− LoRA", "verdict",
                     "steps to LoRA's final (of budget)", "mean eval loss (AUC)", "AUC − LoRA", test_name], rows)
        rows = []
        for v in _order(s["variants"]):
            d = s["variants"][v]["diagnostics"]
            if not d:
                continue
            last = lambda key: d[key][-1] if d.get(key) else None  # noqa: E731
            rows.append([v, _fmt(last("imbalance"), 3), _fmt(last("cond_S"), 1), _fmt(last("grad_ratio_A"), 3),
                         _fmt(last("grad_ratio_B"), 3), _fmt(d["fallbacks"], 1)])
        print_table(f"{task}: diagnostics at the last logged step (layer median, seed mean; best lr)",
                    ["variant", "‖AAᵀ−BᵀB‖/‖BA‖", "cond(S)", "‖S⁻¹∇A‖/‖∇A‖", "‖∇B·S‖/‖∇B‖", "fallbacks"], rows)
        rows = [[v, lr, _fmt(c["imbalance"], 2), _fmt(c["grad_ratio_B"], 3), _fmt(c["adam_step_B_early"], 2),
                 _fmt(c["adam_step_B_end"], 2),
                 "-" if c["final_minus_lora"] is None else f"{c['final_minus_lora']:+.4f} ({c['pairs']})"]
                for v in _order(s.get("by_lr", {})) for lr, c in s["by_lr"][v].items()]
        print_table(f"{task}: gradient scaling and Adam's step on B by learning rate (seed mean; the step is a "
                    f"model's estimate, see study.adam_step_scale)",
                    ["variant", "lr", "imbalance (end)", "‖∇B·S‖/‖∇B‖ (end)", "Adam step on B, step 50",
                     "Adam step on B, end", "final − LoRA's, same lr (pairs)"], rows)
    print_targets(record["targets"])


DIFF_LINEAR_WITHIN = 0.02  # the difference panels' linear range (eval loss)


def plot_curves(results: dict, out: Path, name: str) -> None:
    plt = pyplot()
    tasks = list(results["tasks"])
    styles = plot_styles(results)
    fig, axes = plt.subplots(3, len(tasks), figsize=(6 * len(tasks), 12), squeeze=False)
    for col, task in enumerate(tasks):
        s = results["tasks"][task]
        ax = axes[0][col]
        for v in _order(s["variants"]):
            e = s["variants"][v]
            _band(ax, e["curve"], styles[v], f"{label(v)} lr {e['lr']:g} ({_seeds(len(e['seeds']))})")
        _dress(ax, f"{task}: eval loss at each one's best lr (mean, band = seed min–max)", "eval loss")
        # The differences are small against the fall of the loss: show them paired by seed, on their own scale.
        ax = axes[1][col]
        ax.axhline(0.0, color="C0", lw=1.0, label="LoRA")  # LoRA's colour in plot_styles
        for v in _order(s["variants"]):
            d = s["variants"][v].get("vs_lora", {}).get("diff_curve")
            if d:
                _band(ax, d, styles[v], f"{label(v)} ({_seeds(d['n'])})")
        _dress(ax, f"{task}: eval loss − LoRA's, same seed, best lr each (log beyond ±{DIFF_LINEAR_WITHIN:g})",
               "mean, band min–max (below 0: ahead of LoRA)")
        # Early spikes (a diverging LoRA+, RefLoRA's first steps) would flatten the end-of-run gaps that
        # the verdict is about; a symmetric log beyond ±DIFF_LINEAR_WITHIN keeps both readable.
        ax.set_yscale("symlog", linthresh=DIFF_LINEAR_WITHIN, linscale=2.0)
        ax = axes[2][col]
        for v in _order(s["grid"]):
            pts = sorted((float(lr), c["mean"]) for lr, c in s["grid"][v].items() if math.isfinite(c["mean"]))
            if pts:
                ax.plot(*zip(*pts), marker="o", **styles[v], label=label(v))
        ax.set_xscale("log")
        ax.set_title(f"{task}: final eval loss against the learning rate (seed mean)", fontsize=9)
        ax.set_xlabel("peak learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, out, name)


def _band(ax, curve: dict, style: dict, name: str) -> None:
    """A mean curve with its min–max band (nothing when the curve is empty)."""
    if curve["steps"]:
        ax.plot(curve["steps"], curve["mean"], lw=1.5, label=name, **style)
        ax.fill_between(curve["steps"], curve["min"], curve["max"], color=style["color"], alpha=0.2)


def _dress(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_diagnostics(results: dict, out: Path, name: str) -> None:
    plt = pyplot()
    tasks = list(results["tasks"])
    keys = DIAG_KEYS + ("adam_step_B",)
    fig, axes = plt.subplots(len(tasks), len(keys), figsize=(4.2 * len(keys), 3.4 * len(tasks)), squeeze=False)
    titles = {"imbalance": "‖AAᵀ−BᵀB‖_F / ‖BA‖_F", "cond_S": "cond(S)", "grad_ratio_A": "‖S⁻¹∇A‖ / ‖∇A‖",
              "grad_ratio_B": "‖∇B·S‖ / ‖∇B‖", "adam_step_B": "Adam's step on B, est. (1 = as unscaled)"}
    styles = plot_styles(results)
    for row, task in enumerate(tasks):
        s = results["tasks"][task]
        for col, key in enumerate(keys):
            ax = axes[row][col]
            for v in _order(s["variants"]):
                d = s["variants"][v]["diagnostics"]
                pts = [(st, y) for st, y in zip(d.get("steps", []), d.get(key, [])) if y is not None and y > 0]
                if pts:
                    ax.plot(*zip(*pts), lw=1.2, label=label(v), **styles[v])
            ax.set_yscale("log")
            ax.set_title(f"{task}: {titles[key]}" + ("" if key.startswith("adam") else " (layer median)"), fontsize=8)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    save_figure(fig, out, f"{name}_diagnostics")
