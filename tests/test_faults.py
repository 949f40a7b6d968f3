"""Faults a careless or hostile user can cause, replayed: each ends in a clear message and a clean state.

The cases of the reliability review, numbered as there: a finished run
without its adapter (1), two runs on one folder (2), a loss that stops being
finite (3), a resume with other settings (4), code in a checkpoint's pickle
(5), trust_remote_code from an adapter's folder (6), a DeepSpeed config that
disagrees with the run (7), and the one-line errors and unsaid things of 8-10.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from train_fixtures import adapter_tensors, base_values, make_base, make_rows, run_cli, write_config, write_rows

from reflora_ds import checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    mp = pytest.MonkeyPatch()
    mp.setenv("REFLORA_DS_CACHE", str(root / "cache"))
    yield {"root": root, "base": make_base(root / "base"), "data": write_rows(root / "train.json", make_rows(40))}
    mp.undo()


def values(env, out: Path, **overrides) -> dict:
    return base_values(env["base"], env["data"], out, **{"max_steps": 4, "save_steps": 2, "eval_steps": 0,
                                                         **overrides})


def train(env, tmp_path: Path, name: str = "run", **overrides):
    out = tmp_path / name
    config = write_config(tmp_path / f"{name}.yaml", **values(env, out, **overrides))
    return run_cli(["train", config]), out, config


def one_error_line(result, *expected: str) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def finished(env, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (save_total_limit: none)."""
    root = tmp_path_factory.mktemp("finished")
    result, out, config = train(env, root)
    assert result.exit_code == 0, result.output
    return {"out": out, "config": config, "adapter": adapter_tensors(out)}


def copy_of(finished, tmp_path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(finished["out"], out)
    config = yaml.safe_load(Path(finished["config"]).read_text())
    config["output_dir"] = str(out)
    return out, write_config(tmp_path / "copy.yaml", **config)


# --- 1. a finished run is finished only with its adapter and summary -----------------------------


def test_a_run_killed_before_its_adapter_is_completed_by_the_next_call(finished, tmp_path):
    out, config = copy_of(finished, tmp_path)
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    (out / "loss.png").unlink()
    result = run_cli(["train", config])
    assert result.exit_code == 0, result.output
    assert "cut short; completing it" in result.output
    assert (out / "loss.png").is_file() and json.loads((out / "summary.json").read_text())["status"] == "finished"
    completed = adapter_tensors(out)
    assert completed.keys() == finished["adapter"].keys()
    assert all(torch.equal(completed[k], finished["adapter"][k]) for k in completed)  # bitwise the same
    again = run_cli(["train", config])
    assert again.exit_code == 0 and "already holds a finished run" in again.output


# --- 2. one run per output_dir ----------------------------------------------------------------------


def test_a_second_run_on_a_busy_output_dir_is_refused_naming_the_holder(finished, tmp_path):
    out, config = copy_of(finished, tmp_path)
    with open(out / checkpoint.LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("node7 pid 4242 since 2026-12-03 10:00:00\n")
        held.flush()
        result = run_cli(["train", config, "--max-steps", "6"])
    assert result.exit_code == 2
    one_error_line(result, "in use by another run", "node7 pid 4242")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]  # nothing touched


def test_checkpoint_temporaries_have_private_names(finished, tmp_path, monkeypatch):
    tags = []
    original = checkpoint.save

    def spy(engine, *args, **kwargs):
        real = engine.save_checkpoint
        engine.save_checkpoint = lambda root, tag, **kw: tags.append(tag) or real(root, tag=tag, **kw)
        try:
            return original(engine, *args, **kwargs)
        finally:
            engine.save_checkpoint = real

    monkeypatch.setattr(checkpoint, "save", spy)
    out, config = copy_of(finished, tmp_path)
    (out / "checkpoints" / ".tmp-step-6").mkdir()  # what an older release's interrupted save left
    result = run_cli(["train", config, "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    assert tags and all(t.startswith(".tmp-step-6-") and len(t) > len(".tmp-step-6-") for t in tags)
    assert not list((out / "checkpoints").glob(".tmp-*"))


# --- 3. a loss that stops being finite stops the run ------------------------------------------------


def test_a_nan_loss_stops_the_run_with_status_3_and_writes_no_adapter(env, tmp_path):
    result, out, _ = train(env, tmp_path, learning_rate=3e37, max_steps=8, save_steps=1, refactor_warmup=0)
    assert result.exit_code == 3, result.output
    line = one_error_line(result, "the run stops without saving", "The last good checkpoint is")
    assert "step " in line and ("nan" in line or "inf" in line)
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    for _, path in checkpoint.list_complete(out):  # every checkpoint left behind is a finite one
        assert all(torch.isfinite(t).all() for t in load_file(str(path / checkpoint.TRAINABLE)).values())


def nan_on_calls(monkeypatch, calls: set[int]):
    """Make the model's loss NaN on the given forward calls (counting from 1)."""
    from transformers import LlamaForCausalLM

    original, count = LlamaForCausalLM.forward, [0]

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        count[0] += 1
        if count[0] in calls and output.loss is not None:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)


def test_skip_nonfinite_steps_leaves_out_the_bad_micro_batch(env, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, {3})  # 2 micro-batches a step: the first of step 2 (no evaluation forwards)
    result, out, _ = train(env, tmp_path, val_set_size=0, skip_nonfinite_steps=1)
    assert result.exit_code == 0, result.output
    assert "step 2: a micro-batch with a non-finite loss was left out (1 of skip_nonfinite_steps 1)" in result.output
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())

    monkeypatch.undo()
    nan_on_calls(monkeypatch, {3})
    stopped, out, _ = train(env, tmp_path, name="strict", val_set_size=0)
    assert stopped.exit_code == 3
    one_error_line(stopped, "step 2: the training loss is nan")


def test_export_and_merge_refuse_non_finite_tensors(finished, env, tmp_path):
    out, _ = copy_of(finished, tmp_path)
    tensors = adapter_tensors(out)
    name = next(iter(tensors))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(out / "adapter" / "adapter_model.safetensors"))
    merged = run_cli(["merge", "--adapter", out / "adapter", "--out", tmp_path / "merged"])
    assert merged.exit_code == 2 and not (tmp_path / "merged").exists()
    one_error_line(merged, "NaN or Inf", name)

    step = out / "checkpoints" / "step-4"
    weights = load_file(str(step / checkpoint.TRAINABLE))
    weights[next(iter(weights))][0, 0] = float("inf")
    save_file(weights, str(step / checkpoint.TRAINABLE))
    manifest = json.loads((step / checkpoint.COMPLETE).read_text())
    manifest["files"][checkpoint.TRAINABLE] = (step / checkpoint.TRAINABLE).stat().st_size
    (step / checkpoint.COMPLETE).write_text(json.dumps(manifest))
    exported = run_cli(["export", step, "--out", tmp_path / "exported"])
    assert exported.exit_code == 2 and not (tmp_path / "exported").exists()
    one_error_line(exported, "NaN or Inf")


