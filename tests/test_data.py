import json

import pytest
import torch
from datasets import Dataset

from reflora_ds import data
from reflora_ds.data import (
    EMBEDDED_TEST,
    IGNORE_INDEX,
    MASK_CLOSE,
    MASK_OPEN,
    DataError,
    PadCollator,
    build_prompt,
    detect_format,
    preprocess,
    read_rows,
    render_sample,
    shard_for_rank,
    shuffle,
    split_validation,
    tokenize_rows,
)
from tiny_models import tiny_tokenizer

ROWS = [
    {"instruction": "Which is a mammal?", "input": "", "output": "the correct answer is answer2", "answer": "answer2"},
    {"instruction": "Pick one.", "input": "A fox or a fish", "output": "the correct answer is answer1",
     "answer": "answer1"},
    {"instruction": "Is the sky green?", "input": "", "output": "the correct answer is false", "answer": "false"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_template_is_the_alpaca_text():
    assert build_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X.\n\n### Response:\n"
    )
    with_input = build_prompt("Do X.", "on Y")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nDo X.\n\n### Input:\non Y\n\n### Response:\n")


def test_formats_are_detected_and_normalised(tmp_path):
    llm = write_json(tmp_path / "llm.json", ROWS)
    alpaca = tmp_path / "alpaca.jsonl"
    lines = [json.dumps({"instruction": r["instruction"], "output": r["output"]}) for r in ROWS]
    alpaca.write_text("\n".join(lines) + "\n")
    disk = tmp_path / "disk"
    Dataset.from_list(ROWS).save_to_disk(str(disk))

    assert detect_format(llm) == "llm_adapters"
    assert detect_format(alpaca) == "alpaca"
    assert detect_format(disk) == "llm_adapters"  # a saved dataset: its rows decide
    assert read_rows(llm).rows == ROWS
    alpaca_rows = read_rows(alpaca).rows
    assert [r["output"] for r in alpaca_rows] == [r["output"] for r in ROWS]
    assert all(r["input"] == "" and r["answer"] == "" for r in alpaca_rows)
    assert read_rows(disk).rows == ROWS


def test_embedded_data_is_llm_adapters_arc_easy():
    train = read_rows(None)
    assert train.format == "llm_adapters" and len(train.rows) == 2251
    assert len(read_rows(EMBEDDED_TEST).rows) == 500
    assert train.rows[0]["output"] == "the correct answer is " + train.rows[0]["answer"]


def test_loss_only_on_response_plus_eos(tok):
    columns, stats = tokenize_rows(ROWS, tok, cutoff_len=512)
    assert stats["truncated"] == 0 and stats["dropped_no_target"] == 0
    for row, ids, labels in zip(ROWS, columns["input_ids"], columns["labels"]):
        n_prompt = len(tok(build_prompt(row["instruction"], row["input"]))["input_ids"])
        assert ids[0] == tok.bos_token_id
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] and IGNORE_INDEX not in labels[n_prompt:]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(labels[n_prompt:]) == row["output"] + tok.eos_token
        prompt = build_prompt(row["instruction"], row["input"])
        assert tok.decode(ids) == tok.bos_token + prompt + row["output"] + tok.eos_token


def test_truncation_keeps_cutoff_and_drops_eos(tok):
    full, _ = tokenize_rows(ROWS[:1], tok, cutoff_len=512)
    n_full = len(full["input_ids"][0])
    cut, stats = tokenize_rows(ROWS[:1], tok, cutoff_len=n_full - 3)
    assert stats["truncated"] == 1
    assert cut["input_ids"][0] == full["input_ids"][0][: n_full - 3]
    assert cut["labels"][0] == full["labels"][0][: n_full - 3]
    assert cut["input_ids"][0][-1] != tok.eos_token_id


def test_sample_whose_prompt_fills_cutoff_is_dropped(tok):
    columns, stats = tokenize_rows(ROWS, tok, cutoff_len=10)
    assert stats["dropped_no_target"] == 3 and columns["input_ids"] == []


