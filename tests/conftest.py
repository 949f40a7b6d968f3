"""Shared helpers: small PEFT models built in-process (nothing downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class TwoLayer(nn.Module):
    """A small regression net whose LoRA layers differ in shape (and rank)."""

    def __init__(self, d_in=12, d_hidden=10, d_out=6):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.act = nn.Tanh()
        self.down = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def tiny_peft(dtype=torch.float64, seed=0, r=4, rank_pattern=None, randomize_b=True):
    """A PEFT LoRA model over :class:`TwoLayer`; B is randomised unless asked not to."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = TwoLayer().to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["up", "down"], lora_dropout=0.0,
                     rank_pattern=rank_pattern or {})
    model = get_peft_model(base, cfg).to(dtype)  # PEFT keeps adapters in fp32 by default
    if randomize_b:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return model


def regression_batches(n_steps, batch=8, d_in=12, d_out=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 100)
    return [(torch.randn(batch, d_in, generator=g, dtype=dtype), torch.randn(batch, d_out, generator=g, dtype=dtype))
            for _ in range(n_steps)]


def delta_weights(model) -> dict[str, torch.Tensor]:
    """scale·B·A of every LoRA layer, in fp64."""
    from reflora_ds.lora_pairs import find_lora_pairs

    return {p.name: p.scaling * (p.B.detach().double() @ p.A.detach().double()) for p in find_lora_pairs(model)}


@pytest.fixture
def make_peft():
    return tiny_peft
