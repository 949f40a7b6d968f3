import json
from pathlib import Path

import pytest
import yaml

from reflora_ds import ds_config
from reflora_ds.config import (
    DEFAULT_TARGET_MODULES,
    ConfigError,
    RunConfig,
    check_files,
    dump_config,
    load_config,
    override_from_cli,
    parse_overrides,
)
from reflora_ds.ds_config import PRESETS as DS_PRESETS
from reflora_ds.ds_config import preset_path as ds_config_path
from reflora_ds.ds_config import zero_stage


def checked(*args, **kwargs) -> RunConfig:
    """load_config, then the checks a command makes before it runs: files and DeepSpeed."""
    cfg = load_config(*args, **kwargs)
    check_files(cfg)
    ds_config.check(cfg)
    return cfg


def write_yaml(tmp_path, values, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def test_defaults_follow_the_recipe():
    cfg = load_config(None)
    assert cfg.base_model is None and cfg.data_path is None
    assert (cfg.lora_r, cfg.lora_alpha, cfg.cutoff_len) == (32, 64, 256)
    assert cfg.lora_target_modules == DEFAULT_TARGET_MODULES
    assert cfg.prompt_template == "alpaca"
    assert zero_stage(cfg) == 0


def test_yaml_values_and_cli_overrides(tmp_path):
    path = write_yaml(tmp_path, {"lora_r": 8, "learning_rate": 1e-4, "deepspeed": "zero2"})
    cfg = load_config(path, {"lora_r": 32, "torch_dtype": "bf16", "seed": None})
    assert cfg.lora_r == 32  # the command line wins
    assert cfg.learning_rate == 1e-4
    assert cfg.torch_dtype == "bfloat16"  # alias normalised
    assert cfg.seed == 42  # None means "not given"
    assert zero_stage(cfg) == 2


def test_override_from_cli_is_applied_before_validation():
    merged = override_from_cli({"lora_r": 8}, {"lora_r": "16", "lora_target_modules": "q_proj, v_proj"})
    cfg = RunConfig.model_validate(merged)
    assert cfg.lora_r == 16
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_parse_overrides_reads_values_as_yaml():
    values = parse_overrides(["lora_r=8", "report_to=[jsonl, tensorboard]", "resume_from_checkpoint=null"])
    assert values == {"lora_r": 8, "report_to": ["jsonl", "tensorboard"], "resume_from_checkpoint": None}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lora_r"])


def test_unknown_yaml_key_names_key_and_suggestion(tmp_path):
    path = write_yaml(tmp_path, {"lora_rank": 8})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "'lora_rank'" in str(err.value)
    assert "did you mean 'lora_r'" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_override_key_names_key_and_suggestion():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"learning_rat": 1e-3})
    assert "'learning_rat'" in str(err.value) and "'learning_rate'" in str(err.value)


def test_zero3_4bit_needs_quant_storage_in_param_dtype():
    qlora_z3 = {"deepspeed": "zero3", "load_in_4bit": True, "torch_dtype": "bf16"}
    with pytest.raises(ConfigError) as err:
        checked(None, dict(qlora_z3, bnb_4bit_quant_storage="uint8"))
    assert "bnb_4bit_quant_storage" in str(err.value)
    assert "set bnb_4bit_quant_storage: bfloat16" in str(err.value)
    # matching storage is fine, and unset storage resolves to the parameter dtype
    ok = checked(None, dict(qlora_z3, deepspeed="zero3_offload", bnb_4bit_quant_storage="bf16"))
    assert ok.bnb_4bit_quant_storage == "bfloat16"
    unset = load_config(None, {"deepspeed": "zero3", "load_in_4bit": True, "torch_dtype": "float32"})
    assert unset.resolved().bnb_4bit_quant_storage == "float32"
    # below stage 3 any storage is allowed
    assert checked(None, {"deepspeed": "zero2", "load_in_4bit": True, "bnb_4bit_quant_storage": "uint8"})


def test_8bit_under_zero3_is_rejected():
    with pytest.raises(ConfigError, match="load_in_8bit"):
        checked(None, {"deepspeed": "zero3", "load_in_8bit": True})
    assert checked(None, {"deepspeed": "zero2", "load_in_8bit": True}).load_in_8bit


def test_4bit_and_8bit_together_are_rejected():
    with pytest.raises(ConfigError, match="load_in_4bit and load_in_8bit"):
        load_config(None, {"load_in_4bit": True, "load_in_8bit": True})


@pytest.mark.parametrize("field", ["data_path", "eval_data_path"])
def test_missing_data_file_names_field_and_path(tmp_path, field):
    missing = tmp_path / "nope.json"
    cfg = load_config(None, {field: str(missing)})  # the model itself reads no file
    with pytest.raises(ConfigError) as err:
        check_files(cfg)
    assert field in str(err.value) and str(missing) in str(err.value)
    check_files(cfg, data=False)  # export and merge need no data


