"""Taking a fine-tune away: PEFT adapters and merged models.

An adapter is `adapter_model.safetensors` + `adapter_config.json`, the layout
`peft.PeftModel.from_pretrained(base, dir)` loads. It comes from a model in
memory (plain, or inside a DeepSpeed engine at any ZeRO stage: the trainer
writes its adapters with export_adapter too) or from a DeepSpeed checkpoint on
disk. Inside an engine the weights are the fp32 masters the optimizer updates
(zero.full_fp32_master), not the working copy, which is bf16 under bf16
training. Under ZeRO-3 each rank holds only a slice of every parameter, and a
state dict taken without gathering is a set of shape-[0] tensors; the
trainable parameters are therefore gathered on all ranks first, and an adapter
with an empty or wrongly shaped tensor is refused, never written.

A merged model is the base with `scale·B·A` added to each adapted weight,
saved as sharded safetensors with config and tokenizer, so that transformers
loads it without PEFT. A 4-bit base is dequantized first: the adapter was
trained against the 4-bit weights, so the merge goes into an exact
full-precision copy of those (not into the original weights, if any), and the
output says so.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import RunConfig
from . import atomic, dist

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "reflora_config.yaml"  # the model settings of the run, so merge and eval can rebuild the base
TRAIN_CONFIG = "config.yaml"  # what `reflora-ds train` writes into its output_dir
MERGE_NOTE = "reflora_merge.json"

# Run-config keys that decide the base and the adapter's shape; the rest
# (data, optimizer) is not needed to rebuild the model, and its paths may be gone.
MODEL_KEYS = (
    "base_model", "gguf_file", "trust_remote_code", "torch_dtype", "load_in_4bit", "load_in_8bit",
    "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage",
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_dora",
)


class ExportError(RuntimeError):
    """An adapter or merge that would be wrong; nothing is written."""


# --- the adapter of a model in memory -------------------------------------------------


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trainable_state_dict(model_or_engine) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters, by module parameter name.

    Of a DeepSpeed engine: the fp32 masters, wherever ZeRO keeps them. Of a
    plain model: the parameters in their own dtype. A collective under ZeRO
    (1-3 for masters, 3 for parameters): call it on every rank.
    """
    engine = model_or_engine if dist.is_engine(model_or_engine) else None
    params = _trainable(dist.unwrap(model_or_engine))
    if not params:
        raise ExportError("the model has no trainable parameters: nothing to export")
    if engine is not None:
        from .zero import full_fp32_master

        # Every rank reads every master in the same order, also a ZeRO-1/2 rank
        # that holds no piece of it: each read is a collective.
        state = {name: full_fp32_master(engine, p).detach().to("cpu", torch.float32, copy=True)
                 for name, p in params}
    else:
        with dist.gathered([p for _, p in params]):
            # Copy inside the context: leaving it frees the gathered storage again.
            state = {name: p.detach().to("cpu", copy=True) for name, p in params}
    for name, p in params:
        if tuple(state[name].shape) != dist.full_shape(p):
            raise ExportError(f"{name}: gathered shape {tuple(state[name].shape)} != {dist.full_shape(p)}")
    return state


def check_tensors(state: dict[str, torch.Tensor], origin: str) -> None:
    """An adapter worth writing: tensors, none empty, none holding NaN or Inf."""
    if not state:
        raise ExportError(f"{origin}: the adapter has no tensors")
    empty = [name for name, t in state.items() if t.numel() == 0]
    if empty:
        raise ExportError(
            f"{origin}: {len(empty)} adapter tensors are empty (e.g. {empty[0]}, shape "
            f"{tuple(state[empty[0]].shape)}); a ZeRO-3 partition was read without gathering it"
        )
    bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise ExportError(f"{origin}: {len(bad)} adapter tensors hold NaN or Inf (e.g. {bad[0]}): the training "
                          "diverged; export an earlier checkpoint")


def adapter_state_dict(peft_model, state: dict[str, torch.Tensor], adapter_name: str = "default") -> dict:
    """Module parameter names -> the key names PEFT saves and loads (adapter name removed).

    Every trainable tensor must find a place in the adapter: a trainable
    parameter PEFT would not save (or a missing one) is an error, not a silent loss.
    """
    from peft import get_peft_model_state_dict

    expected = {name: dist.full_shape(p) for name, p in _trainable(peft_model)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            "the weights do not match the adapter's trainable parameters: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ExportError(f"{name}: shape {tuple(state[name].shape)}, the adapter expects {shape}")
    adapter = get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=adapter_name,
                                        save_embedding_layers=False)
    if len(adapter) != len(state):
        raise ExportError(f"PEFT's adapter keeps {len(adapter)} of the {len(state)} trainable tensors")
    return adapter