def test_climbing_refactor_fallbacks_are_reported(env, tmp_path, monkeypatch):
    """Overflowing factors make every layer's refactor fall back; past the warm-up the log says so."""
    import reflora_ds.methods as methods

    real = methods.refactor_from_grams

    def degenerate(*args, **kwargs):
        sol = real(*args, **kwargs)
        sol.ok[:] = False
        return sol

    monkeypatch.setattr(methods, "refactor_from_grams", degenerate)
    result, _, _ = train(env, tmp_path, max_steps=5, save_steps=0, refactor_warmup=1)
    assert result.exit_code == 0, result.output
    assert "warning: the refactor fell back to the identity" in result.output
    assert "is the learning rate too high?" in result.output


# --- 4. a resume with other settings changes nothing ----------------------------------------------------


@pytest.mark.parametrize("change,key", [({"lora_r": 8}, "lora_r: 4 → 8"),
                                        ({"learning_rate": 1e-3}, "learning_rate: 0.002 → 0.001"),
                                        ({"lora_target_modules": ["q_proj"]}, "lora_target_modules"),
                                        ({"base_model": "OTHER"}, "base_model")])
def test_a_resume_with_other_settings_is_refused_and_the_run_stays_exportable(finished, env, tmp_path, change, key):
    out, config = copy_of(finished, tmp_path)
    before = (out / "config.yaml").read_text()
    values = yaml.safe_load(Path(config).read_text())
    if change.get("base_model") == "OTHER":
        change = {"base_model": str(make_base(tmp_path / "other-base"))}
    values.update(change, max_steps=6)
    result = run_cli(["train", write_config(tmp_path / "changed.yaml", **values)])
    assert result.exit_code == 2
    one_error_line(result, "cannot change when a run resumes", key)
    assert (out / "config.yaml").read_text() == before
    exported = run_cli(["export", out, "--out", tmp_path / "exported"])
    assert exported.exit_code == 0, exported.output


def test_a_resume_with_other_data_is_refused(finished, env, tmp_path):
    out, config = copy_of(finished, tmp_path)
    values = yaml.safe_load(Path(config).read_text())
    write_rows(Path(values["data_path"]).with_name("changed.json"), make_rows(40)[::-1])
    values.update(data_path=str(Path(values["data_path"]).with_name("changed.json")), max_steps=6)
    result = run_cli(["train", write_config(tmp_path / "changed.yaml", **values)])
    assert result.exit_code == 2
    one_error_line(result, "the training or evaluation data")


