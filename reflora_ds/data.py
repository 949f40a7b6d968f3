"""Instruction data: reading, the prompt template, response-only tokenization, caching.

Rows are read from LLM-Adapters JSON (instruction, input, output, answer), Alpaca
JSON/JSONL (instruction, input, output) or a `datasets.save_to_disk` folder, and
normalised to the four LLM-Adapters keys (`answer` is "" when the source has none).
Each row becomes `prompt + output + EOS`; the loss sees only `output + EOS`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets, load_from_disk

from . import atomic
from .sources import Unparsable
from .config import RESOURCES, cache_dir

IGNORE_INDEX = -100  # label value the loss skips (torch / transformers convention)

EMBEDDED_TRAIN = RESOURCES / "arc_easy" / "train.json"
EMBEDDED_TEST = RESOURCES / "arc_easy" / "test.json"

# Bump when tokenization changes in a way that invalidates cached datasets.
# 2: a source_row column (each sample's row in the file, for scoring accuracy).
CACHE_VERSION = 2


class DataError(ValueError):
    """Data that cannot be used, with the file and row it came from."""


# --- prompt templates ---------------------------------------------------------


@dataclass(frozen=True)
class PromptTemplate:
    no_input: str
    with_input: str
    response_split: str  # what separates the prompt from a generated answer

    def render(self, instruction: str, input: str = "") -> str:
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction)


# The Alpaca template (alpaca-lora templates/alpaca.json), the one LLM-Adapters
# fine-tunes and evaluates with. The response is appended directly after it.
PROMPT_TEMPLATES = {
    "alpaca": PromptTemplate(
        no_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        response_split="### Response:",
    ),
}


def get_template(name: str) -> PromptTemplate:
    try:
        return PROMPT_TEMPLATES[name]
    except KeyError:
        raise DataError(f"unknown prompt template {name!r}; known: {', '.join(PROMPT_TEMPLATES)}") from None


def build_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The text the model sees before its response (what evaluation generates from)."""
    return get_template(template).render(instruction, input)


def row_prompt(row: dict, template: str = "alpaca") -> str:
    """A row's prompt: rendered already (a chat row prepared for evaluation), or built with the template."""
    if row.get("prompt") is not None:
        return row["prompt"]
    return build_prompt(row["instruction"], row.get("input", ""), template)


# --- reading rows -------------------------------------------------------------

# Row schemas. "hf_disk" (a save_to_disk folder) is still accepted as a data_format: the schema is then detected.
FORMATS = ("llm_adapters", "alpaca", "chat_template")
_REQUIRED = {"llm_adapters": ("instruction", "input", "output", "answer"), "alpaca": ("instruction", "output")}
_OPTIONAL = {"llm_adapters": (), "alpaca": ("input", "answer")}


@dataclass
class Rows:
    """Rows normalised to instruction/input/output/answer (chat: messages/answer), plus what was skipped."""

    rows: list[dict]
    source: Path | str
    format: str
    skipped: int = 0
    skipped_rows: list[int] = field(default_factory=list)

    @property
    def chat(self) -> bool:
        return self.format == "chat_template"


def _schema_of(raw: list[Any], field_messages: str | None = None) -> str:
    """chat_template for conversations; llm_adapters when rows carry an `answer`; otherwise alpaca."""
    from .chat import conversation_field

    first = next((row for row in raw if isinstance(row, dict)), {})
    if conversation_field(first, field_messages) is not None:
        return "chat_template"
    return "llm_adapters" if "answer" in first else "alpaca"


def detect_format(path: str | Path) -> str:
    """The row schema of a source (read once to look)."""
    return _schema_of(_raw_rows(path, "train"))


def _raw_rows(path: str | Path, split: str) -> list[Any]:
    from .sources import SourceError, read_raw

    try:
        return read_raw(path, split)
    except SourceError as err:
        raise DataError(str(err)) from None


