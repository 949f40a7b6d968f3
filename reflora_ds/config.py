"""The run configuration: one pydantic model, read from YAML, checked up front.

Key names follow Hugging Face / PEFT / LLM-Adapters so that a recipe from one of
those projects reads the same here. Everything that can be known to fail is
rejected here, before a model is loaded: a mistake in a config file should cost
a second, not a minute of loading followed by a crash.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RESOURCES = Path(__file__).resolve().parent / "resources"
DS_PRESET_DIR = RESOURCES / "ds_configs"
DS_PRESETS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
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


class RunConfig(BaseModel):
    """Everything one fine-tuning run needs; `None` paths mean the embedded defaults.

    The defaults follow the commonsense-reasoning recipe of the RefLoRA and
    LLM-Adapters papers (r=32, alpha=64, q/k/v/up/down, lr 2e-4, batch 16,
    2 epochs, cutoff 256, 100 warmup steps, refactor warmup 100).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- base model -------------------------------------------------------
    base_model: str | None = None  # HF directory or hub id; None = embedded SmolLM2-135M-Instruct
    gguf_file: str | None = None  # a .gguf path, or a file name inside base_model
    trust_remote_code: bool = False

    # --- data -------------------------------------------------------------
    data_path: str | None = None  # None = embedded ARC-Easy train split
    data_format: Literal["auto", "llm_adapters", "alpaca", "hf_disk"] = "auto"
    eval_data_path: str | None = None
    val_set_size: int = Field(0, ge=0)  # rows held out of the training data for validation
    skip_malformed_rows: bool = False
    prompt_template: Literal["alpaca"] = "alpaca"
    cutoff_len: int = Field(256, ge=8)

    # --- adapter ----------------------------------------------------------
    lora_r: int = Field(32, ge=1)
    lora_alpha: int = Field(64, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES)
    )
    use_dora: bool = False

    # --- quantized base (bitsandbytes) -----------------------------------
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: DType | None = None  # None = torch_dtype
    bnb_4bit_use_double_quant: bool = True
    # None = torch_dtype under ZeRO-3 (which requires it), else uint8 (the bitsandbytes default)
    bnb_4bit_quant_storage: StorageDType | None = None

    # --- precision and memory --------------------------------------------
    torch_dtype: DType = "float32"  # also accepts bf16 / fp32
    gradient_checkpointing: bool = False

    # --- optimisation -----------------------------------------------------
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(100, ge=0)
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    num_epochs: float = Field(2, gt=0)
    max_steps: int = -1  # optimizer steps; -1 = run num_epochs
    seed: int = 42

    # --- method -----------------------------------------------------------
    optimizer: Literal["reflora", "reflora_s", "refactor", "lora", "loraplus", "scaledgd"] = "reflora"
    refactor_warmup: int = Field(100, ge=0)  # optimizer steps before the first refactor (B starts at 0)
    refactor_interval: int = Field(1, ge=1)
    loraplus_lr_ratio: float = Field(16, gt=0)
    scaledgd_delta: float = Field(1e-6, gt=0)

    # --- DeepSpeed --------------------------------------------------------
    # a preset (zero0..zero3, zero2_offload, zero3_offload) or a JSON path; None = zero0
    deepspeed: str | None = None

    # --- output and bookkeeping ------------------------------------------
    output_dir: str = "runs/reflora"
    # "auto": the newest complete checkpoint in output_dir, if any; a path; None = always start fresh
    resume_from_checkpoint: str | None = "auto"
    logging_steps: int = Field(10, ge=1)
    eval_steps: int = Field(0, ge=0)  # 0 = evaluate only before training and at the end
    save_steps: int = Field(0, ge=0)  # 0 = save only at the end
    save_total_limit: int | None = Field(2, ge=1)  # the newest N checkpoints kept (the best one besides)

    # --- evaluation during training ----------------------------------------
    # Accuracy on the evaluation rows besides the loss (evaluate.evaluate);
    # None = on when every evaluation row carries an answer label.
    eval_accuracy: bool | None = None
    eval_accuracy_mode: Literal["likelihood", "generate"] = "likelihood"
    eval_accuracy_limit: int | None = Field(None, ge=1)  # score only the first N evaluation rows
    # Keep the checkpoint that scores best on this metric (HF Trainer's names).
    # Every evaluation then also saves a checkpoint, so each one can be chosen.
    metric_for_best_model: Literal["eval_loss", "eval_accuracy"] | None = None
    greater_is_better: bool | None = None  # None = inferred: False for eval_loss, True for eval_accuracy
    # metrics.jsonl is always written (the loss curve is drawn from it); "tensorboard" adds event files
    report_to: list[Literal["tensorboard", "jsonl"]] = Field(default_factory=lambda: ["jsonl", "tensorboard"])

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

        stage = zero_stage(self)
        if self.load_in_8bit and stage == 3:
            raise ValueError(
                f"load_in_8bit: 8-bit bases cannot be partitioned by ZeRO-3 (deepspeed: {self.deepspeed}); "
                "use load_in_4bit or a ZeRO stage below 3"
            )
        if self.load_in_4bit and stage == 3 and self.bnb_4bit_quant_storage not in (None, self.torch_dtype):
            raise ValueError(
                f"bnb_4bit_quant_storage: ZeRO-3 partitions 4-bit weights only when they are stored in the "
                f"parameter dtype ({self.torch_dtype}), got {self.bnb_4bit_quant_storage}; "
                f"set bnb_4bit_quant_storage: {self.torch_dtype}"
            )
        _check_path("data_path", self.data_path)
        _check_path("eval_data_path", self.eval_data_path)
        if self.gguf_file is not None and resolve_gguf(self) is None:
            raise ValueError(f"gguf_file: no such file: {self.gguf_file} (base_model: {self.base_model})")
        base = self.base_model
        if base is not None and _looks_like_path(base) and not Path(base).expanduser().exists():
            raise ValueError(f"base_model: no such directory: {self.base_model}")
        self._check_evaluation()
        return self

    def _check_evaluation(self) -> None:
        has_eval_set = self.eval_data_path is not None or self.val_set_size > 0
        if self.eval_accuracy and not has_eval_set:
            raise ValueError("eval_accuracy: there is no evaluation set; set eval_data_path or val_set_size")
        metric = self.metric_for_best_model
        if metric is None:
            return
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

    def resolved(self) -> RunConfig:
        """A copy with every 'None = follow another field' default made explicit."""
        values = self.model_dump()
        if values["bnb_4bit_compute_dtype"] is None:
            values["bnb_4bit_compute_dtype"] = self.torch_dtype
        if values["bnb_4bit_quant_storage"] is None:
            values["bnb_4bit_quant_storage"] = self.torch_dtype if zero_stage(self) == 3 else "uint8"
        if values["metric_for_best_model"] is not None and values["greater_is_better"] is None:
            values["greater_is_better"] = not values["metric_for_best_model"].endswith("loss")
        return RunConfig.model_validate(values)


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


