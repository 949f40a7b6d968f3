"""Finding the LoRA factor pairs (A, B) of a PEFT model.

A pair is the r×m matrix ``A`` and the n×r matrix ``B`` whose product ``B A``
is one adapter's update of one base layer.  PEFT stores them as
``lora_A[name].weight`` / ``lora_B[name].weight`` (``nn.Linear``; this covers
``bitsandbytes`` 4/8-bit bases and ``fan_in_fan_out`` layers, whose LoRA
factors keep the plain layout) or, for embeddings, as
``lora_embedding_A[name]`` (r×num_embeddings) and ``lora_embedding_B[name]``
(dim×r).  Only the active adapters are returned: the others get no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .dist import full_shape


class UnsupportedLoraLayer(TypeError):
    """A LoRA layer whose factors are not two matrices (e.g. convolutions)."""


@dataclass(frozen=True)
class LoraPair:
    name: str  # e.g. "base_model.model.layers.0.self_attn.q_proj[default]"
    A: nn.Parameter  # r × m
    B: nn.Parameter  # n × r
    scaling: float

    @property
    def rank(self) -> int:
        return full_shape(self.A)[0]  # also under ZeRO-3, where A's data is a placeholder


def _active_adapters(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def find_lora_pairs(model: nn.Module, trainable_only: bool = True) -> list[LoraPair]:
    """All (A, B) pairs of the model's active LoRA adapters, in module order.

    Raises ``UnsupportedLoraLayer`` naming every LoRA module whose factors are
    not plain matrices, and ``ValueError`` when the model has no LoRA layer.
    """
    from peft.tuners.lora import LoraLayer

    pairs: list[LoraPair] = []
    unsupported: list[str] = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in _active_adapters(module):
            if adapter in module.lora_A:
                a_mod, b_mod = module.lora_A[adapter], module.lora_B[adapter]
                if type(a_mod) is not nn.Linear or type(b_mod) is not nn.Linear:
                    unsupported.append(f"{module_name} ({type(a_mod).__name__})")
                    continue
                A, B = a_mod.weight, b_mod.weight
            elif adapter in module.lora_embedding_A:
                A, B = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
            else:
                continue
            if trainable_only and not (A.requires_grad and B.requires_grad):
                continue
            pairs.append(LoraPair(f"{module_name}[{adapter}]", A, B, float(module.scaling[adapter])))
    if unsupported:
        raise UnsupportedLoraLayer(
            "RefLoRA needs LoRA factors that are matrices (Linear or Embedding layers); "
            "these LoRA modules are not supported: " + ", ".join(unsupported)
            + ". Remove them from lora_target_modules."
        )
    if not pairs:
        raise ValueError("the model has no trainable LoRA layer of an active adapter: wrap it with peft first")
    return pairs


def group_by_rank(pairs: list[LoraPair]) -> dict[int, list[int]]:
    """Indices of the pairs sharing each rank (one batched solve per rank)."""
    groups: dict[int, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.rank, []).append(i)
    return groups
