"""`reflora-ds train` end to end on a tiny random LLaMA (CPU, one process, the DeepSpeed engine)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from train_fixtures import (
    adapter_tensors,
    base_values,
    make_base,
    make_rows,
    metrics,
    run_cli,
    write_config,
    write_rows,
)

from reflora_ds.config import RunConfig


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny base model, 40 rows of data and a private tokenization cache."""
    root = tmp_path_factory.mktemp("train")
    mp = pytest.MonkeyPatch()
    mp.setenv("REFLORA_DS_CACHE", str(root / "cache"))
    yield {"root": root, "base": make_base(root / "base"), "data": write_rows(root / "train.json", make_rows(40))}
    mp.undo()


def config_for(env, name: str, **overrides):
    values = base_values(env["base"], env["data"], env["root"] / name, **overrides)
    return write_config(env["root"] / f"{name}.yaml", **values), env["root"] / name


@pytest.fixture(scope="module")
def full_run(env):
    path, out = config_for(env, "full", report_to=["jsonl", "tensorboard"])
    result = run_cli(["train", path])
    return result, out


# --- the command line -------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["train"], ["preprocess"], ["toy"]])
def test_every_command_has_help(command):
    result = run_cli(command + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_dry_run_prints_the_embedded_default_run_with_overrides():
    result = run_cli(["train", "--dry-run", "--lora-r", "16", "--set", "lora_dropout=0", "--set",
                      "resume_from_checkpoint=null"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert cfg["output_dir"] == "out/default" and cfg["base_model"] is None and cfg["data_path"] is None
    assert cfg["max_steps"] == 30 and cfg["val_set_size"] == 64 and cfg["method"] == "reflora"
    assert cfg["lora_r"] == 16 and cfg["lora_dropout"] == 0 and cfg["resume_from_checkpoint"] is None
    assert cfg["bnb_4bit_compute_dtype"] == "float32"  # resolved, not null


def test_launcher_local_rank_argument_is_accepted():
    result = run_cli(["--local_rank=1", "train", "--dry-run"])
    assert result.exit_code == 0, result.output


def test_preprocess_caches_and_shows_masked_prompt(env):
    path, _ = config_for(env, "prep")
    first = run_cli(["preprocess", path, "--show", "3"])
    assert first.exit_code == 0, first.output
    # the prompt masked up to the response, which is trained on, EOS included
    assert re.search(r"\n⟦<s>Below is an instruction.*### Response:\n⟧the correct answer is answer\d( indeed)*</s>\n",
                     first.output, re.S), first.output
    assert "Saving the dataset" not in first.output  # one quiet line per fact
    assert "data: 34 training samples" in first.output and "6 evaluation samples" in first.output
    second = run_cli(["preprocess", path])
    cache_line = lambda out: next(line for line in out.splitlines() if line.startswith("cache:"))  # noqa: E731
    assert cache_line(first.output) == cache_line(second.output)


# --- one full run ---------------------------------------------------------------------------


def test_cli_train_writes_everything(full_run):
    result, out = full_run
    assert result.exit_code == 0, result.output
    assert "eval loss before → after:" in result.output
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2", "step-4", "step-6"]
    assert all((p / "COMPLETE").is_file() for p in (out / "checkpoints").glob("step-*"))
    assert not list((out / "checkpoints").glob(".tmp-*"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lora_r"] == 4 and saved["max_steps"] == 6 and saved["bnb_4bit_quant_storage"] == "uint8"


def test_metrics_log_loss_lr_throughput_and_eval(full_run):
    _, out = full_run
    records = metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6]
    train = [r for r in records if "loss" in r]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["refactor_fallbacks"] == 0 for r in train)
    assert all(0 < r["target_tokens_per_s"] < r["tokens_per_s"] and r["step_seconds"] > 0 for r in train)
    # linear schedule, 1 warmup step, 6 steps: lr of the step that used it
    expected = [1e-3, 2e-3, 1.6e-3, 1.2e-3, 0.8e-3, 0.4e-3]
    assert [r["lr"] for r in train] == pytest.approx(expected)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]


def test_accuracy_is_scored_at_every_evaluation(full_run):
    """The rows carry answer labels, so accuracy is on by default: at steps 0, 3 and 6, on all 6 held-out rows."""
    _, out = full_run
    records = metrics(out)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals if "eval_accuracy" in r] == [0, 3, 6]
    assert not [r for r in records if "eval_accuracy" in r and "eval_loss" not in r]
    for r in evals:
        assert 0 <= r["eval_accuracy"] <= 1
        assert r["eval_accuracy"] * 6 == pytest.approx(round(r["eval_accuracy"] * 6))  # k of the 6 rows
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_before"] == evals[0]["eval_accuracy"]
    assert summary["accuracy_after"] == evals[-1]["eval_accuracy"]
    assert summary["best"] is None  # no metric_for_best_model

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 3, 6]


