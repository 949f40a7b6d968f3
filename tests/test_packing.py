"""Sample packing and length grouping.

The oracle for packing: a packed batch's summed loss and its gradients equal
those of the same samples run one by one, unpadded, to 1e-5 (fp32), in both
attention implementations that run on CPU. That holds only if positions
restart and attention stops at every sample boundary.
"""

import numpy as np
import pytest
import torch
from datasets import Dataset
from train_fixtures import adapter_tensors, base_values, make_base, make_rows, metrics, run_cli, write_config, write_rows

from reflora_ds import data
from reflora_ds.data import IGNORE_INDEX, PadCollator, model_inputs, target_count, tokenize_rows
from reflora_ds.packing import best_fit_decreasing, length_grouped_order, pack_dataset
from tiny_models import tiny_llama


def test_bins_hold_every_sample_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500).tolist()
    bins = best_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 64 + 1  # nearly full
    assert bins == best_fit_decreasing(lengths, 64)  # deterministic
    with pytest.raises(ValueError, match="more than the capacity"):
        best_fit_decreasing([65], 64)


def test_packed_sequences_restart_positions_and_unlabel_each_first_token():
    samples = Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9], [10, 11, 12, 13]],
                                 "labels": [[-100, 6, 7], [8, 9], [10, 11, 12, 13]], "source_row": [0, 1, 2]})
    packed = pack_dataset(samples, capacity=6)
    assert len(packed) == 2
    rows = packed.to_list()
    assert sorted(len(r["input_ids"]) for r in rows) == [3, 6]  # 4 + 2 best fit, then 3
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)
    batch = PadCollator(pad_token_id=0)(rows)
    # Sample 0 alone, its padding a sample of its own; then samples 1 and 2.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist()[0][3:] == [IGNORE_INDEX] * 3
    assert "attention_mask" not in model_inputs(batch) and "attention_mask" in model_inputs(
        PadCollator(0)([{"input_ids": [1], "labels": [1]}]))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_samples_unpacked(attention):
    model, tokenizer = tiny_llama(seed=3, attn_implementation=attention)
    model.config.use_cache = False
    columns, _ = tokenize_rows(make_rows(9), tokenizer, cutoff_len=512)
    samples = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(batches):
        model.zero_grad()
        n = sum(target_count(b["labels"]) for b in batches)
        total = sum(model(**model_inputs(b), num_items_in_batch=n).loss for b in batches) * n
        total.backward()
        return total.item(), [p.grad.clone() for p in params]

    alone = [PadCollator(tokenizer.pad_token_id)([s]) for s in samples]
    packed = pack_dataset(Dataset.from_dict({k: [s[k] for s in samples] for k in ("input_ids", "labels")}), 400)
    assert len(packed) < len(samples) // 2  # several samples per sequence
    rows = packed.to_list()
    packed_batch = PadCollator(tokenizer.pad_token_id)(rows)  # padded rows too: their pad is a sample of its own
    assert sum(target_count(b["labels"]) for b in alone) == target_count(packed_batch["labels"])

    loss_alone, grads_alone = loss_and_grads(alone)
    loss_packed, grads_packed = loss_and_grads([packed_batch])
    assert loss_packed == pytest.approx(loss_alone, rel=1e-5)
    for a, b in zip(grads_alone, grads_packed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # And the mask matters: the same rows with a plain attention mask mix the samples.
    crossed = model(**packed_batch, num_items_in_batch=1).loss.item()
    assert abs(crossed - loss_alone) > 1e-3


def test_length_groups_are_batches_of_similar_length_and_a_permutation():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 200, size=1000).tolist()
    order = rng.permutation(1000)
    grouped = length_grouped_order(lengths, order, global_batch=8, seed=0)
    assert sorted(grouped.tolist()) == list(range(1000))
    spread = lambda o: np.mean([np.ptp([lengths[i] for i in o[k:k + 8]]) for k in range(0, 992, 8)])  # noqa: E731
    assert spread(grouped) < 0.1 * spread(order)
    batch_means = [np.mean([lengths[i] for i in grouped[k:k + 8]]) for k in range(0, 992, 8)]
    assert abs(np.corrcoef(np.arange(len(batch_means)), batch_means)[0, 1]) < 0.3  # no steady fall
    assert grouped.tolist() == length_grouped_order(lengths, order, 8, 0).tolist()


def test_packed_and_grouped_runs_train_and_the_packed_one_takes_fewer_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("REFLORA_DS_CACHE", str(tmp_path / "cache"))
    base, rows = make_base(tmp_path / "base"), write_rows(tmp_path / "train.json", make_rows(40))
    common = dict(max_steps=-1, num_epochs=2, save_steps=0, eval_steps=0, cutoff_len=512)
    runs = {}
    for name, extra in (("packed", dict(sample_packing=True)), ("grouped", dict(group_by_length=True)),
                        ("plain", {})):
        config = write_config(tmp_path / f"{name}.yaml", **base_values(base, rows, tmp_path / name, **common, **extra))
        result = run_cli(["train", config])
        assert result.exit_code == 0, result.output
        runs[name] = metrics(tmp_path / name)
    steps = {name: max(r["step"] for r in records) for name, records in runs.items()}
    assert steps["grouped"] == steps["plain"] == 2 * (34 // 4) and 0 < steps["packed"] <= steps["plain"] // 3
    final = {name: records[-1]["eval_loss"] for name, records in runs.items()}
    assert all(np.isfinite(list(final.values())))
    assert adapter_tensors(tmp_path / "packed").keys() == adapter_tensors(tmp_path / "plain").keys()


def test_the_composition_line_names_packing(tmp_path):
    stats = {"train": {"samples": 40, "source": "x.json", "truncated": 0, "dropped_no_target": 0,
                       "skipped_malformed": 0},
             "sources": [{"source": "x.json"}], "packing": {"samples": 34, "sequences": 6, "capacity": 256,
                                                            "fill": 0.93}}
    line = data.describe_data(stats, Dataset.from_dict({"input_ids": [[1]] * 6}), None)
    assert "34 training samples" in line and "packed into 6 sequences of up to 256 tokens (93% full)" in line