# --- 5. no code from a checkpoint's pickle ------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_export_never_unpickles_a_checkpoint_it_was_not_told_to_trust(finished, tmp_path):
    out, _ = copy_of(finished, tmp_path)
    crafted = tmp_path / "crafted" / "step-9"
    crafted.mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(crafted / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": _RunsCode(marker)}, f)
    result = run_cli(["export", crafted, "--out", tmp_path / "adapter", "--config", out / "config.yaml"])
    assert result.exit_code == 2 and not marker.exists()
    one_error_line(result, "trainable_fp32.safetensors", "--trust-checkpoint")

    # The trainer's own checkpoints export from their safetensors copy.
    result = run_cli(["export", out, "--out", tmp_path / "own"])
    assert result.exit_code == 0, result.output


# --- 6. trust_remote_code only from the command line or the user's own config ------------------------------


def test_trust_remote_code_beside_an_adapter_is_ignored(finished, env, tmp_path):
    out, _ = copy_of(finished, tmp_path)
    base = tmp_path / "remote-base"
    shutil.copytree(env["base"], base)
    marker = tmp_path / "pwned"
    (base / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n"
                                  "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n"
                                  "    model_type = 'evilllama'\n")
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="evilllama", auto_map={"AutoConfig": "evil.EvilConfig"})
    (base / "config.json").write_text(json.dumps(config))
    adapter = out / "adapter"
    (adapter / "reflora_config.yaml").write_text(yaml.safe_dump({"base_model": str(base), "trust_remote_code": True,
                                                                 "lora_r": 4, "lora_alpha": 8}))
    result = run_cli(["merge", "--adapter", adapter, "--out", tmp_path / "merged"])
    assert result.exit_code == 2 and not marker.exists(), result.output
    assert "trust_remote_code" in result.output


# --- 7. a DeepSpeed config that disagrees with the run -------------------------------------------------------


def test_a_deepspeed_literal_that_disagrees_is_refused_before_anything_is_written(env, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 8,
                              "train_batch_size": "auto", "zero_optimization": {"stage": 1}}))
    result, out, _ = train(env, tmp_path, deepspeed=str(ds))
    assert result.exit_code == 2
    one_error_line(result, "gradient_accumulation_steps is 8 there, 2")
    assert not out.exists()


# --- 8-10. one line, exit 2, nothing lost ---------------------------------------------------------------------


@pytest.mark.parametrize("targets,named", [(["q_projj"], "q_projj"), (["q_proj", "v_prj"], "v_prj")])
def test_target_modules_that_match_nothing_are_named(env, tmp_path, targets, named):
    result, out, _ = train(env, tmp_path, lora_target_modules=targets)
    assert result.exit_code == 2
    line = one_error_line(result, "lora_target_modules", named, "match no module")
    assert "q_proj" in line.split("named")[-1]  # the names it does have
    assert not out.exists()