def _row_problem(row: Any, schema: str, field_messages: str | None = None) -> str | None:
    if isinstance(row, Unparsable):
        return f"not valid JSON ({row.reason})"
    if not isinstance(row, dict):
        return f"expected an object, found {type(row).__name__}"
    if schema == "chat_template":
        from .chat import conversation_field, normalise_conversation

        key = conversation_field(row, field_messages)
        if key is None:
            return (f"no {field_messages!r} key (field_messages)" if field_messages
                    else "no 'messages' (OpenAI) or 'conversations' (ShareGPT) key")
        try:
            normalise_conversation(row[key])
        except ValueError as err:
            return f"{key}: {err}"
        return None
    for key in _REQUIRED[schema]:
        if key not in row:
            return f"missing key {key!r}"
    for key in _REQUIRED[schema] + _OPTIONAL[schema]:
        if key in row and row[key] is not None and not isinstance(row[key], str):
            return f"key {key!r} is {type(row[key]).__name__}, expected a string"
    return None


def _normalised(row: dict, schema: str, field_messages: str | None = None) -> dict:
    if schema == "chat_template":
        from .chat import conversation_field, normalise_conversation

        turns = row[conversation_field(row, field_messages)]
        return {"messages": normalise_conversation(turns), "answer": row.get("answer") or ""}
    return {key: row.get(key) or "" for key in ("instruction", "input", "output", "answer")}


def read_rows(path: str | Path | None = None, data_format: str = "auto", *, skip_malformed: bool = False,
              split: str = "train", field_messages: str | None = None) -> Rows:
    """Read and check every row; a malformed one raises DataError unless skipped (and counted).

    ``path``: a file, a folder or a hub dataset id (sources.py); None: the embedded training set.
    ``field_messages``: the column holding conversations, when not messages / conversations.
    """
    path = path if path is not None else EMBEDDED_TRAIN
    if data_format not in ("auto", "hf_disk") + FORMATS:
        raise DataError(f"unknown data format {data_format!r}; known: auto, {', '.join(FORMATS)}")
    raw = _raw_rows(path, split)
    schema = _schema_of(raw, field_messages) if data_format in ("auto", "hf_disk") else data_format

    rows, skipped = [], []
    for index, row in enumerate(raw):
        problem = _row_problem(row, schema, field_messages)
        if problem is not None:
            if not skip_malformed:
                raise DataError(f"{path}: row {index}: {problem} (set skip_malformed_rows to skip such rows)")
            skipped.append(index)
            continue
        rows.append(_normalised(row, schema, field_messages))
    if not rows:
        raise DataError(f"{path}: no usable rows ({len(skipped)} malformed)")
    return Rows(rows=rows, source=path, format=schema, skipped=len(skipped), skipped_rows=skipped)


# --- tokenization ---------------------------------------------------------------


