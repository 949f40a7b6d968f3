"""The run configuration: one pydantic model, read from YAML, checked up front.

Key names follow Hugging Face / PEFT / LLM-Adapters so that a recipe from one of
those projects reads the same here. Everything that can be known to fail is
rejected here, before a model is loaded: a mistake in a config file should cost
a second, not a minute of loading followed by a crash.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .methods import METHODS

RESOURCES = Path(__file__).resolve().parent / "resources"
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# What `reflora-ds train` runs when given no configuration file.
DEFAULT_RUN = RESOURCES / "default_run.yaml"

# Short spellings accepted for dtypes; the resolved config always holds the long one.
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
}

DType = Literal["bfloat16", "float32"]
StorageDType = Literal["uint8", "bfloat16", "float32", "float16"]


class ConfigError(ValueError):
    """A configuration that cannot run, with a message meant for the person who wrote it."""


def cache_dir() -> Path:
    """Where converted models and tokenized data are cached (env REFLORA_DS_CACHE)."""
    root = os.environ.get("REFLORA_DS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "reflora_ds"


def _normalise_dtype(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip().lower().removeprefix("torch.")
        return _DTYPE_ALIASES.get(value, value)
    return value


def _f(default: Any = ..., help: str = "", **constraints) -> Any:
    """A field with its help text, which the command line shows too (cli.py reads it from here)."""
    return Field(default, description=help, **constraints)


MethodName = Literal[METHODS]
DataFormat = Literal["auto", "llm_adapters", "alpaca", "chat_template", "hf_disk"]


class DatasetSpec(BaseModel):
    """One source of a run's training mixture (the keys axolotl users know, where they fit)."""

    model_config = ConfigDict(extra="forbid")

    path: str = _f(..., help="A JSON/JSONL/Parquet/CSV/Arrow file, a folder of them, a save_to_disk folder, "
                             "or a hub dataset id.")
    type: DataFormat = _f("auto", "Row format: llm_adapters, alpaca, chat_template (OpenAI messages or "
                                  "ShareGPT conversations), or auto.")
    split: str = _f("train", "The split to read, where the source has several.")
    field_messages: str | None = _f(None, "The column holding the conversation, when it is not messages or "
                                          "conversations.")
    weight: float | None = _f(None, "Rows taken, as a multiple of the source's (0.5: a random half; 2: every "
                                    "row twice).", gt=0)
    max_rows: int | None = _f(None, "At most this many rows of the source (a random choice).", ge=1)

    @field_validator("type", mode="before")
    @classmethod
    def _type_alias(cls, value: Any) -> Any:
        # axolotl's older names for conversation data
        return "chat_template" if value in ("sharegpt", "messages", "chat", "conversation") else value

    @model_validator(mode="after")
    def _one_amount(self) -> DatasetSpec:
        if self.weight is not None and self.max_rows is not None:
            raise ValueError(f"{self.path}: set weight or max_rows, not both")
        return self