def _write_adapter(adapter: dict, peft_config, out_dir: Path, *, base_model: str | None,
                   run_config: RunConfig | None) -> None:
    """Both files into a private folder first, then moved into place: no half-written adapter."""
    check_tensors(adapter, str(out_dir))
    config = copy.deepcopy(peft_config)
    config.inference_mode = True
    if base_model is not None:
        config.base_model_name_or_path = base_model
    with atomic.staged_dir(out_dir, on_exists="merge") as tmp:
        save_file({k: v.contiguous() for k, v in adapter.items()}, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if run_config is not None:
            settings = {k: v for k, v in run_config.resolved().model_dump(mode="json").items() if k in MODEL_KEYS}
            (tmp / RUN_CONFIG).write_text(yaml.safe_dump(settings, sort_keys=False))


def export_adapter(
    model_or_engine,
    out_dir: str | Path,
    *,
    adapter_name: str = "default",
    base_model: str | None = None,
    run_config: RunConfig | None = None,
) -> Path:
    """Save the adapter of a PeftModel (or of the PeftModel inside a DeepSpeed engine).

    Call on every rank: reading ZeRO's partitions is a collective. Rank 0
    writes; the others wait for it. `base_model` is recorded as
    base_model_name_or_path. From an engine the tensors are the fp32 masters
    (what training would resume from); from a plain model its own parameters.
    """
    from peft import PeftModel

    model = dist.unwrap(model_or_engine)
    if not isinstance(model, PeftModel):
        raise ExportError(f"expected a PEFT model (or an engine around one), got {type(model).__name__}")
    state = trainable_state_dict(model_or_engine)
    check_tensors(state, "gathered parameters")
    # Checked on every rank, so that a bad adapter stops all of them (not rank 0 alone, leaving the rest waiting).
    adapter = adapter_state_dict(model, state, adapter_name)
    out_dir = Path(out_dir)
    if dist.is_main():
        _write_adapter(adapter, model.peft_config[adapter_name], out_dir, base_model=base_model,
                       run_config=run_config)
    dist.barrier()
    return out_dir


# --- the adapter of a DeepSpeed checkpoint ---------------------------------------------


def find_checkpoint(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(save_dir, tag) of a DeepSpeed checkpoint named by its save folder, its tag folder, or a folder of those.

    - with ``tag``: that tag inside ``path`` or inside ``path/checkpoints`` (a run folder);
    - save_dir with a `latest` file: the tag it names;
    - a tag folder (holds *model_states.pt): its parent and its name;
    - otherwise the newest such save_dir or tag folder below `path`, complete
      ones (``COMPLETE``, undamaged) first.
    """
    from .checkpoint import CHECKPOINTS, damage, is_complete

    path = Path(path)
    if tag is not None:
        for save_dir in (path, path / CHECKPOINTS):
            if (save_dir / tag).is_dir():
                return save_dir, tag
        raise ExportError(f"{path}: no checkpoint {tag!r} in it or in its {CHECKPOINTS}/ folder")
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if any(path.glob("*model_states.pt")):
        return path.parent, path.name
    found = {p.parent for p in path.rglob("latest") if p.is_file()}
    found |= {p.parent for p in path.rglob("*model_states.pt")}
    found = {p for p in found if not p.name.startswith(".")}  # .tmp-*: a save that never finished
    if not found:
        raise ExportError(f"{path}: no DeepSpeed checkpoint (no 'latest' file, no *model_states.pt) in or below it")
    complete = {p for p in found if is_complete(p) and damage(p) is None}
    return find_checkpoint(max(complete or found, key=_checkpoint_order))


def _checkpoint_order(path: Path) -> tuple[int, float]:
    """Newest first by the step number in the name (step-120 > step-80), then by time."""
    digits = re.findall(r"\d+", path.name)
    return (int(digits[-1]) if digits else -1, path.stat().st_mtime)


def checkpoint_trainable_weights(checkpoint_dir: str | Path, tag: str | None = None, *,
                                 trust: bool = False) -> dict[str, torch.Tensor]:
    """The trainable weights of a DeepSpeed checkpoint in fp32, by module parameter name.

    Checkpoints written by the trainer carry them as safetensors (tensors
    only). Otherwise, and only with ``trust``, DeepSpeed's own files are read:
    they are pickles, and loading one runs whatever code it names. ZeRO 1-3
    keep the full fp32 masters in their optimizer shards (zero_to_fp32 joins
    them); without ZeRO the module state is read (under bf16 the bf16 copy the
    model computed with: the stage-0 fp32 masters are stored without names).
    """
    from safetensors.torch import load_file

    from .checkpoint import TRAINABLE, damage, is_complete

    save_dir, found_tag = find_checkpoint(checkpoint_dir, tag)
    tag_dir = save_dir / found_tag
    problem = damage(tag_dir) if is_complete(tag_dir) else None
    if problem is not None:
        raise ExportError(f"{tag_dir} is damaged: {problem}; export an earlier checkpoint (--tag)")
    if (tag_dir / TRAINABLE).is_file():
        return {name: t.float() for name, t in load_file(str(tag_dir / TRAINABLE)).items()}
    if not trust:
        raise ExportError(
            f"{tag_dir} has no {TRAINABLE} (checkpoints of reflora-ds train have one); its DeepSpeed files are "
            "pickles, and reading them runs any code they hold: pass --trust-checkpoint only if you trust it"
        )
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), found_tag, exclude_frozen_parameters=True)
    else:
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ExportError(f"{tag_dir}: no model or optimizer states")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]  # trusted by the caller
    return {name: t.float() for name, t in state.items()}


def _meta_peft_model(base_source: str, peft_config, trust_remote_code: bool = False):
    """The PEFT model's structure without its weights: enough to name and shape the adapter."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_source, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a 4-bit base has the same LoRA shapes as its float twin
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return get_peft_model(base, copy.deepcopy(peft_config))


def export_from_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    base: RunConfig,
    *,
    tag: str | None = None,
    trust_checkpoint: bool = False,
) -> Path:
    """Write the adapter held by a DeepSpeed checkpoint (any ZeRO stage) from its fp32 weights.

    `base` is the run's configuration: it names the base model (whose config
    fixes the parameter names and shapes) and the LoRA settings.
    """
    from .models import lora_config, resolve_base

    weights = checkpoint_trainable_weights(checkpoint_dir, tag, trust=trust_checkpoint)
    check_tensors(weights, str(checkpoint_dir))
    source = resolve_base(base)
    peft_config = lora_config(base)
    model = _meta_peft_model(source, peft_config, base.trust_remote_code)
    adapter = adapter_state_dict(model, weights)
    out_dir = Path(out_dir)
    _write_adapter(adapter, model.peft_config["default"], out_dir, base_model=source, run_config=base)
    return out_dir


# --- merging -----------------------------------------------------------------------------


def model_config_near(path: str | Path) -> RunConfig | None:
    """The model settings of the run that produced `path` (an adapter, a checkpoint or an output folder).

    Looks in `path` and up to three folders above it for what export records
    next to an adapter or for the config.yaml training writes into output_dir.
    ``trust_remote_code`` is never taken from there: an adapter folder from
    elsewhere could name a base whose Python it wants run. Only the command
    line or the user's own --config turns it on.
    """
    from .config import KEY_ALIASES

    path = Path(path).resolve()
    for folder in [path, *list(path.parents)[:3]]:
        for name in (RUN_CONFIG, TRAIN_CONFIG):
            found = folder / name
            if not found.is_file():
                continue
            values = yaml.safe_load(found.read_text())
            if not isinstance(values, dict):
                continue
            values = {KEY_ALIASES.get(k, k): v for k, v in values.items()}
            if set(values) <= set(RunConfig.model_fields):
                return RunConfig(**{k: v for k, v in values.items() if k in MODEL_KEYS and k != "trust_remote_code"})
    return None


def base_of_adapter(adapter_dir: str | Path) -> RunConfig | None:
    """How to build an adapter's base: its run's settings, else the base_model_name_or_path it records."""
    cfg = model_config_near(adapter_dir)
    if cfg is not None:
        return cfg
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    if config_file.is_file():
        recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
        if recorded and Path(recorded).is_dir():
            return RunConfig(base_model=recorded)
    return None


def _dequantize_4bit_linears(model, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes Linear4bit by an nn.Linear holding its exact dequantized weight."""
    import bitsandbytes as bnb

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for name, module in targets:
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # An eval-mode CPU forward repacked it (see evaluate.inference_mode); undo that first.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(dense.reshape(module.out_features, module.in_features))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(targets)


def _prequantized_4bit_type(source: str) -> str | None:
    """nf4 / fp4 when `source` is a checkpoint saved already quantized to 4 bits by bitsandbytes, else None."""
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        return None
    quant = json.loads(config_file.read_text()).get("quantization_config") or {}
    if quant.get("load_in_4bit") or (quant.get("quant_method") == "bitsandbytes" and "4bit" in json.dumps(quant)):
        return quant.get("bnb_4bit_quant_type", "4-bit")
    return None


def load_merge_base(base: str | RunConfig, dtype: torch.dtype = torch.float32):
    """The base as a plain (unquantized) model and a note on where its weights came from."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import quantization_config, resolve_base

    cfg = base if isinstance(base, RunConfig) else RunConfig(base_model=str(base))
    if cfg.load_in_8bit:
        raise ExportError("merging into an 8-bit base is not supported; merge into its full-precision original")
    source = resolve_base(cfg)
    remote = {"trust_remote_code": True} if cfg.trust_remote_code else {}
    prequantized = _prequantized_4bit_type(source)
    if not (cfg.load_in_4bit or prequantized):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **remote)
        return model, source, {"dequantized_from_4bit": False}

    quant = quantization_config(cfg) if cfg.load_in_4bit else None
    quantized = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, device_map={"": "cpu"}, use_safetensors=True,
        **({"quantization_config": quant} if quant is not None else {}), **remote,
    )
    quant_type = quant.bnb_4bit_quant_type if quant is not None else prequantized
    count = _dequantize_4bit_linears(quantized, dtype)
    # Rebuild as a plain model: the loaded one still carries its quantizer and would save as 4-bit.
    config = AutoConfig.from_pretrained(source, **remote)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype, **remote)
    plain.load_state_dict(quantized.state_dict())
    del quantized
    note = {
        "dequantized_from_4bit": True,
        "quant_type": quant_type,
        "dequantized_layers": count,
        "note": (
            f"the base was a 4-bit ({quant_type}) model; the adapter was merged into an exact "
            f"{str(dtype).removeprefix('torch.')} dequantization of those 4-bit weights, not into the "
            "original full-precision weights"
        ),
    }
    return plain, source, note