def test_final_evaluation_matches_reflora_ds_eval_of_the_adapter(env, full_run):
    """The held-out rows scored in training are the rows the loss is computed on: evaluating the
    exported adapter on those rows (found independently of the trainer) gives the same loss and accuracy."""
    import numpy as np
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from reflora_ds.evaluate import evaluate
    from reflora_ds.models import load_tokenizer

    _, out = full_run
    rows = make_rows(40)  # all fit in cutoff_len, so none is dropped before the split
    held_out = [rows[i] for i in np.random.default_rng(7).permutation(len(rows))[:6]]  # data.split_validation
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["base"]), out / "adapter")
    result = evaluate(model, load_tokenizer(env["base"]), held_out, modes=["likelihood"], batch_size=2)
    last = metrics(out)[-1]
    assert result.accuracy["likelihood"] == last["eval_accuracy"]
    assert result.loss == pytest.approx(last["eval_loss"], rel=1e-5)


def test_adapter_loads_into_peft_and_changes_the_model(env, full_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out = full_run
    tensors = adapter_tensors(out)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # B trained away from 0
    base = AutoModelForCausalLM.from_pretrained(env["base"])
    model = PeftModel.from_pretrained(base, out / "adapter")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(tensors)


def test_bf16_run_exports_the_fp32_masters(env):
    """Under bf16 the model computes with bf16 copies; the adapter holds the fp32 masters DeepSpeed updates.

    (The same run scores its accuracy in generate mode, on the first 4 held-out rows.)
    """
    path, out = config_for(env, "bf16", torch_dtype="bfloat16", max_steps=2, save_steps=0, eval_steps=0,
                           eval_accuracy_mode="generate", eval_accuracy_limit=4)
    result = run_cli(["train", path])
    assert result.exit_code == 0, result.output
    tensors = adapter_tensors(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    trained = torch.cat([t.flatten() for k, t in tensors.items() if "lora_B" in k])
    assert trained.abs().max() > 0
    assert not torch.equal(trained, trained.bfloat16().float())  # not a bf16 value widened to fp32

    accuracies = [r["eval_accuracy"] for r in metrics(out) if "eval_accuracy" in r]
    assert len(accuracies) == 2 and all(a * 4 == round(a * 4) and 0 <= a <= 1 for a in accuracies)
    assert "eval accuracy (generate, 4 rows) before → after" in result.output


# --- the best checkpoint ---------------------------------------------------------------------


def test_best_checkpoint_is_the_lowest_eval_loss_and_is_kept(env):
    from reflora_ds.export import export_from_checkpoint, load_adapter_weights

    path, out = config_for(env, "best", max_steps=4, eval_steps=1, save_steps=0, save_total_limit=1,
                           metric_for_best_model="eval_loss")
    result = run_cli(["train", path])
    assert result.exit_code == 0, result.output
    evals = {r["step"]: r["eval_loss"] for r in metrics(out) if "eval_loss" in r and r["step"] > 0}
    assert sorted(evals) == [1, 2, 3, 4]
    best_step = min(evals, key=evals.get)

    record = json.loads((out / "best_checkpoint.json").read_text())
    assert record == {"metric": "eval_loss", "greater_is_better": False, "step": best_step,
                      "value": evals[best_step], "checkpoint": f"checkpoints/step-{best_step}",
                      "adapter": "best_adapter"}
    assert (out / record["checkpoint"] / "COMPLETE").is_file()
    # save_total_limit=1: the newest checkpoint, and the best one besides
    assert {p.name for p in (out / "checkpoints").iterdir()} == {f"step-{best_step}", "step-4"}
    assert json.loads((out / "summary.json").read_text())["best"] == record
    assert f"best checkpoint by eval_loss: step {best_step}" in result.output

    # best_adapter/ is the adapter of that checkpoint, as `reflora-ds export` writes it
    from_ckpt = load_adapter_weights(export_from_checkpoint(out / record["checkpoint"], out / "check",
                                                            RunConfig(base_model=str(env["base"]), lora_r=4,
                                                                      lora_alpha=8)))
    best = load_adapter_weights(out / "best_adapter")
    assert best.keys() == from_ckpt.keys()
    for key in best:
        torch.testing.assert_close(best[key], from_ckpt[key], rtol=0, atol=0)


# --- the loss is normalised over the global batch --------------------------------------------


def test_accumulation_split_does_not_change_training(env):
    """4 samples per step as 1×4 or 4×1 micro-batches: the same model (token-mean over the global batch)."""
    outs = []
    for name, micro, accum in (("split_a", 4, 1), ("split_b", 1, 4)):
        path, out = config_for(env, name, micro_batch_size=micro, gradient_accumulation_steps=accum,
                               lora_dropout=0.0, max_steps=3, save_steps=0, eval_steps=0)
        result = run_cli(["train", path])
        assert result.exit_code == 0, result.output
        outs.append(out)
    a, b = (adapter_tensors(o) for o in outs)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    la, lb = ([r["loss"] for r in metrics(o) if "loss" in r] for o in outs)
    assert la == pytest.approx(lb, rel=1e-5)


# --- 4-bit base ---------------------------------------------------------------------------


def test_nf4_base_trains_on_cpu(env):
    path, out = config_for(env, "nf4", load_in_4bit=True, bnb_4bit_quant_type="nf4", max_steps=3, save_steps=0)
    result = run_cli(["train", path])
    assert result.exit_code == 0, result.output
    tensors = adapter_tensors(out)
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    records = metrics(out)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]


def test_eval_mode_keeps_bitsandbytes_layers_in_train_mode(env):
    """Dropout off, but 4-bit layers never in eval mode (bitsandbytes repacks them on CPU at an eval-mode forward)."""
    import bitsandbytes as bnb

    from reflora_ds.config import RunConfig
    from reflora_ds.models import load_base_model, wrap_with_lora
    from reflora_ds.evaluate import inference_mode

    cfg = RunConfig(base_model=str(env["base"]), load_in_4bit=True, lora_r=4)
    model = wrap_with_lora(load_base_model(cfg)[0], cfg)

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    engine = Engine(model)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert quantized and dropouts
    with inference_mode(engine):
        assert all(m.training for m in quantized)
        assert not any(m.training for m in dropouts)
    assert model.training and all(m.training for m in model.modules())


# --- configuration and data errors: one line, exit 2, nothing written ---------------------------


def _malformed(env, root):
    rows = make_rows(20)
    del rows[3]["output"]
    return {"data_path": str(write_rows(root / "bad.json", rows))}


def _fp16(env, root):
    ds = root / "fp16.json"
    ds.write_text('{"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", '
                  '"gradient_accumulation_steps": "auto", "fp16": {"enabled": true}, '
                  '"zero_optimization": {"stage": 0}}')
    return {"deepspeed": str(ds)}


def _unlabelled(env, root):
    rows = [{k: v for k, v in row.items() if k != "answer"} for row in make_rows(40)]
    return {"data_path": str(write_rows(root / "plain.json", rows)), "eval_accuracy": True}


CONFIG_ERRORS = {
    "unknown key": (lambda env, root: {"lora_rr": 8}, ["unknown key 'lora_rr'", "did you mean 'lora_r'"]),
    "4-bit under ZeRO-3 with uint8 storage": (
        lambda env, root: {"load_in_4bit": True, "deepspeed": "zero3", "bnb_4bit_quant_storage": "uint8"},
        ["bnb_4bit_quant_storage", "ZeRO-3"]),
    "8-bit under ZeRO-3": (lambda env, root: {"load_in_8bit": True, "deepspeed": "zero3"}, ["load_in_8bit"]),
    "missing data file": (lambda env, root: {"data_path": str(root / "nope.json")},
                          ["data_path", "no such file", "nope.json"]),
    "malformed data row": (_malformed, ["bad.json", "row 3", "missing key 'output'"]),
    "too little data": (lambda env, root: {"data_path": str(write_rows(root / "small.json", make_rows(8)))},
                        ["do not fill one global batch"]),
    "fp16": (_fp16, ["fp16 is not supported"]),
    "unknown deepspeed preset": (lambda env, root: {"deepspeed": "zero4"}, ["zero4", "did you mean"]),
    "best model without periodic evaluations": (
        lambda env, root: {"metric_for_best_model": "eval_loss", "eval_steps": 0},
        ["metric_for_best_model", "eval_steps > 0", "saved at every evaluation"]),
    "best model without an evaluation set": (
        lambda env, root: {"metric_for_best_model": "eval_loss", "val_set_size": 0},
        ["metric_for_best_model", "evaluation set"]),
    "best accuracy with accuracy off": (
        lambda env, root: {"metric_for_best_model": "eval_accuracy", "eval_accuracy": False},
        ["metric_for_best_model", "eval_accuracy"]),
    "accuracy of rows without labels": (_unlabelled, ["eval_accuracy", "plain.json", "no answer label"]),
    "accuracy without an evaluation set": (lambda env, root: {"eval_accuracy": True, "val_set_size": 0},
                                           ["eval_accuracy", "no evaluation set"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_are_one_clear_line_and_leave_nothing(env, tmp_path, case):
    make, expected = CONFIG_ERRORS[case]
    values = base_values(env["base"], env["data"], tmp_path / "out")
    values.update(make(env, tmp_path))
    path = write_config(tmp_path / "run.yaml", **values)
    result = run_cli(["train", path])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for text in expected:
        assert text in errors[0], errors[0]
    assert not (tmp_path / "out").exists()


def test_missing_config_file_and_bad_override(tmp_path):
    missing = run_cli(["train", tmp_path / "nope.yaml"])
    assert missing.exit_code == 2 and "config file not found" in missing.output
    bad = run_cli(["train", "--set", "lora_r", "--dry-run"])
    assert bad.exit_code == 2 and "key=value" in bad.output
    wrong_type = run_cli(["train", "--set", "lora_r=many", "--dry-run"])
    assert wrong_type.exit_code == 2 and "lora_r" in wrong_type.output


# --- the learning-rate schedule --------------------------------------------------------------


def test_lr_schedules():
    from reflora_ds.schedule import lr_lambda

    const = lr_lambda("constant", 3, 10)
    assert [const(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = lr_lambda("linear", 0, 4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = lr_lambda("cosine", 2, 6)
    assert cosine(2) == 1.0 and cosine(4) == pytest.approx(0.5) and cosine(6) == pytest.approx(0.0)