def test_a_hub_id_offline_is_refused_at_once(env, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    result, _, _ = train(env, tmp_path, base_model="someone/some-model")
    assert result.exit_code == 2 and time.perf_counter() - started < 30
    one_error_line(result, "someone/some-model", "offline")


def test_a_base_with_only_pickle_weights_is_refused_with_the_way_out(env, tmp_path):
    base = tmp_path / "bin-base"
    shutil.copytree(env["base"], base)
    for weights in base.glob("*.safetensors"):
        weights.unlink()
    torch.save({}, base / "pytorch_model.bin")
    result, _, _ = train(env, tmp_path, base_model=str(base))
    assert result.exit_code == 2
    one_error_line(result, ".bin", "runs any code", "save_pretrained")


@pytest.mark.parametrize("damage", ["truncate", "empty", "trainer_state"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(finished, tmp_path, damage):
    out, config = copy_of(finished, tmp_path)
    step4 = out / "checkpoints" / "step-4"
    if damage == "trainer_state":
        (step4 / checkpoint.TRAINER_STATE).write_text('{"epoch": 0, "glob')
    else:
        states = next(step4.glob("*model_states.pt"))
        states.write_bytes(states.read_bytes()[: 100 if damage == "truncate" else 0])
    result = run_cli(["train", config, "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    assert "skipping the damaged checkpoint" in result.output and "step-4" in result.output
    assert "resumed from" in result.output and "step-2 at step 2/6" in result.output


def test_export_of_a_damaged_checkpoint_names_the_damage(finished, tmp_path):
    out, _ = copy_of(finished, tmp_path)
    (out / "checkpoints" / "step-4" / checkpoint.TRAINABLE).write_bytes(b"")
    named = run_cli(["export", out / "checkpoints" / "step-4", "--out", tmp_path / "a"])
    assert named.exit_code == 2
    one_error_line(named, "step-4 is damaged", "0 bytes")
    newest = run_cli(["export", out, "--out", tmp_path / "b"])  # the newest undamaged one instead
    assert newest.exit_code == 0 and "step-2" in newest.output, newest.output


def test_an_adapter_for_another_base_is_refused_in_eval_and_merge(finished, env, tmp_path):
    from tiny_models import tiny_llama

    other = tmp_path / "other"
    tiny_llama(other, seed=1, hidden_size=32, intermediate_size=64)
    adapter = finished["out"] / "adapter"
    for command in (["eval", "--adapter", adapter, "--base-model", other, "--limit", "1", "--out",
                     tmp_path / "e.json"],
                    ["merge", "--adapter", adapter, "--base-model", other, "--out", tmp_path / "merged"]):
        result = run_cli(command)
        assert result.exit_code == 2, result.output
        one_error_line(result, "trained for another base model")


def test_export_of_a_folder_that_is_no_checkpoint_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(["export", tmp_path / "empty", "--out", tmp_path / "a"])
    assert result.exit_code == 2
    one_error_line(result, "no DeepSpeed checkpoint")


def test_export_picks_the_newest_complete_checkpoint_and_tag_works_from_the_run_folder(finished, tmp_path):
    out, _ = copy_of(finished, tmp_path)
    partial = out / "checkpoints" / "step-9"
    shutil.copytree(out / "checkpoints" / "step-4", partial)
    (partial / checkpoint.COMPLETE).unlink()
    newest = run_cli(["export", out, "--out", tmp_path / "newest"])
    assert newest.exit_code == 0 and "step-4" in newest.output, newest.output
    tagged = run_cli(["export", out, "--tag", "step-2", "--out", tmp_path / "tagged"])
    assert tagged.exit_code == 0 and "step-2" in tagged.output, tagged.output


def test_eval_says_why_rows_without_labels_have_no_accuracy(finished, tmp_path):
    rows = [{k: v for k, v in row.items() if k != "answer"} for row in make_rows(3)]
    result = run_cli(["eval", "--adapter", finished["out"] / "adapter", "--data", write_rows(tmp_path / "p.json", rows),
                      "--out", tmp_path / "e.json"])
    assert result.exit_code == 0, result.output
    assert "no accuracy: 3 of 3 rows have no 'answer' label" in result.output


def test_merge_never_writes_into_its_inputs(finished, env, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(env["base"], base)
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    adapter = finished["out"] / "adapter"
    for target in (base, base / "inside", adapter, tmp_path):
        result = run_cli(["merge", "--adapter", adapter, "--base-model", base, "--out", target])
        assert result.exit_code == 2, (target, result.output)
        one_error_line(result, "would overwrite the inputs")
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before


def test_a_full_disk_names_the_step_and_the_intact_checkpoint(finished, tmp_path, monkeypatch):
    import errno

    from deepspeed import DeepSpeedEngine

    out, config = copy_of(finished, tmp_path)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", full)
    result = run_cli(["train", config, "--max-steps", "6"])
    assert result.exit_code == 2
    one_error_line(result, "no space left", "saving step 6", "step-4 is intact")
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_kill_during_pruning_leaves_nothing_behind(finished, tmp_path):
    out, config = copy_of(finished, tmp_path)
    (out / "checkpoints" / "step-1").mkdir()  # a prune cut short by a kill in an earlier release
    (out / "checkpoints" / ".old-step-0-1234abcd").mkdir()
    result = run_cli(["train", config, "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]


def test_all_nan_likelihoods_predict_nothing():
    from types import SimpleNamespace

    from tiny_models import tiny_tokenizer

    from reflora_ds.evaluate import evaluate

    tokenizer = tiny_tokenizer()

    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return SimpleNamespace(logits=torch.full((*input_ids.shape, len(tokenizer)), float("nan")))

    rows = [{"instruction": "Pick.\n\nAnswer format: answer1/answer2", "input": "", "answer": "answer1",
             "output": "the correct answer is answer1"}]
    result = evaluate(NaNModel(), tokenizer, rows, modes=["likelihood"], loss=False)
    assert result.examples["likelihood"][0]["prediction"] is None and result.accuracy["likelihood"] == 0.0


def test_eval_with_a_missing_adapter_fails_before_loading_a_model(tmp_path):
    started = time.perf_counter()
    result = run_cli(["eval", "--adapter", tmp_path / "missing"])
    assert result.exit_code == 2 and time.perf_counter() - started < 5
    one_error_line(result, "--adapter", "adapter_config.json")


def test_a_removed_lock_holder_is_no_obstacle(finished, tmp_path):
    """The lock dies with its holder: a .lock file left by a killed run does not block the next one."""
    out, config = copy_of(finished, tmp_path)
    (out / checkpoint.LOCK).write_text(f"{os.uname().nodename} pid 999999 since long ago\n")
    result = run_cli(["train", config, "--max-steps", "6"])
    assert result.exit_code == 0, result.output