def _prompt_token_count(prompt: str, ids: list[int], offsets: list[tuple[int, int]] | None, tokenizer) -> int:
    """How many leading tokens belong to the prompt.

    With character offsets (fast tokenizers) the boundary is exact even where a
    token could merge across it: a token starting inside the prompt counts as
    prompt. Special tokens have empty spans; leading ones (BOS) are prompt too.
    """
    if offsets is not None:
        for index, (start, end) in enumerate(offsets):
            if start >= len(prompt) and end > start:
                return index
        return len(ids)
    return len(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def tokenize_rows(
    rows: list[dict[str, str]], tokenizer, *, template: str = "alpaca", cutoff_len: int = 256
) -> tuple[dict[str, list], dict[str, int]]:
    """input_ids, labels (IGNORE_INDEX on the prompt) and source_row for each row, plus counts.

    EOS follows the response so the model learns to stop; a truncated sample
    loses it, as its response really was cut. Samples whose prompt alone fills
    cutoff_len have nothing to learn from and are dropped (counted); source_row
    (the sample's index in ``rows``) still leads each kept sample back to its
    row and its ``answer``.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token")
    get_template(template)  # an unknown name fails even when every row brings its own prompt
    prompts = [row_prompt(row, template) for row in rows]
    texts = [prompt + row["output"] for prompt, row in zip(prompts, rows)]
    encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=tokenizer.is_fast)
    out: dict[str, list] = {"input_ids": [], "labels": [], "source_row": []}
    stats = {"rows": len(rows), "truncated": 0, "dropped_no_target": 0}
    for i, prompt in enumerate(prompts):
        ids = list(encoded["input_ids"][i])
        offsets = encoded["offset_mapping"][i] if tokenizer.is_fast else None
        n_prompt = _prompt_token_count(prompt, ids, offsets, tokenizer)
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
        add_sample(out, stats, i, ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:], cutoff_len)
    return out, stats


def add_sample(out: dict[str, list], stats: dict[str, int], row: int, ids: list[int], labels: list[int],
               cutoff_len: int) -> None:
    """Append one sample cut to cutoff_len (counted as truncated); one left with no target is dropped (counted)."""
    if len(ids) > cutoff_len:
        stats["truncated"] += 1
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels):
        stats["dropped_no_target"] += 1
        return
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["source_row"].append(row)


# --- the tokenized-data cache -------------------------------------------------


def _source_fingerprint(path: Path) -> str:
    """File contents for a file; names, sizes and mtimes for a folder (arrow files can be big)."""
    h = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            st = item.stat()
            h.update(f"{item.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges, normalisation and special tokens: what decides the ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time settings, not part of the tokenizer
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    h.update(json.dumps(specials).encode())
    return h.hexdigest()


@dataclass
class TokenizedData:
    dataset: Dataset  # columns input_ids, labels, source_row
    path: Path  # cache folder it lives in
    from_cache: bool
    stats: dict[str, Any]


def preprocess(
    data_path: str | Path | None,
    tokenizer,
    *,
    data_format: str = "auto",
    template: str = "alpaca",
    cutoff_len: int = 256,
    skip_malformed: bool = False,
    cache_root: str | Path | None = None,
    split: str = "train",
    field_messages: str | None = None,
) -> TokenizedData:
    """Tokenize a source once and keep the result; later calls load it from disk.

    The cache key covers everything the ids depend on: the data, the tokenizer
    (and its chat template, for chat data), the template, cutoff_len and this
    module's CACHE_VERSION. Writing goes to a private folder renamed into
    place, so concurrent ranks never see half a cache. A hub dataset is read
    (from the hub's own cache) to be fingerprinted.
    """
    path = Path(data_path).expanduser() if data_path is not None else EMBEDDED_TRAIN
    local = path.exists()
    reading = dict(skip_malformed=skip_malformed, split=split, field_messages=field_messages)
    rows = None if local else read_rows(str(data_path), data_format, **reading)
    key_parts = {
        "version": CACHE_VERSION,
        "source": _source_fingerprint(path) if local else _rows_fingerprint(rows.rows),
        "split": split,
        "format": data_format,  # as set: with the contents it decides the detected one (no read just to look)
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": asdict(get_template(template)),
        "cutoff_len": cutoff_len,
        "skip_malformed": skip_malformed,
        "field_messages": field_messages,
    }
    if data_format not in ("llm_adapters", "alpaca"):  # conversations, named or detected: the template counts
        key_parts["chat_template"] = getattr(tokenizer, "chat_template", None)
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cache_root) if cache_root is not None else cache_dir() / "tokenized"
    target = root / f"{path.stem or 'data'}-{key}"
    meta_file = target / "reflora_meta.json"

    if meta_file.is_file():
        return TokenizedData(load_from_disk(str(target)), target, True, json.loads(meta_file.read_text()))

    if rows is None:
        rows = read_rows(path, data_format, **reading)
    columns, stats = tokenize_source(rows, tokenizer, template=template, cutoff_len=cutoff_len)
    stats.update(source=str(data_path if data_path is not None else path), format=rows.format,
                 skipped_malformed=rows.skipped, samples=len(columns["input_ids"]))
    dataset = Dataset.from_dict(columns)

    # Concurrent ranks may tokenize at once: the first to finish puts its (identical) result in place.
    with atomic.staged_dir(target, on_exists="keep") as tmp:
        dataset.save_to_disk(str(tmp))
        (tmp / "reflora_meta.json").write_text(json.dumps(stats, indent=2))
    return TokenizedData(load_from_disk(str(target)), target, False, stats)


def tokenize_source(rows: Rows, tokenizer, *, template: str, cutoff_len: int) -> tuple[dict[str, list], dict]:
    """Instruction rows with the prompt template, conversations with the chat template."""
    if rows.chat:
        from .chat import tokenize_conversations

        return tokenize_conversations([row["messages"] for row in rows.rows], tokenizer, cutoff_len=cutoff_len)
    return tokenize_rows(rows.rows, tokenizer, template=template, cutoff_len=cutoff_len)


def _rows_fingerprint(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


# --- ordering, splitting, sharding --------------------------------------------
# keep_in_memory everywhere: these datasets may be memory-mapped from a shared
# cache folder, and index mappings must not be written back into it.


def shuffle(dataset: Dataset, seed: int) -> Dataset:
    """The same permutation for the same seed, on every rank and every run."""
    return dataset.shuffle(seed=seed, keep_in_memory=True)


def split_validation(dataset: Dataset, val_set_size: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out val_set_size random rows, as LLM-Adapters does; 0 holds out nothing."""
    if val_set_size <= 0:
        return dataset, None
    if val_set_size >= len(dataset):
        raise DataError(f"val_set_size ({val_set_size}) must be smaller than the data ({len(dataset)} rows)")
    # The permutation Dataset.train_test_split draws, without its call: that one
    # cannot keep a disk-backed (cached) dataset's split in memory.
    order = np.random.default_rng(seed).permutation(len(dataset))
    return (dataset.select(order[val_set_size:], keep_in_memory=True),
            dataset.select(order[:val_set_size], keep_in_memory=True))


def shard_for_rank(dataset: Dataset, rank: int, world_size: int, *, even: bool = True) -> Dataset:
    """Rows rank, rank + W, rank + 2W, ... of the dataset.

    Striding (not contiguous blocks) means micro-batch k of all ranks together
    is the contiguous block k of the global order, so W ranks see exactly the
    batches one process would with a W times larger micro-batch. With `even`
    the tail that does not divide by W is dropped so every rank takes the same
    number of steps (collectives would otherwise hang).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    n = len(dataset) - (len(dataset) % world_size if even else 0)
    return dataset.select(range(rank, n, world_size), keep_in_memory=True)


# --- batching ---------------------------------------------------------------------


@dataclass
class PadCollator:
    """Right-pads input_ids with pad_token_id, labels with IGNORE_INDEX, and builds the mask.

    Packed samples (with position_ids) get their padding as one more sample of
    positions 0, 1, ..., which attends only to itself and has no labels.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(sample["input_ids"]) for sample in samples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        packed = "position_ids" in samples[0]
        positions = torch.zeros((len(samples), width), dtype=torch.long) if packed else None
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = torch.as_tensor(sample["input_ids"])
            labels[row, :n] = torch.as_tensor(sample["labels"])
            attention_mask[row, :n] = 1
            if packed:
                positions[row, :n] = torch.as_tensor(sample["position_ids"])
                positions[row, n:] = torch.arange(width - n)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if packed:
            batch["position_ids"] = positions
        return batch


def schedule_length(n_train: int, micro_batch_size: int, accumulation: int, world: int, max_steps: int,
                    num_epochs: float) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a training set of ``n_train`` samples."""
    per_step = micro_batch_size * accumulation
    steps_per_epoch = (n_train // world) // per_step
    if steps_per_epoch == 0:
        raise DataError(
            f"{n_train} training samples do not fill one global batch of {per_step * world} "
            f"(micro_batch_size {micro_batch_size} × gradient_accumulation_steps {accumulation} × {world} ranks)"
        )
    total = max_steps if max_steps > 0 else math.ceil(num_epochs * steps_per_epoch)
    return steps_per_epoch, total


def epoch_shard(dataset: Dataset, seed: int, epoch: int, rank: int, world: int,
                group_by_length: int | None = None) -> Dataset:
    """This rank's rows of epoch ``epoch``, in order.

    Epoch e visits the training set in the order ``shuffle(seed + e)``; rank r
    takes rows r, r + W, ... of it, and optimizer step s consumes the
    contiguous block s of ``micro_batch_size × accumulation × W`` rows (see
    step_batches). Rows that do not fill a last global batch are left out of
    that epoch. ``group_by_length`` (the global batch size): that order
    regrouped into batches of similar length (packing.length_grouped_order).
    """
    if not group_by_length:
        return shard_for_rank(shuffle(dataset, seed + epoch), rank, world)
    from .packing import length_grouped_order

    order = np.random.default_rng(seed + epoch).permutation(len(dataset))  # what shuffle() draws
    lengths = [len(ids) for ids in dataset["input_ids"]]
    grouped = length_grouped_order(lengths, order, group_by_length, seed + epoch)
    return shard_for_rank(dataset.select(grouped, keep_in_memory=True), rank, world)


def step_batches(shard: Dataset, step_in_epoch: int, micro_batch_size: int, accumulation: int,
                 collate: PadCollator) -> list[dict]:
    """This rank's micro-batches for optimizer step ``step_in_epoch`` of the epoch (contiguous rows)."""
    first = step_in_epoch * accumulation * micro_batch_size
    columns = shard[first:first + accumulation * micro_batch_size]
    keys = [k for k in ("input_ids", "labels", "position_ids") if k in columns]
    rows = [dict(zip(keys, values)) for values in zip(*(columns[k] for k in keys))]
    return [collate(rows[j * micro_batch_size:(j + 1) * micro_batch_size]) for j in range(accumulation)]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model is called with: a packed batch goes without its attention mask, so that transformers
    builds the per-sample mask from position_ids (see packing.py)."""
    if "position_ids" in batch:
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def target_count(labels: torch.Tensor) -> int:
    """Tokens the loss is computed on: labels after the causal shift, minus the masked ones."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# --- a run's data -------------------------------------------------------------------


def data_sources(cfg) -> list:
    """The run's training sources: ``datasets``, or the one named by data_path (None: the embedded set)."""
    from .config import DatasetSpec

    if cfg.datasets is not None:
        return list(cfg.datasets)
    return [DatasetSpec(path=str(cfg.data_path) if cfg.data_path is not None else str(EMBEDDED_TRAIN),
                        type=cfg.data_format)]


def source_rows(cfg) -> list[dict]:
    """The training sources' rows end to end: what a sample's source_row points into."""
    return [row for spec in data_sources(cfg)
            for row in read_rows(spec.path, spec.type, skip_malformed=cfg.skip_malformed_rows, split=spec.split,
                                 field_messages=spec.field_messages).rows]


def take_rows(dataset: Dataset, weight: float | None, max_rows: int | None, seed: int) -> Dataset:
    """A source's share of the mixture: ``weight`` × its samples (whole repeats, then a random part), or at most
    ``max_rows`` of them, chosen at random; the same choice for the same seed."""
    n = len(dataset)
    if weight is None and (max_rows is None or max_rows >= n):
        return dataset
    rng = np.random.default_rng(seed)
    if weight is None:
        picked = np.sort(rng.permutation(n)[:max_rows])
    else:
        whole, part = divmod(round(weight * n), n)
        picked = np.concatenate([np.tile(np.arange(n), whole), np.sort(rng.permutation(n)[:part])])
    return dataset.select(picked, keep_in_memory=True)


def _add_stats(total: dict, part: dict) -> None:
    for key in ("rows", "truncated", "dropped_no_target", "skipped_malformed", "samples"):
        total[key] = total.get(key, 0) + part.get(key, 0)


def tokenize_datasets(cfg, tokenizer) -> tuple[Dataset, Dataset | None, dict]:
    """(train, eval or None, stats) of a run configuration: tokenized (cached), and its evaluation set.

    Every source is tokenized (and cached) on its own, in its own format, and
    then takes its share of the mixture (weight / max_rows); source_row counts
    rows across the sources end to end (see source_rows). The evaluation set is
    eval_data_path if given, else val_set_size samples held out of the mixture,
    else none. With sample_packing the training samples are then packed.
    """
    options = dict(template=cfg.prompt_template, cutoff_len=cfg.cutoff_len, skip_malformed=cfg.skip_malformed_rows)
    parts, composition, offset = [], [], 0
    stats: dict = {"train": {}, "sources": composition}
    for index, spec in enumerate(data_sources(cfg)):
        tokenized = preprocess(spec.path, tokenizer, data_format=spec.type, split=spec.split,
                               field_messages=spec.field_messages, **options)
        taken = take_rows(tokenized.dataset, spec.weight, spec.max_rows, cfg.seed + index)
        rows = tokenized.stats["rows"]  # usable rows: what source_rows() lists for this source
        if offset:
            base = offset
            taken = taken.map(lambda sample: {"source_row": sample["source_row"] + base}, keep_in_memory=True)
        offset += rows
        parts.append(taken)
        _add_stats(stats["train"], tokenized.stats)
        composition.append({"source": str(spec.path), "format": tokenized.stats["format"], "rows": rows,
                            "samples": len(taken), "tokens": sum(len(ids) for ids in taken["input_ids"]),
                            "cache": str(tokenized.path)})
    stats["train"]["source"] = " + ".join(c["source"] for c in composition)
    train_set = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    # The cache folders' names carry the key of everything the samples depend on: the run's data identity.
    stats["cache"] = composition[0]["cache"] if len(composition) == 1 else [c["cache"] for c in composition]
    stats["fingerprint"] = " + ".join(Path(c["cache"]).name for c in composition)
    eval_set = None
    if cfg.eval_data_path is not None:
        eval_data = preprocess(cfg.eval_data_path, tokenizer, **options)
        eval_set, stats["eval"] = eval_data.dataset, eval_data.stats
        stats["fingerprint"] += f" | eval {eval_data.path.name}"
    elif cfg.val_set_size:
        train_set, eval_set = split_validation(train_set, cfg.val_set_size, cfg.seed)
    if cfg.sample_packing:
        from .packing import pack_dataset

        samples = len(train_set)
        train_set = pack_dataset(train_set, cfg.cutoff_len)
        stats["packing"] = {"samples": samples, "sequences": len(train_set), "capacity": cfg.cutoff_len,
                            "fill": round(sum(len(x) for x in train_set["input_ids"])
                                          / (len(train_set) * cfg.cutoff_len), 4)}
    return train_set, eval_set, stats


def describe_data(stats: dict, train_set: Dataset, eval_set: Dataset | None) -> str:
    s = stats["train"]
    samples = stats["packing"]["samples"] if "packing" in stats else len(train_set)
    text = (f"data: {samples} training samples from {s['source']} "
            f"({s['truncated']} truncated, {s['dropped_no_target']} without target dropped, "
            f"{s['skipped_malformed']} malformed skipped)")
    if len(stats["sources"]) > 1:
        text += "; mixture: " + ", ".join(f"{c['source']} ({c['format']}): {c['samples']} samples of {c['rows']} "
                                          f"rows, {c['tokens']} tokens" for c in stats["sources"])
    if "packing" in stats:
        p = stats["packing"]
        text += f"; packed into {p['sequences']} sequences of up to {p['capacity']} tokens ({p['fill']:.0%} full)"
    return text + (f"; {len(eval_set)} evaluation samples" if eval_set is not None else "; no evaluation set")


# --- display --------------------------------------------------------------------

MASK_OPEN, MASK_CLOSE = "⟦", "⟧"


def render_sample(sample: dict[str, list[int]], tokenizer) -> str:
    """One tokenized sample as text, with loss-free (masked) spans inside ⟦ ⟧."""
    ids, labels = list(sample["input_ids"]), list(sample["labels"])
    spans: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels):
        masked = label == IGNORE_INDEX
        if spans and spans[-1][0] == masked:
            spans[-1][1].append(token)
        else:
            spans.append((masked, [token]))
    body = "".join(
        f"{MASK_OPEN}{tokenizer.decode(tokens)}{MASK_CLOSE}" if masked else tokenizer.decode(tokens)
        for masked, tokens in spans
    )
    n_masked = sum(label == IGNORE_INDEX for label in labels)
    header = f"{len(ids)} tokens: {n_masked} masked {MASK_OPEN}like this{MASK_CLOSE}, {len(ids) - n_masked} trained on"
    return f"{header}\n{body}"