def test_malformed_row_names_file_and_index(tmp_path):
    rows = [dict(ROWS[0]), {"instruction": "x", "input": "", "answer": "a"}, dict(ROWS[1], output=7)]
    path = write_json(tmp_path / "bad.json", rows)
    with pytest.raises(DataError) as err:
        read_rows(path, "llm_adapters")
    assert str(path) in str(err.value) and "row 1" in str(err.value) and "'output'" in str(err.value)

    result = read_rows(path, "llm_adapters", skip_malformed=True)
    assert result.skipped == 2 and result.skipped_rows == [1, 2] and result.rows == [ROWS[0]]


def test_non_string_value_and_bad_jsonl_line(tmp_path):
    path = write_json(tmp_path / "bad.json", [dict(ROWS[0]), dict(ROWS[1], instruction=["list"])])
    with pytest.raises(DataError, match=r"row 1: key 'instruction' is list"):
        read_rows(path)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: not valid JSON"):
        read_rows(jsonl)
    assert read_rows(jsonl, skip_malformed=True).skipped == 1


@pytest.mark.parametrize("n, world", [(10, 2), (11, 3), (7, 1)])
def test_shards_are_disjoint_and_cover(n, world):
    ds = Dataset.from_dict({"i": list(range(n))})
    shards = [shard_for_rank(ds, rank, world)["i"] for rank in range(world)]
    flat = [i for shard in shards for i in shard]
    assert len(flat) == len(set(flat))  # disjoint
    assert sorted(flat) == list(range(n - n % world))  # covers all but the uneven tail
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
    # micro-batch k of all ranks together is block k of the global order
    assert sorted(s[0] for s in shards) == list(range(world))
    uneven = [i for rank in range(world) for i in shard_for_rank(ds, rank, world, even=False)["i"]]
    assert sorted(uneven) == list(range(n))


def test_shuffle_and_split_are_deterministic():
    ds = Dataset.from_dict({"i": list(range(50))})
    assert shuffle(ds, 3)["i"] == shuffle(ds, 3)["i"] != shuffle(ds, 4)["i"]
    assert sorted(shuffle(ds, 3)["i"]) == list(range(50))
    train, val = split_validation(ds, 10, seed=1)
    assert len(val) == 10 and len(train) == 40
    assert not set(train["i"]) & set(val["i"])
    assert split_validation(ds, 10, seed=1)[1]["i"] == val["i"]
    assert split_validation(ds, 0, seed=1) == (ds, None)
    with pytest.raises(DataError, match="val_set_size"):
        split_validation(ds, 50, seed=1)


def test_collator_right_pads(tok):
    batch = PadCollator(pad_token_id=tok.pad_token_id)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
    wide = PadCollator(tok.pad_token_id, pad_to_multiple_of=8)([{"input_ids": [1], "labels": [1]}])
    assert wide["input_ids"].shape == (1, 8)


def test_preprocess_caches_and_reuses(tmp_path, tok, monkeypatch):
    path = write_json(tmp_path / "train.json", ROWS)
    cache = tmp_path / "cache"
    first = preprocess(path, tok, cutoff_len=128, cache_root=cache)
    assert not first.from_cache and first.stats["samples"] == 3
    stamp = (first.path / "reflora_meta.json").stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of using the cache")

    monkeypatch.setattr(data, "tokenize_rows", no_tokenizing)
    second = preprocess(path, tok, cutoff_len=128, cache_root=cache)
    assert second.from_cache and second.path == first.path
    assert (second.path / "reflora_meta.json").stat().st_mtime_ns == stamp
    assert second.dataset["input_ids"] == first.dataset["input_ids"]
    assert second.dataset["labels"] == first.dataset["labels"]
    monkeypatch.undo()

    # anything the ids depend on gives a new cache entry
    assert preprocess(path, tok, cutoff_len=64, cache_root=cache).path != first.path
    write_json(path, ROWS[:2])
    changed = preprocess(path, tok, cutoff_len=128, cache_root=cache)
    assert not changed.from_cache and len(changed.dataset) == 2
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []


def test_render_marks_masked_prompt(tok):
    columns, _ = tokenize_rows(ROWS[:1], tok)
    text = render_sample({"input_ids": columns["input_ids"][0], "labels": columns["labels"][0]}, tok)
    body = text.split("\n", 1)[1]
    assert body.startswith(MASK_OPEN + tok.bos_token + "Below is an instruction")
    assert body.endswith("### Response:\n" + MASK_CLOSE + ROWS[0]["output"] + tok.eos_token)