def merge(
    base: str | RunConfig | None,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_size: str | int = "2GB",
    dtype: str | torch.dtype | None = None,
) -> dict:
    """Base + adapter merged and saved (sharded safetensors, config, tokenizer); returns the merge note.

    `base`: a model directory / hub id, a RunConfig (for 4-bit or GGUF bases),
    or None for what base_of_adapter finds. The merge runs in fp32; `dtype`
    (default: the base's own) is what gets saved.
    """
    from .models import DTYPES, load_tokenizer, resolve_base

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ExportError(f"{adapter_dir}: no {ADAPTER_CONFIG}; is this an adapter folder?")
    check_tensors(load_adapter_weights(adapter_dir), str(adapter_dir))
    if base is None:
        base = base_of_adapter(adapter_dir)
        if base is None:
            raise ExportError(f"{adapter_dir}: the adapter does not record a base model found on this machine; name it")
    _check_output(out_dir, {"the adapter": adapter_dir,
                            "the base model": resolve_base(base if isinstance(base, RunConfig)
                                                           else RunConfig(base_model=str(base)))})
    model, source, note = load_merge_base(base, torch.float32)
    save_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if save_dtype is None:
        cfg_dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
        save_dtype = cfg_dtype if cfg_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32

    peft_model = attach_adapter(model, adapter_dir)
    merged = peft_model.merge_and_unload().to(save_dtype)
    merged.config.use_cache = True  # training turns it off; a merged model is for inference

    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    run_cfg = base if isinstance(base, RunConfig) else None
    tokenizer = load_tokenizer(source, trust_remote_code=bool(run_cfg and run_cfg.trust_remote_code),
                               chat_template=run_cfg.chat_template if run_cfg else None)
    tokenizer.save_pretrained(out_dir)
    note = {"base": source, "adapter": str(adapter_dir.resolve()), "dtype": str(save_dtype).removeprefix("torch."),
            "max_shard_size": max_shard_size, **note}
    (out_dir / MERGE_NOTE).write_text(json.dumps(note, indent=2))
    _write_readme(out_dir, note)
    return note