def _check_path(field: str, value: str | None) -> None:
    if value is not None and not Path(value).expanduser().exists():
        raise ValueError(f"{field}: no such file or directory: {value}")


def resolve_gguf(cfg: RunConfig) -> Path | None:
    """The GGUF file named by `gguf_file` (a path, or a name inside `base_model`), if it exists."""
    if cfg.gguf_file is None:
        return None
    candidates = [Path(cfg.gguf_file).expanduser()]
    if cfg.base_model is not None:
        candidates.insert(0, Path(cfg.base_model).expanduser() / cfg.gguf_file)
    return next((path for path in candidates if path.is_file()), None)


# --- DeepSpeed configs ------------------------------------------------------


def ds_config_path(name_or_path: str) -> Path:
    """The JSON file behind a preset name or a path; raises ConfigError if there is none."""
    if name_or_path in DS_PRESETS:
        return DS_PRESET_DIR / f"{name_or_path}.json"
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    hint = _nearest(name_or_path, DS_PRESETS)
    raise ConfigError(
        f"deepspeed: {name_or_path!r} is neither a preset ({', '.join(DS_PRESETS)}) nor an existing JSON file"
        + (f"; did you mean {hint!r}?" if hint else "")
    )


def _read_ds_json(path: Path) -> dict:
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {err}") from None
    # The LoRA method lives in the client optimizer (gradient hooks, moment
    # rescales) and the schedule in the run config; a DeepSpeed-built optimizer
    # or scheduler would silently bypass both.
    for block, field in (("optimizer", "optimizer / learning_rate / weight_decay"),
                         ("scheduler", "lr_scheduler / warmup_steps")):
        if block in ds:
            raise ConfigError(
                f"deepspeed: {path} has its own {block!r} block; remove it and set {field} "
                f"in the run configuration instead (reflora_ds builds the {block} so that the "
                "refactoring method can act on it)"
            )
    return ds


def zero_stage(cfg: RunConfig) -> int:
    """The ZeRO stage the run will use; 0 for deepspeed: null (the zero0 preset)."""
    if cfg.deepspeed is None:
        return 0
    ds = _read_ds_json(ds_config_path(cfg.deepspeed))
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict | None:
    """The DeepSpeed config dict with every "auto" field filled from the run config.

    DeepSpeed itself does not understand "auto" (that is a Trainer convention), so
    the values are resolved here, from the one place that defines them.
    """
    if cfg.deepspeed is None:
        return None
    ds = copy.deepcopy(_read_ds_json(ds_config_path(cfg.deepspeed)))
    auto = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16.enabled": cfg.torch_dtype == "bfloat16",
    }

    def fill(node: dict, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                fill(value, dotted + ".")
            elif value == "auto":
                if dotted not in auto:
                    raise ConfigError(f"deepspeed: {dotted} is 'auto' but nothing in the run config sets it")
                node[key] = auto[dotted]

    fill(ds, "")
    return ds


# --- loading, overriding, dumping -------------------------------------------


def _nearest(key: str, choices: Any) -> str | None:
    match = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


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
    merged = dict(cfg_dict)
    if overrides:
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.resolved().model_dump(mode="json"), sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
