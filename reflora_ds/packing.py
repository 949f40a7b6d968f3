"""Sample packing and length grouping: less compute spent on padding.

Packing puts several tokenized samples into one sequence of at most
``cutoff_len`` tokens. Each packed sequence carries ``position_ids`` that
restart at 0 at every sample and is fed without an attention mask:
transformers then builds a block-diagonal causal mask from the positions
(sdpa and eager attention) or passes the samples' lengths to flash-attention,
so attention stays inside each sample. The first token of every sample gets
no label: alone, it is never predicted either (nothing precedes it), so the
loss and the target-token count of a packed batch equal those of its samples
unpadded and apart.

Length grouping (``group_by_length``) is the light alternative: batches are
drawn from runs of similar length, as the Hugging Face Trainer's
LengthGroupedSampler does.
"""

from __future__ import annotations

import bisect

import numpy as np
from datasets import Dataset

from .data import IGNORE_INDEX

# Samples sorted by length at a time, in global batches (the Trainer's megabatch factor).
GROUP_SPAN = 50


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices whose lengths sum to at most ``capacity``; longest first, each into the fullest
    bin it fits (deterministic). Bins come back in the order of their first sample."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin), sorted
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the capacity {capacity}")
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            bins.append([i])
            free, b = capacity - lengths[i], len(bins) - 1
        else:
            free, b = room.pop(at)
            bins[b].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, b))
    for b in bins:
        b.sort()
    return sorted(bins, key=lambda b: b[0])


def pack_dataset(dataset: Dataset, capacity: int) -> Dataset:
    """The samples of ``dataset`` packed into sequences of at most ``capacity`` tokens:
    input_ids, labels (no label on each sample's first token) and position_ids."""
    ids, labels = dataset["input_ids"], dataset["labels"]
    columns: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in best_fit_decreasing([len(x) for x in ids], capacity):
        packed_ids, packed_labels, positions = [], [], []
        for i in members:
            packed_ids += ids[i]
            packed_labels += [IGNORE_INDEX] + list(labels[i][1:])
            positions += range(len(ids[i]))
        columns["input_ids"].append(packed_ids)
        columns["labels"].append(packed_labels)
        columns["position_ids"].append(positions)
    return Dataset.from_dict(columns)


def length_grouped_order(lengths: list[int], order: np.ndarray, global_batch: int, seed: int) -> np.ndarray:
    """``order`` (a permutation) regrouped so that each global batch holds samples of similar length.

    Spans of GROUP_SPAN global batches are sorted longest first; the whole
    batches are then shuffled (``seed``), so lengths do not fall steadily
    through an epoch. A last partial batch stays last.
    """
    span = GROUP_SPAN * global_batch
    regrouped = np.concatenate([sorted(order[s:s + span], key=lambda i: -lengths[i])
                                for s in range(0, len(order), span)]).astype(np.int64)
    n_full = len(regrouped) // global_batch
    batches = regrouped[:n_full * global_batch].reshape(n_full, global_batch)
    shuffled = batches[np.random.default_rng(seed).permutation(n_full)]
    return np.concatenate([shuffled.reshape(-1), regrouped[n_full * global_batch:]])