def _write_readme(out_dir: Path, note: dict) -> None:
    lines = [
        "# Merged model",
        "",
        f"Base `{note['base']}` with the LoRA adapter `{note['adapter']}` merged into its weights",
        f"(saved as {note['dtype']} safetensors). Load it with transformers alone:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(\"{out_dir}\")",
        f"tokenizer = AutoTokenizer.from_pretrained(\"{out_dir}\")",
        "```",
    ]
    if note.get("dequantized_from_4bit"):
        lines += ["", f"Note: {note['note']}."]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def load_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an exported adapter (for checks and tests)."""
    return load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))


def attach_adapter(model, adapter_dir: str | Path):
    """``PeftModel.from_pretrained``, with an adapter of another base refused in one line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ExportError(f"{adapter_dir} was trained for another base model ({first}); pass the base it was "
                          "trained on with --base-model or --config") from None


def _check_output(out_dir: Path, inputs: dict[str, str | Path]) -> None:
    """An output folder that is neither an input nor inside one (nor holding one): merge never overwrites its inputs."""
    out = out_dir.expanduser().resolve()
    for what, path in inputs.items():
        path = Path(path).expanduser()
        if not path.exists():
            continue  # a hub id, not a folder of this machine
        path = path.resolve()
        if out == path or path in out.parents or out in path.parents:
            raise ExportError(f"--out {out_dir} is {what} ({path}) or inside it, or holds it: merging there would "
                              "overwrite the inputs; choose another folder")
