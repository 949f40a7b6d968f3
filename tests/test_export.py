"""Exported adapters and merged models reproduce the trained model's logits.

A tiny random LLaMA with LoRA (B randomised, so the adapter matters) stands in
for a trained model; one 2-rank ZeRO-3 DeepSpeed run covers the partitioned case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from reflora_ds.config import RunConfig
from reflora_ds.data import EMBEDDED_TEST
from reflora_ds.dist import free_port
from reflora_ds.evaluate import evaluate, inference_mode
from reflora_ds.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MERGE_NOTE,
    ExportError,
    adapter_state_dict,
    export_adapter,
    export_from_checkpoint,
    find_checkpoint,
    load_adapter_weights,
    merge,
)
from reflora_ds.models import load_base_model, load_tokenizer, wrap_with_lora
from tiny_models import tiny_llama

HERE = Path(__file__).parent
ATOL = 1e-5
PROBE = ["Which factor will most likely cause a fever? the correct answer is answer2", "The quick brown fox"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(path, seed=0)
    return path


def lora_cfg(base: Path, **extra) -> RunConfig:
    return RunConfig(base_model=str(base), lora_r=4, lora_alpha=8, lora_dropout=0.0, **extra)


def randomise_b(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROBE, return_tensors="pt", padding=True)
    with inference_mode(model):
        return model(**batch).logits


@pytest.fixture(scope="module")
def trained(tiny_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model = wrap_with_lora(base, lora_cfg(tiny_dir))
    randomise_b(model)
    return model, load_tokenizer(tiny_dir)


def fresh_base(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def test_exported_adapter_loads_with_peft_and_reproduces_logits(trained, tiny_dir, tmp_path):
    model, tok = trained
    out = export_adapter(model, tmp_path / "adapter", base_model=str(tiny_dir))
    assert (out / ADAPTER_WEIGHTS).is_file() and (out / ADAPTER_CONFIG).is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left
    weights = load_adapter_weights(out)
    assert len(weights) == 2 * 2 * 5  # 2 layers × 5 target modules × (A, B)
    assert all(t.numel() > 0 for t in weights.values())
    assert all(".default." not in k and "lora_" in k for k in weights)
    assert all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_dir)

    loaded = PeftModel.from_pretrained(fresh_base(tiny_dir), str(out))
    torch.testing.assert_close(logits(loaded, tok), logits(model, tok), atol=ATOL, rtol=0)
    assert model.training  # export and the logits helper leave the model in train mode


def test_export_refuses_empty_or_mismatched_tensors(trained, tmp_path, monkeypatch):
    model, _ = trained
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # What an ungathered ZeRO-3 state dict looks like: every tensor of shape [0].
    empty = {n: torch.empty(0) for n in names}
    with pytest.raises(ExportError, match="shape"):
        adapter_state_dict(model, empty)
    with pytest.raises(ExportError, match="missing"):
        adapter_state_dict(model, dict(list(empty.items())[1:]))

    import reflora_ds.export as export

    monkeypatch.setattr(export, "trainable_state_dict", lambda m: empty)
    with pytest.raises(ExportError, match="empty"):
        export_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / ADAPTER_WEIGHTS).exists()
    with pytest.raises(ExportError, match="PEFT model"):
        export_adapter(torch.nn.Linear(2, 2), tmp_path / "adapter")


def test_merged_model_loads_with_transformers_and_matches(trained, tiny_dir, tmp_path):
    model, tok = trained
    adapter = export_adapter(model, tmp_path / "adapter", base_model=str(tiny_dir))
    note = merge(str(tiny_dir), adapter, tmp_path / "merged", max_shard_size="300KB")
    out = tmp_path / "merged"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert note["dequantized_from_4bit"] is False and json.loads((out / MERGE_NOTE).read_text()) == note

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert AutoTokenizer.from_pretrained(out)(PROBE[0])["input_ids"] == tok(PROBE[0])["input_ids"]
    torch.testing.assert_close(logits(merged, tok), logits(model, tok), atol=ATOL, rtol=0)

    # The base recorded in the adapter is used when none is named.
    merge(None, adapter, tmp_path / "merged2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged2")
    torch.testing.assert_close(logits(again, tok), logits(model, tok), atol=ATOL, rtol=0)


def test_merge_of_a_4bit_base_goes_into_its_dequantized_weights(tiny_dir, tmp_path):
    cfg = lora_cfg(tiny_dir, load_in_4bit=True)
    base, tok = load_base_model(cfg, device="cpu")
    model = wrap_with_lora(base, cfg)
    randomise_b(model)
    expected = logits(model, tok)  # train-mode 4-bit layers: no repack, the model could go on training
    adapter = export_adapter(model, tmp_path / "adapter", base_model=str(tiny_dir), run_config=cfg)

    note = merge(None, adapter, tmp_path / "merged")  # the 4-bit settings come from the exported run config
    assert note["dequantized_from_4bit"] is True and note["quant_type"] == "nf4"
    assert note["dequantized_layers"] == 2 * 7
    assert "dequantiz" in (tmp_path / "merged" / "README.md").read_text()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, tok), expected, atol=1e-4, rtol=0)


def test_merge_of_a_checkpoint_saved_in_4bit(tiny_dir, tmp_path):
    from reflora_ds.models import quantization_config

    cfg = lora_cfg(tiny_dir, load_in_4bit=True)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=quantization_config(cfg),
                                                     device_map={"": "cpu"})
    quantized.save_pretrained(tmp_path / "base4")
    load_tokenizer(tiny_dir).save_pretrained(tmp_path / "base4")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base4", device_map={"": "cpu"})
    base.train()
    model = wrap_with_lora(base, cfg)
    randomise_b(model)
    tok = load_tokenizer(tiny_dir)
    expected = logits(model, tok)
    adapter = export_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base4"))

    note = merge(None, adapter, tmp_path / "merged")  # the base recorded in adapter_config.json
    assert note["dequantized_from_4bit"] is True and note["quant_type"] == "nf4"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, tok), expected, atol=1e-4, rtol=0)


def test_find_checkpoint_accepts_save_dir_tag_dir_and_parent(tmp_path):
    save = tmp_path / "run" / "checkpoints"
    for tag in ("step-5", "step-40", ".tmp-step-90"):  # .tmp-*: an interrupted save
        (save / tag).mkdir(parents=True)
        (save / tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert find_checkpoint(save / "step-5") == (save, "step-5")
    assert find_checkpoint(tmp_path / "run") == (save, "step-40")  # the newest complete one
    (save / "latest").write_text("step-5")
    assert find_checkpoint(save) == (save, "step-5")
    with pytest.raises(ExportError, match="no DeepSpeed checkpoint"):
        find_checkpoint((tmp_path / "empty").mkdir() or tmp_path / "empty")


# --- ZeRO-3, two ranks -----------------------------------------------------------------


@pytest.fixture(scope="module")
def zero3_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(HERE / "dist" / "export_worker.py"), "--base", str(tiny_dir), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not (out / "eval.json").is_file():
        raise AssertionError(f"deepspeed launch failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return out


@pytest.mark.distributed
def test_zero3_export_is_complete_and_reproduces_logits(zero3_run, tiny_dir):
    weights = load_adapter_weights(zero3_run / "adapter")
    assert len(weights) == 20 and all(t.numel() > 0 for t in weights.values())
    assert all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # training moved B off zero

    reference = torch.load(zero3_run / "reference.pt", weights_only=True)
    loaded = PeftModel.from_pretrained(fresh_base(tiny_dir), str(zero3_run / "adapter"))
    with inference_mode(loaded):
        got = loaded(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    torch.testing.assert_close(got, reference["logits"], atol=ATOL, rtol=0)


@pytest.mark.distributed
def test_zero3_checkpoint_exports_the_same_adapter(zero3_run, tiny_dir, tmp_path):
    # Written by engine.save_checkpoint directly, so without the trainer's safetensors copy: DeepSpeed's own
    # files (zero_to_fp32) are read, which the caller must trust.
    with pytest.raises(ExportError, match="--trust-checkpoint"):
        export_from_checkpoint(zero3_run / "ckpt", tmp_path / "refused", lora_cfg(tiny_dir))
    out = export_from_checkpoint(zero3_run / "ckpt", tmp_path / "adapter", lora_cfg(tiny_dir), trust_checkpoint=True)
    from_ckpt, from_model = load_adapter_weights(out), load_adapter_weights(zero3_run / "adapter")
    assert from_ckpt.keys() == from_model.keys()
    for key in from_model:
        torch.testing.assert_close(from_ckpt[key], from_model[key], atol=0, rtol=0)

    reference = torch.load(zero3_run / "reference.pt", weights_only=True)
    loaded = PeftModel.from_pretrained(fresh_base(tiny_dir), str(out))
    with inference_mode(loaded):
        got = loaded(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    torch.testing.assert_close(got, reference["logits"], atol=ATOL, rtol=0)


@pytest.mark.distributed
def test_evaluation_split_over_zero3_ranks_matches_one_process(zero3_run, tiny_dir):
    report = json.loads((zero3_run / "eval.json").read_text())["tasks"][0]
    loaded = PeftModel.from_pretrained(fresh_base(tiny_dir), str(zero3_run / "adapter"))
    local = evaluate(loaded, load_tokenizer(tiny_dir), EMBEDDED_TEST, modes=["generate", "likelihood"],
                     limit=report["rows"], batch_size=3, max_new_tokens=4)
    assert report["rows"] == 5
    for mode in ("generate", "likelihood"):
        assert [r["index"] for r in report["examples"][mode]] == list(range(5))  # every row once, in order
        assert [r["prediction"] for r in report["examples"][mode]] == [r["prediction"] for r in local.examples[mode]]
        assert report["accuracy"][mode] == local.accuracy[mode]
    assert [r["generation"] for r in report["examples"]["generate"]] == \
        [r["generation"] for r in local.examples["generate"]]
    assert report["loss"] == pytest.approx(local.loss, abs=1e-5)


@pytest.mark.distributed
def test_cli_export_merge_eval_chain(zero3_run, tiny_dir, tmp_path):
    """export (checkpoint -> adapter), merge (-> plain model), eval: the merged model scores as base + adapter."""
    import yaml
    from typer.testing import CliRunner

    from reflora_ds.cli import app

    run_config = tmp_path / "run.yaml"
    # A whole run configuration whose training data is not on this machine: export needs only the model keys.
    run_config.write_text(yaml.safe_dump({"base_model": str(tiny_dir), "lora_r": 4, "lora_alpha": 8,
                                          "lora_dropout": 0.0, "data_path": str(tmp_path / "elsewhere.json"),
                                          "optimizer": "reflora"}))
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(zero3_run / "ckpt"), "--out", str(tmp_path / "adapter"),
                               "--config", str(run_config), "--trust-checkpoint"])
    assert done.exit_code == 0, done.output
    assert "20 tensors" in done.output
    done = runner.invoke(app, ["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    assert done.exit_code == 0, done.output

    data = tmp_path / "set.json"
    data.write_text(json.dumps([{"instruction": f"Pick one of {i}.\n\nAnswer format: answer1/answer2/answer3",
                                 "input": "", "output": f"the correct answer is answer{i}", "answer": f"answer{i}"}
                                for i in (1, 2, 3)]))
    reports = {}
    for name, source in (("adapter", ["--adapter", str(tmp_path / "adapter")]),
                         ("merged", ["--base-model", str(tmp_path / "merged")])):
        out = tmp_path / f"{name}.json"
        done = runner.invoke(app, ["eval", *source, "--data", str(data), "--mode", "both", "--max-new-tokens", "4",
                                   "--out", str(out)])
        assert done.exit_code == 0, done.output
        reports[name] = json.loads(out.read_text())["tasks"][0]
    a, m = reports["adapter"], reports["merged"]
    assert a["accuracy"] == m["accuracy"] and a["loss"] == pytest.approx(m["loss"], abs=1e-5)
    for mode in ("generate", "likelihood"):
        assert [r["prediction"] for r in a["examples"][mode]] == [r["prediction"] for r in m["examples"][mode]]
