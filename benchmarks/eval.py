"""Suite ``eval``: how fast likelihood scoring is, against a plain scorer and lm-eval, on the same rows.

Three contenders score the options of the same embedded ARC-Easy test rows
with the same model (SmolLM2-135M-Instruct, fp32), interleaved in one
process (A B C, B C A, ...), for 40 and for 100 rows:

* ``reflora_ds``: ``evaluate.score_likelihood``: options that differ only in
  their last token share one forward (one per row for every label format);
* ``per_option``: a plain scorer, one forward per option (the same batches of
  8 sequences, sorted by length, the same log-probability kernel);
* ``lm_eval``: lm-evaluation-harness 0.4 on the tasks ``reflora-ds
  lm-eval-tasks`` writes, given the model already loaded (when installed).

Accuracy must be identical (reflora_ds and per_option: the same prediction on
every row). Then one full ``--mode both`` evaluation (generate-and-parse,
likelihood, loss; the CLI's batch sizes) of every embedded test row, timed
once: the number a user waits for.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from reflora_ds.data import EMBEDDED_TEST, PadCollator, read_rows
from reflora_ds.evaluate import (
    evaluate,
    inference_mode,
    make_question,
    option_samples,
    response_logprobs,
    score_likelihood,
)

from .common import (
    base_model,
    interleave,
    machine,
    payload,
    print_table,
    print_targets,
    pyplot,
    quartiles,
    ratio_stats,
    save_figure,
    target,
    write_json,
)

BATCH = 8
GENERATE_BATCH = 32  # reflora-ds eval's default


def per_option_scores(model, tokenizer, questions) -> list[str]:
    """The plain scorer: every (row, option) its own sequence and forward; the best option per row."""
    collate = PadCollator(tokenizer.pad_token_id)
    samples = sorted(option_samples(questions, tokenizer, "alpaca"), key=lambda x: len(x["input_ids"]))
    scores: dict[int, dict[str, float]] = {q.index: {} for q in questions}
    with inference_mode(model):
        for start in range(0, len(samples), BATCH):
            batch = samples[start:start + BATCH]
            for sample, value in zip(batch, response_logprobs(model, collate(batch)).total.tolist()):
                scores[sample["index"]][sample["label"]] = value
    return [max(q.labels, key=lambda label: scores[q.index][label]) for q in questions]


def lm_eval_scores(model, tokenizer, rows: list[dict]):
    """lm-eval on the same rows through our task files, the model passed in already loaded; None without lm-eval."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        return None
    import json

    from reflora_ds.lmeval import write_tasks

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "rows.json"
    data.write_text(json.dumps(rows))
    names = write_tasks([data], tmp / "tasks")
    manager = TaskManager(include_path=str(tmp / "tasks"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH, device=str(next(model.parameters()).device))

    def run() -> list[int]:
        result = simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=True)
        samples = sorted(result["samples"][names[0]], key=lambda s: s["doc_id"])
        return [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]

    return run


