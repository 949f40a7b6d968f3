"""The ``reflora-ds`` command line: every command, its flags and its exit statuses.

The flags of configuration keys take their help from the keys (config.py).
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="RefLoRA fine-tuning for PEFT models under DeepSpeed ZeRO 0-3.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    local_rank: int = typer.Option(None, "--local_rank", "--local-rank", hidden=True,
                                   help="Set by the deepspeed launcher; ranks come from its environment."),
):
    """RefLoRA fine-tuning for PEFT models under DeepSpeed ZeRO 0-3."""


@app.command()
def toy(out: Path = typer.Option(Path("out/toy"), "--out", help="Folder for toy.json and toy.png."),
        iters: int = typer.Option(100, help="Gradient-descent iterations per run.")):
    """The paper's matrix-factorisation experiment: min ½‖BA − Y‖² with LoRA, ScaledGD, RefLoRA, RefLoRA-S."""
    from rich.console import Console
    from rich.table import Table

    from .toy import run_all

    result = run_all(out, iters)
    table = Table(title="½‖BA − Y‖²: iterations to reach 1e-3 and final loss")
    for col in ("method", "step size", "iters to 1e-3", f"loss after {iters}"):
        table.add_column(col)
    for run in result["runs"]:
        final = run["loss"][-1]
        table.add_row(run["method"], str(run["lr"]), str(run["iters_to_1e-3"] or "never"),
                      "diverged" if final is None else f"{final:.3g}")
    Console().print(table)
    typer.echo(f"wrote {out / 'toy.json'} and {out / 'toy.png'}")


# --- train / preprocess ----------------------------------------------------------------

CONFIG_EXIT_CODE = 2  # a configuration or data error: nothing was trained or written