class RunConfig(BaseModel):
    """Everything one fine-tuning run needs; `None` paths mean the embedded defaults.

    The defaults follow the commonsense-reasoning recipe of the RefLoRA and
    LLM-Adapters papers (r=32, alpha=64, q/k/v/up/down, lr 2e-4, batch 16,
    2 epochs, cutoff 256, 100 warmup steps, refactor warmup 100).

    Validation here reads no file: whether paths exist is checked by
    ``check_files``, and what the DeepSpeed config allows by
    ``ds_config.check``, in the commands that need them.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- base model -------------------------------------------------------
    base_model: str | None = _f(None, "HF model directory or hub id (default: SmolLM2-135M-Instruct).")
    gguf_file: str | None = _f(None, "A .gguf path, or a file name inside base_model.")
    trust_remote_code: bool = _f(False, "Run the Python code a model directory ships (only for bases you trust).")

    # --- data -------------------------------------------------------------
    data_path: str | None = _f(None, "Training data: LLM-Adapters/Alpaca JSON(L) or a datasets folder "
                                     "(default: the embedded ARC-Easy train split).")
    data_format: DataFormat = _f("auto", "Format of data_path: llm_adapters, alpaca, chat_template "
                                         "(conversations), or auto.")
    datasets: list[DatasetSpec] | None = _f(None, "A training mixture: a list of {path, type, split, weight | "
                                                  "max_rows} (instead of data_path).")
    chat_template: str | None = _f(None, "Chat template for conversation data, a Jinja string or a .jinja file "
                                         "(default: the tokenizer's own).")
    sample_packing: bool = _f(False, "Pack training samples into cutoff_len sequences (attention stays within "
                                     "each sample).")
    group_by_length: bool = _f(False, "Batch training samples of similar length together (less padding).")
    eval_data_path: str | None = _f(None, "Evaluation data (else val_set_size rows are held out).")
    val_set_size: int = _f(0, "Rows held out of the training data for evaluation.", ge=0)
    skip_malformed_rows: bool = _f(False, "Skip (and count) malformed rows instead of stopping.")
    prompt_template: Literal["alpaca"] = _f("alpaca", "Prompt template.")
    cutoff_len: int = _f(256, "Maximum tokens per sample.", ge=8)

    # --- adapter ----------------------------------------------------------
    lora_r: int = _f(32, "LoRA rank.", ge=1)
    lora_alpha: int = _f(64, "LoRA alpha (scale = alpha / r).", gt=0)
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.", ge=0, lt=1)
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="Module names to adapt (comma-separated on the command line), or all-linear.")
    use_dora: bool = _f(False, "DoRA (PEFT's use_dora).")

    # --- quantized base (bitsandbytes) -----------------------------------
    load_in_4bit: bool = _f(False, "Quantize the base to 4 bits (QLoRA).")
    load_in_8bit: bool = _f(False, "Quantize the base to 8 bits.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit quantization type.")
    bnb_4bit_compute_dtype: DType | None = _f(None, "4-bit compute dtype (default: torch_dtype).")
    bnb_4bit_use_double_quant: bool = _f(True, "Quantize the 4-bit block scales too.")
    bnb_4bit_quant_storage: StorageDType | None = _f(
        None, "4-bit storage dtype (default: torch_dtype under ZeRO-3, which requires it; else uint8).")

    # --- precision and memory --------------------------------------------
    torch_dtype: DType = _f("float32", "float32 or bfloat16 (also bf16 / fp32).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")

    # --- optimisation -----------------------------------------------------
    learning_rate: float = _f(2e-4, "Peak learning rate.", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping (0 disables it).", ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = _f("linear", "Decay after the warmup.")
    warmup_steps: int = _f(100, "Linear learning-rate warmup, in optimizer steps.", ge=0)
    micro_batch_size: int = _f(4, "Samples per forward, per rank.", ge=1)
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimizer step.", ge=1)
    num_epochs: float = _f(2, "Epochs, when max_steps is -1.", gt=0)
    max_steps: int = _f(-1, "Optimizer steps (-1: run num_epochs).")
    seed: int = _f(42, "Seed for initialisation, data order and dropout.")
    skip_nonfinite_steps: int = _f(0, "Steps in which a micro-batch with a NaN or Inf loss may be left out (on "
                                      "every rank) before the run stops; 0: the first one stops it (exit 3).", ge=0)

    # --- method -----------------------------------------------------------
    method: MethodName = _f("reflora", "How the LoRA factors train: " + ", ".join(METHODS)
                            + " (the key optimizer is read as method too).")
    refactor_warmup: int = _f(100, "Optimizer steps before the first refactor (B starts at 0).", ge=0)
    refactor_interval: int = _f(1, "Refactor every this many optimizer steps.", ge=1)
    loraplus_lr_ratio: float = _f(16, "LoRA+: B's learning rate over A's.", gt=0)
    scaledgd_delta: float = _f(1e-6, "ScaledGD: damping of the preconditioners.", gt=0)

    # --- DeepSpeed --------------------------------------------------------
    deepspeed: str | None = _f(None, "A preset (zero0 .. zero3, zero2_offload, zero3_offload) or a JSON file "
                                     "(default: zero0).")

    # --- output and bookkeeping ------------------------------------------
    output_dir: str = _f("runs/reflora", "Where checkpoints, metrics and the adapter go.")
    resume_from_checkpoint: str | None = _f(
        "auto", "auto (the newest complete checkpoint in output_dir), a checkpoint path, or null (start fresh).")
    logging_steps: int = _f(10, "Log the training loss every this many steps.", ge=1)
    eval_steps: int = _f(0, "Evaluate every this many steps (0: only before training and at the end).", ge=0)
    save_steps: int = _f(0, "Save a checkpoint every this many steps (0: only at the end).", ge=0)
    save_total_limit: int | None = _f(2, "Checkpoints kept (the newest; the best one besides).", ge=1)

    # --- evaluation during training ----------------------------------------
    eval_accuracy: bool | None = _f(None, "Score accuracy besides the loss (default: when every evaluation "
                                          "row has an answer label).")
    eval_accuracy_mode: Literal["likelihood", "generate"] = _f("likelihood", "How accuracy is scored.")
    eval_accuracy_limit: int | None = _f(None, "Score only the first N evaluation rows.", ge=1)
    metric_for_best_model: Literal["eval_loss", "eval_accuracy"] | None = _f(
        None, "Keep the checkpoint that scores best on this metric (every evaluation then saves one).")
    greater_is_better: bool | None = _f(None, "Default: false for eval_loss, true for eval_accuracy.")
    report_to: list[Literal["tensorboard", "jsonl"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="metrics.jsonl is always written; tensorboard adds event files.")

    # --- field normalisation ---------------------------------------------
    @field_validator("torch_dtype", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return _normalise_dtype(value)

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        # "q_proj,v_proj" from a command line reads as a list
        if isinstance(value, str) and value != "all-linear":
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("lora_target_modules")
    @classmethod
    def _modules_not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("needs at least one module name, or 'all-linear'")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _split_report_to(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be -1 (train for num_epochs) or a positive number of optimizer steps")
        return value

    # --- cross-field checks -----------------------------------------------
    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set; choose one")
        if self.datasets is not None and self.data_path is not None:
            raise ValueError("datasets and data_path are both set; data_path is the one-dataset shorthand: "
                             "list it under datasets instead")
        if self.datasets is not None and not self.datasets:
            raise ValueError("datasets: the list is empty; name at least one {path: ...}")
        if self.sample_packing and self.group_by_length:
            raise ValueError("sample_packing and group_by_length are both set; packing already removes the "
                             "padding that grouping reduces: choose one")
        has_eval_set = self.eval_data_path is not None or self.val_set_size > 0
        if self.eval_accuracy and not has_eval_set:
            raise ValueError("eval_accuracy: there is no evaluation set; set eval_data_path or val_set_size")
        metric = self.metric_for_best_model
        if metric is None:
            return self
        if not has_eval_set:
            raise ValueError(f"metric_for_best_model: {metric} needs an evaluation set; "
                             "set eval_data_path or val_set_size")
        # The best checkpoint is chosen among the evaluations every eval_steps,
        # each of which saves a checkpoint; without them only the last would count.
        if self.eval_steps == 0:
            raise ValueError("metric_for_best_model: set eval_steps > 0 (a checkpoint is saved at every "
                             "evaluation, and the best of them is kept)")
        if metric == "eval_accuracy" and self.eval_accuracy is False:
            raise ValueError("metric_for_best_model: eval_accuracy needs eval_accuracy on (it is false)")
        return self

    def resolved(self, zero_stage: int | None = None) -> RunConfig:
        """A copy with every 'None = follow another field' default made explicit.

        ``zero_stage`` (read from the DeepSpeed config when not given and it
        matters) decides the 4-bit storage default.
        """
        values = self.model_dump()
        if values["bnb_4bit_compute_dtype"] is None:
            values["bnb_4bit_compute_dtype"] = self.torch_dtype
        if values["bnb_4bit_quant_storage"] is None:
            if zero_stage is None:
                from .ds_config import zero_stage as stage_of

                zero_stage = stage_of(self) if self.deepspeed else 0
            values["bnb_4bit_quant_storage"] = self.torch_dtype if zero_stage == 3 else "uint8"
        if values["metric_for_best_model"] is not None and values["greater_is_better"] is None:
            values["greater_is_better"] = not values["metric_for_best_model"].endswith("loss")
        return RunConfig.model_validate(values)


def field_help(name: str) -> str:
    """The help text of a configuration key (the command line shows the same)."""
    return RunConfig.model_fields[name].description or ""


# --- what exists on disk -----------------------------------------------------------------


def check_files(cfg: RunConfig, *, data: bool = True) -> None:
    """The files a configuration names exist (the model's; with ``data`` the data's too)."""
    from .sources import MODEL_OFFLINE, hub_offline, looks_like_path

    named = [("data_path", cfg.data_path), ("eval_data_path", cfg.eval_data_path)]
    named += [(f"datasets[{i}].path", spec.path) for i, spec in enumerate(cfg.datasets or [])]
    for field, value in named if data else ():
        if value is None or Path(value).expanduser().exists():
            continue
        if looks_like_path(value):
            raise ConfigError(f"{field}: no such file or directory: {value}")
        if hub_offline():
            raise ConfigError(f"{field}: {value} is not a file or folder on this machine, and the hub is offline "
                              "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); give a local path")
    if data and cfg.chat_template is not None:
        from .chat import resolve_chat_template
        from .data import DataError

        try:
            resolve_chat_template(cfg.chat_template)
        except DataError as err:
            raise ConfigError(str(err)) from None
    if cfg.gguf_file is not None:
        if resolve_gguf(cfg) is None:
            raise ConfigError(f"gguf_file: no such file: {cfg.gguf_file} (base_model: {cfg.base_model})")
        return
    base = cfg.base_model
    if base is None:
        return
    path = Path(base).expanduser()
    if path.is_dir():
        _check_weights_format(base, path)
    elif looks_like_path(base) or path.exists():
        raise ConfigError(f"base_model: no such directory: {base}")
    elif hub_offline(MODEL_OFFLINE) and not _in_hub_cache(base):
        raise ConfigError(f"base_model: {base} is not a folder on this machine, and the hub is offline "
                          "(HF_HUB_OFFLINE) with no copy of it in the cache; give the path of a local model folder")


def _check_weights_format(base: str, path: Path) -> None:
    """Safetensors only: a pickled checkpoint (.bin, .pt) runs any code it holds when it is loaded."""
    if any(path.glob("*.safetensors")) or not (any(path.glob("*.bin")) or any(path.glob("*.pt"))):
        return
    raise ConfigError(
        f"base_model: {base} holds only PyTorch pickle weights (.bin): they are refused, since loading a pickle "
        "runs any code it holds. Convert the folder once, with a model you trust: python -c \"from transformers "
        f"import AutoModelForCausalLM as M; M.from_pretrained('{base}').save_pretrained('{base}-safetensors')\" "
        "(and copy the tokenizer files), then train from that folder"
    )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id: certainly not cached
        return False


def resolve_gguf(cfg: RunConfig) -> Path | None:
    """The GGUF file named by `gguf_file` (a path, or a name inside `base_model`), if it exists."""
    if cfg.gguf_file is None:
        return None
    candidates = [Path(cfg.gguf_file).expanduser()]
    if cfg.base_model is not None:
        candidates.insert(0, Path(cfg.base_model).expanduser() / cfg.gguf_file)
    return next((path for path in candidates if path.is_file()), None)


# --- loading, overriding, dumping -------------------------------------------


def _nearest(key: str, choices: Any) -> str | None:
    match = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


# Earlier names of keys, still read (a file may not use both spellings).
KEY_ALIASES = {"optimizer": "method"}


def _unalias(values: dict, origin: str) -> dict:
    values = dict(values)
    for old, new in KEY_ALIASES.items():
        if old in values:
            if new in values:
                raise ConfigError(f"{origin}: both {old!r} (the earlier name of {new!r}) and {new!r} are set; "
                                  f"keep {new!r}")
            values[new] = values.pop(old)
    return values


def _check_keys(keys: Any, origin: str) -> None:
    known = RunConfig.model_fields
    for key in keys:
        if key not in known:
            hint = _nearest(key, known)
            raise ConfigError(
                f"unknown key {key!r} in {origin}" + (f"; did you mean {hint!r}?" if hint else "")
            )


def override_from_cli(cfg_dict: dict, overrides: dict | None, *, skip_none: bool = True) -> dict:
    """Apply command-line values on top of the YAML values, before validation.

    With `skip_none` a None means "option not given", which is how CLI parsers
    report unset options; pass skip_none=False to set a field to null.
    """
    merged = _unalias(cfg_dict, "configuration")
    if overrides:
        overrides = _unalias(overrides, "command-line overrides")
        _check_keys(overrides, "command-line overrides")
        merged.update({k: v for k, v in overrides.items() if v is not None or not skip_none})
    return merged


def parse_overrides(items: list[str]) -> dict:
    """Turn ["lora_r=8", "report_to=[jsonl]"] into a dict, reading each value as YAML."""
    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return parsed


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        field = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        # Cross-field messages already start with the field they are about.
        lines.append(message if not field else f"{field}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(values: dict, origin: str = "configuration") -> RunConfig:
    """Validate a plain dict into a RunConfig, turning every failure into a ConfigError."""
    values = _unalias(values, origin)
    _check_keys(values, origin)
    try:
        return RunConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path | None, overrides: dict | None = None, *, skip_none: bool = True) -> RunConfig:
    """Read a YAML run config (None = all defaults) and apply CLI overrides (see override_from_cli)."""
    values: dict = {}
    origin = "configuration"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of key: value pairs at the top level")
        values = loaded or {}
    return build_config(override_from_cli(values, overrides, skip_none=skip_none), origin)


def dump_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (what actually ran, defaults included)."""
    from .atomic import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, yaml.safe_dump(cfg.resolved().model_dump(mode="json"), sort_keys=False))
