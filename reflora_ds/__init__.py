"""RefLoRA (refactored low-rank adaptation) for PEFT models, native to DeepSpeed ZeRO."""

from .lora_pairs import LoraPair, UnsupportedLoraLayer, find_lora_pairs
from .methods import METHODS, REGISTRY, Method, MethodConfig
from .optim import RefLoRA, TorchStepper, attach, param_groups

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "REGISTRY",
    "LoraPair",
    "Method",
    "MethodConfig",
    "RefLoRA",
    "TorchStepper",
    "UnsupportedLoraLayer",
    "attach",
    "find_lora_pairs",
    "param_groups",
]
