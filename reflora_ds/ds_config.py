"""The DeepSpeed config of a run: presets, reading, and one resolver that fills and checks it.

A DeepSpeed config may say ``"auto"`` for what the run configuration already
fixes (batch sizes, accumulation, clipping, bf16), the Hugging Face Trainer's
convention; DeepSpeed itself does not understand ``"auto"``, so ``resolve``
fills those fields from the run configuration and checks every literal value
against it. A literal that disagrees (a preset's ``gradient_accumulation_steps:
8`` in a run with 4) would make the loop and the engine disagree on where an
optimizer step ends: silent wrong training, so it is an error, listing every
disagreement at once.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

from .config import RESOURCES, ConfigError, RunConfig

PRESET_DIR = RESOURCES / "ds_configs"  # the top-level ds_configs/ folder holds the same files
PRESETS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
# What `deepspeed: null` runs: DeepSpeed's engine without ZeRO partitioning.
DEFAULT_PRESET = "zero0"


def preset_path(name_or_path: str) -> Path:
    """The JSON file behind a preset name or a path; ConfigError if there is none."""
    if name_or_path in PRESETS:
        return PRESET_DIR / f"{name_or_path}.json"
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    match = difflib.get_close_matches(name_or_path, PRESETS, n=1, cutoff=0.5)
    raise ConfigError(
        f"deepspeed: {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file"
        + (f"; did you mean {match[0]!r}?" if match else "")
    )


def read(name_or_path: str) -> dict:
    """The JSON of a preset or file, refusing an optimizer or scheduler of its own."""
    path = preset_path(name_or_path)
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
    ds = read(cfg.deepspeed or DEFAULT_PRESET)
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def check(cfg: RunConfig) -> None:
    """What the run configuration and its ZeRO stage cannot do together (before any model loads)."""
    stage = zero_stage(cfg)
    if cfg.load_in_8bit and stage == 3:
        raise ConfigError(
            f"load_in_8bit: 8-bit bases cannot be partitioned by ZeRO-3 (deepspeed: {cfg.deepspeed}); "
            "use load_in_4bit or a ZeRO stage below 3"
        )
    if cfg.load_in_4bit and stage == 3 and cfg.bnb_4bit_quant_storage not in (None, cfg.torch_dtype):
        raise ConfigError(
            f"bnb_4bit_quant_storage: ZeRO-3 partitions 4-bit weights only when they are stored in the "
            f"parameter dtype ({cfg.torch_dtype}), got {cfg.bnb_4bit_quant_storage}; "
            f"set bnb_4bit_quant_storage: {cfg.torch_dtype}"
        )


def resolve(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config dict for this run and world: "auto" filled, every literal checked.

    A literal that disagrees with the run configuration is an error naming
    both values, and a field left out is set from the run configuration; fp16
    is refused (loss scaling may skip optimizer steps).
    """
    name = cfg.deepspeed or DEFAULT_PRESET
    ds = copy.deepcopy(read(name))
    wanted = {
        "train_micro_batch_size_per_gpu": (cfg.micro_batch_size, "micro_batch_size"),
        "gradient_accumulation_steps": (cfg.gradient_accumulation_steps, "gradient_accumulation_steps"),
        "train_batch_size": (cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
                             f"micro_batch_size × gradient_accumulation_steps × {world_size} ranks"),
        "gradient_clipping": (cfg.max_grad_norm, "max_grad_norm"),
        "bf16.enabled": (cfg.torch_dtype == "bfloat16", "torch_dtype"),
    }
    disagreements = []

    def fill(node: dict, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                fill(value, dotted + ".")
            elif dotted in wanted:
                expected, source = wanted[dotted]
                if value == "auto":
                    node[key] = expected
                elif not _same(value, expected):
                    disagreements.append(f"{dotted} is {value!r} there, {expected!r} from {source} here")
            elif value == "auto":
                raise ConfigError(f"deepspeed: {dotted} is 'auto' but nothing in the run config sets it")

    fill(ds, "")
    # What the file leaves out, the run configuration decides (DeepSpeed's own defaults would differ silently).
    for dotted, (expected, _) in wanted.items():
        node, key = (ds.setdefault("bf16", {}), "enabled") if dotted == "bf16.enabled" else (ds, dotted)
        node.setdefault(key, expected)
    if disagreements:
        raise ConfigError(
            f"deepspeed: {name} disagrees with the run configuration: " + "; ".join(disagreements)
            + ". Set these fields to \"auto\" in the DeepSpeed config, or make the two agree"
        )
    if ds.get("fp16", {}).get("enabled") not in (None, False):
        raise ConfigError("deepspeed: fp16 is not supported (loss scaling may skip steps); use bf16 or fp32")
    return ds


def _same(literal, expected) -> bool:
    if isinstance(expected, bool) or isinstance(literal, bool):
        return bool(literal) == bool(expected)
    try:
        return float(literal) == float(expected)
    except (TypeError, ValueError):
        return False