def run(out, quick: bool, argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    info = machine()
    model, tokenizer = base_model(quick)
    model.eval()
    sizes = (8,) if quick else (40, 100)
    rounds = 1 if quick else 3
    all_rows = read_rows(EMBEDDED_TEST).rows
    results = {"sizes": {}}
    for n in sizes:
        rows = all_rows[:n]
        questions = [make_question(i, row) for i, row in enumerate(rows)]
        outputs: dict[str, list] = {}

        def ours(questions=questions):
            outputs["reflora_ds"] = [r["prediction"] for r in score_likelihood(model, tokenizer, questions,
                                                                                batch_size=BATCH)]

        def plain(questions=questions):
            outputs["per_option"] = per_option_scores(model, tokenizer, questions)

        tasks = {"reflora_ds": ours, "per_option": plain}
        lm = lm_eval_scores(model, tokenizer, rows)
        if lm is not None:
            tasks["lm_eval"] = lambda: outputs.__setitem__("lm_eval", lm())
        times = interleave(tasks, rounds=rounds, warmup=0 if quick else 1)
        clock = "wall"  # lm-eval and torch both use threads: the wall clock is what a user waits for
        gold = [q.answer for q in questions]
        entry = {"rows": n, "options": sum(len(q.labels) for q in questions), "clock": clock,
                 "seconds": {name: quartiles(t[clock]) for name, t in times.items()},
                 "ratio_to_per_option": {name: ratio_stats(times[name][clock], times["per_option"][clock])
                                         for name in tasks},
                 "accuracy": {"reflora_ds": _accuracy(outputs["reflora_ds"], gold),
                              "per_option": _accuracy(outputs["per_option"], gold)},
                 "same_predictions_as_per_option": outputs["reflora_ds"] == outputs["per_option"]}
        if "lm_eval" in outputs:
            labels = [q.labels[i] for q, i in zip(questions, outputs["lm_eval"])]
            entry["accuracy"]["lm_eval"] = _accuracy(labels, gold)
            entry["same_predictions_as_lm_eval"] = labels == outputs["reflora_ds"]
            entry["ratio_to_lm_eval"] = ratio_stats(times["reflora_ds"][clock], times["lm_eval"][clock])
        results["sizes"][str(n)] = entry
        print(f"{n} rows: " + ", ".join(f"{k} {v['median']:.2f}s" for k, v in entry["seconds"].items()), flush=True)

    full_rows = all_rows[:16] if quick else all_rows
    tic = time.perf_counter()
    full = evaluate(model, tokenizer, full_rows, modes=["generate", "likelihood"], loss=True, batch_size=BATCH,
                    generate_batch_size=GENERATE_BATCH)
    results["full"] = {"rows": len(full_rows), "seconds": round(time.perf_counter() - tic, 1),
                       "phases": {k: round(v, 1) for k, v in full.seconds.items()},
                       "accuracy": full.accuracy, "loss": full.loss, "unparsed": full.unparsed}
    results["threads"] = torch.get_num_threads()
    targets = _targets(results, quick)
    config = {"model": "tiny random LLaMA" if quick else "SmolLM2-135M-Instruct (fp32, base, no adapter)",
              "rows": "embedded ARC-Easy test", "batch": BATCH, "rounds": rounds, "torch_threads": results["threads"],
              "lm_eval": "installed" if any("lm_eval" in e["seconds"] for e in results["sizes"].values())
              else "not installed"}
    record = payload("eval", quick, config, results, targets, started, info)
    write_json(out, "eval", record)
    plot(results, out)
    show(record)
    return record


def _accuracy(predictions: list, gold: list) -> float:
    return sum(p == g for p, g in zip(predictions, gold)) / len(gold)


def _targets(results: dict, quick: bool) -> list[dict]:
    sizes = results["sizes"]
    small, large = sizes[min(sizes, key=int)], sizes[max(sizes, key=int)]
    out = [target(f"reflora_ds / per-option scorer time, {small['rows']} rows (median of rounds)",
                  small["ratio_to_per_option"]["reflora_ds"]["median"], 0.35,
                  note="identical predictions" if small["same_predictions_as_per_option"] else "PREDICTIONS DIFFER")]
    if "ratio_to_lm_eval" in large:
        out.append(target(f"reflora_ds / lm-eval time, {large['rows']} rows", large["ratio_to_lm_eval"]["median"], 1.0,
                          note="identical predictions" if large.get("same_predictions_as_lm_eval") else
                          "predictions differ"))
    full = results["full"]
    out.append(target(f"--mode both on all {full['rows']} embedded rows, minutes", full["seconds"] / 60, 6.0))
    return out


def show(record: dict) -> None:
    res = record["results"]
    rows = []
    for n, e in res["sizes"].items():
        for name, s in e["seconds"].items():
            ratio = e["ratio_to_per_option"].get(name)
            rows.append([n, name, s["median"], f"{s['q25']:.3f}-{s['q75']:.3f}",
                         ratio["median"] if ratio else None, e["accuracy"].get(name)])
    print_table("likelihood scoring of the same rows (wall seconds, interleaved rounds)",
                ["rows", "scorer", "seconds", "quartiles", "ratio to per_option", "accuracy"], rows)
    full = res["full"]
    print_table(f"reflora-ds eval --mode both, all {full['rows']} embedded rows",
                ["seconds", "generate s", "likelihood s", "loss s", "generate acc", "likelihood acc", "unparsed"],
                [[full["seconds"], full["phases"].get("generate"), full["phases"].get("likelihood"),
                  full["phases"].get("loss"), full["accuracy"].get("generate"), full["accuracy"].get("likelihood"),
                  full["unparsed"]]])
    print_targets(record["targets"])


def plot(results: dict, out) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sizes = list(results["sizes"])
    names = sorted({name for e in results["sizes"].values() for name in e["seconds"]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results["sizes"][n]["seconds"].get(name, {}).get("median", 0.0) for n in sizes]
        ax.bar([j + i * width for j in range(len(sizes))], values, width, label=name, color=f"C{i}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"{n} rows" for n in sizes])
    ax.set_ylabel("seconds (median)")
    ax.set_title("likelihood scoring, same rows and options", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, out, "eval")
