"""Finding LoRA factor pairs in PEFT models of every supported layer type."""

import pytest
import torch
from torch import nn

from reflora_ds import UnsupportedLoraLayer, find_lora_pairs


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 6)
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def peft(model, targets, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, **kw))


def test_linear_and_embedding_pairs_have_lora_shapes():
    model = peft(Mixed(), ["emb", "proj"])
    pairs = {p.name: p for p in find_lora_pairs(model)}
    assert set(pairs) == {"base_model.model.emb[default]", "base_model.model.proj[default]"}
    emb, proj = pairs["base_model.model.emb[default]"], pairs["base_model.model.proj[default]"]
    assert emb.A.shape == (2, 20) and emb.B.shape == (8, 2)  # r × num_embeddings, dim × r
    assert proj.A.shape == (2, 8) and proj.B.shape == (6, 2)
    assert proj.scaling == 2.0 and proj.rank == 2
    # the embedding pair's product really is the embedding update (transposed)
    with torch.no_grad():
        emb.B.normal_()
    ids = torch.arange(20)
    layer = model.base_model.model.emb
    delta = layer(ids) - layer.base_layer(ids)
    torch.testing.assert_close(delta, emb.scaling * (emb.B @ emb.A).T, rtol=1e-5, atol=1e-6)


def test_convolution_is_refused_with_its_name():
    model = peft(Mixed(), ["proj", "conv"])
    with pytest.raises(UnsupportedLoraLayer, match=r"base_model\.model\.conv \(Conv2d\)"):
        find_lora_pairs(model)


def test_only_active_adapters_are_returned():
    from peft import LoraConfig

    model = peft(Mixed(), ["proj"])
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=3, target_modules=["proj"]))
    assert [p.name for p in find_lora_pairs(model)] == ["base_model.model.proj[default]"]
    model.set_adapter("second")
    pairs = find_lora_pairs(model)
    assert [p.name for p in pairs] == ["base_model.model.proj[second]"] and pairs[0].rank == 3


def test_fan_in_fan_out_layers_keep_the_plain_factor_layout():
    from transformers.pytorch_utils import Conv1D

    class GPT2ish(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(12, 8)  # nx=8 in, nf=12 out, weight stored 8×12

        def forward(self, x):
            return self.c_attn(x)

    model = peft(GPT2ish(), ["c_attn"], fan_in_fan_out=True)
    (pair,) = find_lora_pairs(model)
    assert pair.A.shape == (2, 8) and pair.B.shape == (12, 2)


def test_no_lora_layer_is_an_error():
    with pytest.raises(ValueError, match="no trainable LoRA layer"):
        find_lora_pairs(Mixed())


def test_4bit_base_layers_are_found():
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    class Q(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Q(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    (pair,) = find_lora_pairs(model)
    assert isinstance(model.base_model.model.proj.get_base_layer(), bnb.nn.Linear4bit)
    assert pair.A.shape == (4, 64) and pair.B.shape == (32, 4)
