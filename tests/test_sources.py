"""Local datasets in every file type `datasets` reads, hub ids, and mixtures of several sources."""

import json

import pytest
from datasets import Dataset
from test_chat_data import CONVERSATION, TEMPLATE
from train_fixtures import base_values, make_base, make_rows, metrics, run_cli, write_config, write_rows

from reflora_ds.config import ConfigError, build_config, check_files
from reflora_ds.data import DataError, read_rows, take_rows, tokenize_datasets
from tiny_models import tiny_tokenizer

ROWS = make_rows(12)


@pytest.fixture
def files(tmp_path):
    table = Dataset.from_list(ROWS)
    paths = {"json": write_rows(tmp_path / "rows.json", ROWS), "jsonl": tmp_path / "rows.jsonl",
             "parquet": tmp_path / "rows.parquet", "csv": tmp_path / "rows.csv", "arrow": tmp_path / "saved",
             "folder": tmp_path / "shards"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    table.to_parquet(str(paths["parquet"]))
    table.to_csv(str(paths["csv"]), index=False)
    table.save_to_disk(str(paths["arrow"]))
    paths["folder"].mkdir()
    table.select(range(6)).to_parquet(str(paths["folder"] / "part-0.parquet"))
    table.select(range(6, 12)).to_parquet(str(paths["folder"] / "part-1.parquet"))
    return paths


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "csv", "arrow", "folder"])
def test_every_file_type_reads_the_same_rows(files, kind):
    rows = read_rows(files[kind])
    assert rows.format == "llm_adapters" and rows.rows == ROWS


def test_a_raw_arrow_file_reads_too(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert read_rows(arrow).rows == ROWS


def test_a_hub_id_offline_is_one_line_that_says_so(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="data_path: someone/some-data is not a file or folder on this machine, "
                                          "and the hub is offline"):
        check_files(build_config({"data_path": "someone/some-data"}))
    with pytest.raises(ConfigError, match=r"datasets\[1\].path: no such file or directory: ./nowhere.json"):
        check_files(build_config({"datasets": [{"path": __file__}, {"path": "./nowhere.json"}]}))
    with pytest.raises(DataError, match="hub is offline"):
        read_rows("someone/some-data")


def test_mixture_settings_are_checked_up_front():
    with pytest.raises(ConfigError, match="datasets and data_path are both set"):
        build_config({"data_path": "a.json", "datasets": [{"path": "b.json"}]})
    with pytest.raises(ConfigError, match="set weight or max_rows, not both"):
        build_config({"datasets": [{"path": "b.json", "weight": 2, "max_rows": 3}]})
    with pytest.raises(ConfigError, match="sample_packing and group_by_length"):
        build_config({"sample_packing": True, "group_by_length": True})
    assert build_config({"datasets": [{"path": "c.jsonl", "type": "sharegpt"}]}).datasets[0].type == "chat_template"


def test_weights_and_caps_take_a_share_of_each_source():
    table = Dataset.from_dict({"input_ids": [[i] for i in range(10)]})
    assert len(take_rows(table, None, None, 0)) == 10
    half = take_rows(table, 0.5, None, 0)["input_ids"]
    assert len(half) == 5 and len({tuple(x) for x in half}) == 5
    twice = sorted(x[0] for x in take_rows(table, 2.5, None, 0)["input_ids"])
    assert len(twice) == 25 and all(twice.count(i) >= 2 for i in range(10))
    assert take_rows(table, None, 3, 1)["input_ids"] == take_rows(table, None, 3, 1)["input_ids"]
    assert len(take_rows(table, None, 30, 1)) == 10


def test_a_mixture_keeps_each_sources_format_and_reports_its_composition(tmp_path, monkeypatch):
    monkeypatch.setenv("REFLORA_DS_CACHE", str(tmp_path / "cache"))
    instructions = Dataset.from_list(ROWS)
    instructions.to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    cfg = build_config({"datasets": [{"path": str(tmp_path / "a.parquet"), "weight": 0.5},
                                     {"path": str(tmp_path / "b.jsonl"), "type": "chat_template", "weight": 3}],
                        "chat_template": TEMPLATE, "cutoff_len": 512})
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    train, _, stats = tokenize_datasets(cfg, tokenizer)
    assert [(c["format"], c["samples"]) for c in stats["sources"]] == [("llm_adapters", 6), ("chat_template", 3)]
    assert len(train) == 9 and sorted(set(train["source_row"]))[-1] == 12  # the chat row follows the 12 rows
    assert stats["fingerprint"].count(" + ") == 1


def test_a_parquet_file_and_a_two_dataset_mixture_train(tmp_path, monkeypatch):
    monkeypatch.setenv("REFLORA_DS_CACHE", str(tmp_path / "cache"))
    base = make_base(tmp_path / "base")
    Dataset.from_list(make_rows(30)).to_parquet(str(tmp_path / "train.parquet"))
    other = write_rows(tmp_path / "other.json", make_rows(20))
    parquet = base_values(base, tmp_path / "train.parquet", tmp_path / "parquet", max_steps=3, save_steps=0)
    mixture = base_values(base, None, tmp_path / "mixture", max_steps=3, save_steps=0)
    mixture.pop("data_path")
    mixture["datasets"] = [{"path": str(tmp_path / "train.parquet"), "max_rows": 10}, {"path": str(other)}]
    for name, values in (("parquet", parquet), ("mixture", mixture)):
        result = run_cli(["train", write_config(tmp_path / f"{name}.yaml", **values)])
        assert result.exit_code == 0, result.output
        assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()
        assert metrics(tmp_path / name)[-1]["step"] == 3
    assert "mixture: " in result.output and "train.parquet (llm_adapters): 10 samples of 30 rows" in result.output


def test_source_rows_lead_each_mixture_sample_back_to_its_row(tmp_path, monkeypatch):
    """With a malformed row skipped in the first source, the second source's samples still find their rows."""
    from reflora_ds.data import IGNORE_INDEX, source_rows

    monkeypatch.setenv("REFLORA_DS_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "a.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]) + "{not json\n")
    second = write_rows(tmp_path / "b.json", ROWS[3:6])
    cfg = build_config({"datasets": [{"path": str(first)}, {"path": str(second)}], "skip_malformed_rows": True,
                        "cutoff_len": 512})
    tokenizer = tiny_tokenizer()
    train, _, stats = tokenize_datasets(cfg, tokenizer)
    rows = source_rows(cfg)
    assert len(rows) == 6 and [c["rows"] for c in stats["sources"]] == [3, 3]
    for ids, labels, index in zip(train["input_ids"], train["labels"], train["source_row"]):
        response = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
        assert response.startswith(rows[index]["output"])