def _fail(err: Exception, code: int = CONFIG_EXIT_CODE) -> None:
    """One line on stderr (rank 0 only under a launcher), no traceback, exit 2 (or ``code``)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        message = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(config: Path | None, flags: dict, sets: list[str]):
    """The run configuration: the file (or the embedded default run), --set values, then flags.

    Its files and its DeepSpeed config are checked too: the commands that call
    this train or tokenize, and need both.
    """
    from .config import DEFAULT_RUN, check_files, load_config, parse_overrides
    from .ds_config import check

    overrides = parse_overrides(sets or [])  # key=null really sets null
    overrides.update({key: value for key, value in flags.items() if value is not None})
    if isinstance(overrides.get("resume_from_checkpoint"), str) and \
            overrides["resume_from_checkpoint"].lower() in ("null", "none"):
        overrides["resume_from_checkpoint"] = None  # the flag's spelling of "start fresh"
    cfg = load_config(config if config is not None else DEFAULT_RUN, overrides, skip_none=False)
    check_files(cfg)
    check(cfg)
    return cfg


_CONFIG_ARG = typer.Argument(None, metavar="[CONFIG.yaml]", show_default=False,
                             help="Run configuration (YAML). Without one: the embedded default run.")
_SET = typer.Option(None, "--set", metavar="KEY=VALUE",
                    help="Set any configuration key (value read as YAML); repeatable.")


def _opt(key: str, *names: str, **kwargs):
    """A flag for a configuration key, with the help text the key declares (config.py)."""
    from .config import field_help

    return typer.Option(None, *names, help=field_help(key), **kwargs)


@app.command()
def train(
    config: Path = _CONFIG_ARG,
    base_model: str = _opt("base_model"),
    data_path: str = _opt("data_path"),
    eval_data_path: str = _opt("eval_data_path"),
    output_dir: str = _opt("output_dir"),
    method: str = _opt("method", "--method", "--optimizer"),
    deepspeed: str = _opt("deepspeed"),
    lora_r: int = _opt("lora_r"),
    lora_alpha: int = _opt("lora_alpha"),
    learning_rate: float = _opt("learning_rate"),
    micro_batch_size: int = _opt("micro_batch_size"),
    gradient_accumulation_steps: int = _opt("gradient_accumulation_steps"),
    max_steps: int = _opt("max_steps"),
    num_epochs: float = _opt("num_epochs"),
    cutoff_len: int = _opt("cutoff_len"),
    refactor_warmup: int = _opt("refactor_warmup"),
    load_in_4bit: bool = _opt("load_in_4bit", "--load-in-4bit/--no-load-in-4bit"),
    torch_dtype: str = _opt("torch_dtype"),
    seed: int = _opt("seed"),
    resume_from_checkpoint: str = _opt("resume_from_checkpoint"),
    sets: list[str] = _SET,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved configuration (YAML) and exit."),
):
    """Fine-tune a base model with LoRA and RefLoRA on the DeepSpeed engine.

    Resumes from the newest complete checkpoint in output_dir by default. Exit
    status: 0 done, 2 configuration, data or checkpoint error, 3 the loss or
    gradient stopped being finite (nothing saved past the last good
    checkpoint), 143 stopped by SIGTERM after saving a checkpoint (run the
    same command again to resume).
    """
    flags = {k: v for k, v in locals().items() if k not in ("config", "sets", "dry_run")}
    from .config import ConfigError
    from .data import DataError

    try:
        cfg = _load(config, flags, sets)
        if dry_run:
            import yaml

            typer.echo(yaml.safe_dump(cfg.resolved().model_dump(mode="json"), sort_keys=False), nl=False)
            return
    except ConfigError as err:
        _fail(err)

    from .stops import DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE, Diverged
    from .train import train as run_training

    try:
        summary = run_training(cfg)
    except (ConfigError, DataError, FileNotFoundError) as err:
        _fail(err)
    except Diverged as err:
        _fail(err, DIVERGED_EXIT_CODE)
    if summary["status"] == "preempted":
        raise typer.Exit(PREEMPTED_EXIT_CODE)


@app.command()
def preprocess(
    config: Path = _CONFIG_ARG,
    show: int = typer.Option(0, help="Index of the training sample to print."),
    data_path: str = _opt("data_path"),
    eval_data_path: str = _opt("eval_data_path"),
    sets: list[str] = _SET,
    base_model: str = _opt("base_model"),
    cutoff_len: int = _opt("cutoff_len"),
):
    """Tokenize the data once into the cache (so ranks never wait on tokenization) and show a sample.

    Prompt tokens, which the loss skips, are printed inside ⟦ ⟧.
    """
    from .config import ConfigError
    from .data import DataError, describe_data, render_sample, tokenize_datasets
    from .metrics import quiet_libraries
    from .models import load_tokenizer, resolve_base

    quiet_libraries()
    flags = dict(base_model=base_model, data_path=data_path, eval_data_path=eval_data_path, cutoff_len=cutoff_len)
    try:
        cfg = _load(config, flags, sets)
        tokenizer = load_tokenizer(resolve_base(cfg), trust_remote_code=cfg.trust_remote_code,
                                   chat_template=cfg.chat_template)
        train_set, eval_set, stats = tokenize_datasets(cfg, tokenizer)
    except (ConfigError, DataError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(f"cache: {stats['cache']}")
    typer.echo(describe_data(stats, train_set, eval_set))
    if not 0 <= show < len(train_set):
        _fail(ValueError(f"--show {show} is outside 0..{len(train_set) - 1}"))
    typer.echo(f"\nsample {show}: " + render_sample(train_set[show], tokenizer))


# --- eval / export / merge ----------------------------------------------------------------


def _model_settings(config: Path | None, near: Path | None, base_model: str | None, *, required: bool = False,
                    trust_remote_code: bool = False):
    """Base and LoRA settings: --config, else the run's found near an adapter or checkpoint; --base-model last.

    trust_remote_code comes from --trust-remote-code or the user's own --config only, never from files
    found beside an adapter (export.model_config_near).
    """
    from .config import ConfigError, RunConfig, build_config, check_files, load_config
    from .export import MODEL_KEYS, base_of_adapter

    if config is not None:
        cfg = load_config(config)
        cfg = RunConfig(**{k: v for k, v in cfg.model_dump().items() if k in MODEL_KEYS})
    else:
        cfg = base_of_adapter(near) if near is not None else None
        if cfg is None and required:
            raise ConfigError(f"{near}: no config.yaml of the run found in or above it; pass --config")
        cfg = cfg or RunConfig()
    overrides = {"trust_remote_code": True} if trust_remote_code else {}
    if base_model is not None:
        overrides.update(base_model=base_model, gguf_file=None)
    if overrides:
        cfg = build_config({**cfg.model_dump(), **overrides}, "the command line")
    check_files(cfg, data=False)
    return cfg


_TRUST_CODE = typer.Option(False, "--trust-remote-code", help="Run the Python code the base model's folder ships "
                                                              "(only for bases you trust).")


def _progress_bar(enabled: bool):
    """A rich progress bar per (set, stage), and the progress(stage, done, total) callback evaluate feeds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   transient=True, disable=not enabled)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done)

    return bar, update


_MODEL_CONFIG = typer.Option(None, help="Run configuration (YAML) whose base-model settings to use "
                                        "(e.g. load_in_4bit).")