def test_missing_gguf_and_base_dir_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="gguf_file"):
        checked(None, {"gguf_file": str(tmp_path / "model.gguf")})
    with pytest.raises(ConfigError, match="base_model"):
        checked(None, {"base_model": str(tmp_path / "no-model")})


def test_field_level_errors_name_the_field():
    with pytest.raises(ConfigError, match="refactor_interval"):
        load_config(None, {"refactor_interval": 0})
    with pytest.raises(ConfigError, match="method"):
        load_config(None, {"optimizer": "adamw"})  # the earlier name of the key
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(None, {"max_steps": 0})


def test_unknown_deepspeed_preset_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        checked(None, {"deepspeed": "zero_3"})
    assert "deepspeed" in str(err.value) and "'zero3'" in str(err.value)


def test_presets_exist_and_report_their_stage():
    for name in DS_PRESETS:
        ds = json.loads(ds_config_path(name).read_text())
        assert ds["zero_allow_untested_optimizer"] is True
        assert "optimizer" not in ds and "scheduler" not in ds
        assert zero_stage(RunConfig(deepspeed=name)) == int(name[4])
    assert "offload_optimizer" in json.loads(ds_config_path("zero2_offload").read_text())["zero_optimization"]


def test_repo_ds_configs_match_the_bundled_presets():
    repo_copy = Path(__file__).resolve().parents[1] / "ds_configs"
    if not repo_copy.is_dir():
        pytest.skip("not running from a source checkout")
    for name in DS_PRESETS:
        bundled = json.loads(ds_config_path(name).read_text())
        assert json.loads((repo_copy / f"{name}.json").read_text()) == bundled, name


def test_deepspeed_json_path_and_auto_fields(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                                "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}))
    cfg = load_config(None, {"deepspeed": str(path), "micro_batch_size": 2, "gradient_accumulation_steps": 3})
    assert zero_stage(cfg) == 1
    ds = ds_config.resolve(cfg, world_size=2)
    assert ds["train_batch_size"] == 12  # micro 2 x accumulation 3 x 2 ranks
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 3)
    filled = ds_config.resolve(load_config(None, {"deepspeed": "zero2", "torch_dtype": "bf16", "max_grad_norm": 0.5}), 1)
    assert filled["bf16"]["enabled"] is True and filled["gradient_clipping"] == 0.5
    assert "auto" not in json.dumps(filled)


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(None, {"lora_r": 4, "load_in_4bit": True, "torch_dtype": "bf16"})
    out = dump_config(cfg, tmp_path / "out" / "config.yaml")
    dumped = yaml.safe_load(out.read_text())
    assert dumped["lora_r"] == 4
    assert dumped["bnb_4bit_compute_dtype"] == "bfloat16"  # resolved, not left as null
    assert dumped["bnb_4bit_quant_storage"] == "uint8"
    assert load_config(out) == cfg.resolved()


def test_bad_yaml_top_level(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- lora_r\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_deepspeed_config_with_its_own_optimizer_or_scheduler_is_refused(tmp_path):
    import json

    from reflora_ds.config import ConfigError, build_config

    for block in ("optimizer", "scheduler"):
        path = tmp_path / f"{block}.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}, block: {"type": "AdamW"}}))
        with pytest.raises(ConfigError, match=f"own '{block}' block; remove it"):
            ds_config.check(build_config({"deepspeed": str(path)}))


def test_deepspeed_literals_that_disagree_with_the_run_are_refused_together(tmp_path):
    """A preset's literal accumulation of 8 in a run of 4 would train wrongly in silence: every clash is named."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8,
                                "train_batch_size": 16, "bf16": {"enabled": False},
                                "zero_optimization": {"stage": 1}}))
    cfg = load_config(None, {"deepspeed": str(path), "micro_batch_size": 2, "gradient_accumulation_steps": 4,
                             "torch_dtype": "bf16"})
    with pytest.raises(ConfigError) as err:
        ds_config.resolve(cfg, world_size=1)
    message = str(err.value)
    assert "gradient_accumulation_steps is 8 there, 4 from gradient_accumulation_steps here" in message
    assert "train_batch_size is 16 there, 8" in message and "bf16.enabled is False there, True" in message
    assert "train_micro_batch_size_per_gpu" not in message  # that one agrees

    # Literals that agree pass; what the file leaves out comes from the run configuration.
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                                "zero_optimization": {"stage": 1}}))
    ds = ds_config.resolve(load_config(None, {"deepspeed": str(path), "micro_batch_size": 2,
                                              "gradient_accumulation_steps": 4, "max_grad_norm": 0.3}), 2)
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.3 and ds["bf16"] == {"enabled": False}


def test_method_key_reads_the_earlier_name_optimizer(tmp_path):
    assert load_config(None, {"optimizer": "reflora_s"}).method == "reflora_s"
    assert load_config(write_yaml(tmp_path, {"optimizer": "lora"}), {"method": "scaledgd"}).method == "scaledgd"
    with pytest.raises(ConfigError, match="both 'optimizer'"):
        load_config(write_yaml(tmp_path, {"optimizer": "lora", "method": "reflora"}))