@app.command("eval")
def eval_command(
    base_model: str = typer.Option(None, help="HF model directory, hub id or merged model "
                                              "(default: the adapter's base, else SmolLM2-135M-Instruct)."),
    adapter: Path = typer.Option(None, help="PEFT adapter folder to load onto the base."),
    data: list[Path] = typer.Option(None, "--data", help="LLM-Adapters/Alpaca JSON(L) set; repeatable "
                                                         "(default: the embedded ARC-Easy test set)."),
    mode: str = typer.Option("generate", help="generate (greedy, then parse the label), likelihood "
                                              "(best-scoring label), or both."),
    limit: int = typer.Option(None, help="Only the first N rows of each set."),
    batch_size: int = typer.Option(8, help="Sequences per forward in likelihood mode and for the loss."),
    generate_batch_size: int = typer.Option(32, help="Prompts per generate call (a decoding step costs "
                                                     "little more for more prompts)."),
    max_new_tokens: int = typer.Option(32, help="Tokens generated per prompt."),
    loss: bool = typer.Option(True, "--loss/--no-loss", help="Also report response-token loss and perplexity."),
    cutoff_len: int = typer.Option(256, help="Maximum tokens per sample for the loss."),
    config: Path = _MODEL_CONFIG,
    out: Path = typer.Option(Path("eval_results.json"), help="JSON report with every row's prediction."),
    trust_remote_code: bool = _TRUST_CODE,
):
    """Accuracy (and loss/perplexity) of a base model, optionally with an adapter, on multiple-choice sets.

    Labels answerN, true/false, optionN, solutionN and ending N are read from
    each row's `answer`; the allowed labels from its "Answer format:" line. Under
    a launcher (deepspeed --num_gpus N, torchrun) the rows are split across ranks
    and rank 0 reports.
    """
    import json
    import time

    import torch
    from rich.console import Console

    from .config import ConfigError
    from .data import EMBEDDED_TEST, DataError
    from .dist import init_from_launcher, rank_and_world
    from .evaluate import MODES, EvalError, evaluate, results_json, results_table
    from .export import ADAPTER_CONFIG, ExportError, attach_adapter
    from .models import load_base_model, resolve_base

    modes = list(MODES) if mode == "both" else [mode]
    if any(m not in MODES for m in modes):
        _fail(ValueError(f"--mode {mode}: choose generate, likelihood or both"))
    # The arguments first: a missing file should cost a second, not a model load.
    if adapter is not None and not (adapter / ADAPTER_CONFIG).is_file():
        _fail(FileNotFoundError(f"--adapter {adapter}: no {ADAPTER_CONFIG} there; is it an adapter folder?"))
    for path in data or []:
        if not path.is_file():
            _fail(FileNotFoundError(f"--data {path}: no such file"))
    init_from_launcher()
    rank, world = rank_and_world()
    started = time.perf_counter()
    try:
        cfg = _model_settings(config, adapter, base_model, trust_remote_code=trust_remote_code)
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_base_model(cfg, device=device)
        if not cfg.load_in_4bit and not cfg.load_in_8bit:
            model = model.to(device)
        if adapter is not None:
            model = attach_adapter(model, adapter)
        bar, progress = _progress_bar(enabled=rank == 0)
        with bar:
            results = [evaluate(model, tokenizer, path, modes=modes, loss=loss, limit=limit, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, cutoff_len=cutoff_len, progress=progress,
                                generate_batch_size=generate_batch_size)
                       for path in (data or [EMBEDDED_TEST])]
    except (ConfigError, DataError, EvalError, ExportError, FileNotFoundError, ValueError) as err:
        _fail(err)
    if rank != 0:
        return
    source = resolve_base(cfg)
    title = f"{Path(source).name}" + (f" + {adapter}" if adapter else "")
    Console().print(results_table(results, title=title))
    for result in results:
        if result.note:
            typer.echo(f"note: {result.task}: {result.note}")
    meta = {"base_model": source, "adapter": str(adapter) if adapter else None, "modes": modes, "limit": limit,
            "batch_size": batch_size, "generate_batch_size": generate_batch_size, "max_new_tokens": max_new_tokens,
            "world_size": world,
            "load_in_4bit": cfg.load_in_4bit, "seconds": round(time.perf_counter() - started, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results_json(results, meta), indent=2))
    typer.echo(f"wrote {out}")


@app.command()
def export(
    source: Path = typer.Argument(..., help="A training output_dir, its checkpoints/ folder, or one checkpoint."),
    out: Path = typer.Option(..., "--out", help="Folder for adapter_model.safetensors and adapter_config.json."),
    config: Path = typer.Option(None, help="The run's configuration (default: config.yaml of the output_dir)."),
    tag: str = typer.Option(None, help="Checkpoint tag inside SOURCE or its checkpoints/ folder, e.g. step-400 "
                                       "(default: the newest complete one)."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Read a checkpoint without "
                                          "trainable_fp32.safetensors from DeepSpeed's pickles, which run any "
                                          "code they hold: only checkpoints you trust."),
    trust_remote_code: bool = _TRUST_CODE,
):
    """A PEFT adapter from a DeepSpeed checkpoint (any ZeRO stage), in fp32.

    Loads with peft.PeftModel.from_pretrained(base, OUT). The run's config
    names the base and the LoRA settings that fix the adapter's layout.
    """
    from .config import ConfigError
    from .export import ExportError, export_from_checkpoint, find_checkpoint, load_adapter_weights

    try:
        save_dir, found = find_checkpoint(source, tag)  # first: is SOURCE a checkpoint at all?
        cfg = _model_settings(config, save_dir / found, None, required=True, trust_remote_code=trust_remote_code)
        export_from_checkpoint(save_dir, out, cfg, tag=found, trust_checkpoint=trust_checkpoint)
    except (ConfigError, ExportError, FileNotFoundError, ValueError) as err:
        _fail(err)
    tensors = load_adapter_weights(out)
    typer.echo(f"checkpoint {save_dir / found} -> {out} ({len(tensors)} tensors, "
               f"{sum(t.numel() for t in tensors.values()):,} parameters)")


@app.command()
def merge(
    adapter: Path = typer.Option(..., help="PEFT adapter folder."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged model (safetensors, config, tokenizer)."),
    base_model: str = typer.Option(None, help="Base model (default: the one the adapter's run used)."),
    config: Path = _MODEL_CONFIG,
    max_shard_size: str = typer.Option("2GB", help="Largest safetensors shard."),
    dtype: str = typer.Option("auto", help="Saved dtype: auto (the base's), float32, bfloat16 or float16."),
    trust_remote_code: bool = _TRUST_CODE,
):
    """Merge an adapter into its base and save a model that transformers loads without PEFT.

    A 4-bit base is dequantized exactly and the adapter merged into that
    full-precision copy (the output's README and reflora_merge.json say so).
    """
    from .config import ConfigError
    from .export import ExportError
    from .export import merge as merge_adapter

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        _fail(ValueError(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16"))
    try:
        base = _model_settings(config, adapter, base_model, trust_remote_code=trust_remote_code)
        note = merge_adapter(base, adapter, out, max_shard_size=max_shard_size,
                             dtype=None if dtype == "auto" else dtype)
    except (ConfigError, ExportError, FileNotFoundError, ValueError) as err:
        _fail(err)
    typer.echo(f"merged {note['base']} + {adapter} -> {out} ({note['dtype']})")
    if note.get("dequantized_from_4bit"):
        typer.echo(f"note: {note['note']}")


# --- bench ---------------------------------------------------------------------------------


@app.command("lm-eval-tasks")
def lm_eval_tasks(
    data: list[Path] = typer.Option(..., "--data", help="LLM-Adapters-format set (JSON); repeatable."),
    out: Path = typer.Option(Path("lm_eval_tasks"), "--out", help="Folder for the task YAMLs and their utils.py."),
):
    """lm-eval tasks for LLM-Adapters sets: score an exported adapter with lm-eval on the same prompts and options.

    Then: lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER --include_path OUT --tasks NAME
    (pip install 'reflora_ds[eval]' brings lm-eval).
    """
    from .lmeval import write_tasks

    for path in data:
        if not path.is_file():
            _fail(FileNotFoundError(f"--data {path}: no such file"))
    names = write_tasks(data, out)
    typer.echo(f"wrote {len(names)} task(s) to {out}: {', '.join(names)}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                "help_option_names": []})
def bench(ctx: typer.Context):
    """Run a benchmark suite from a checkout (the benchmarks/ folder beside the package); arguments as
    python -m benchmarks: SUITE [--quick] [--out DIR] [suite options], or report. See BENCHMARKS.md."""
    import sys

    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "__init__.py").is_file():
        _fail(FileNotFoundError("the benchmarks live in the source repository, not in the installed package: "
                                "run reflora-ds bench from a checkout installed with pip install -e ."))
    sys.path.insert(0, str(checkout))
    from benchmarks import main as run_benchmarks

    raise typer.Exit(run_benchmarks(list(ctx.args)))


def main():  # pragma: no cover
    app(prog_name="reflora-ds")


if __name__ == "__main__":  # pragma: no cover
    main()
