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
from datasets import Dataset, DatasetDict, load_from_disk

from . import atomic
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


# --- reading rows -------------------------------------------------------------

FORMATS = ("llm_adapters", "alpaca", "hf_disk")
_REQUIRED = {"llm_adapters": ("instruction", "input", "output", "answer"), "alpaca": ("instruction", "output")}
_OPTIONAL = {"llm_adapters": (), "alpaca": ("input", "answer")}


@dataclass
class Rows:
    """Rows normalised to instruction/input/output/answer, plus what was skipped."""

    rows: list[dict[str, str]]
    source: Path
    format: str
    skipped: int = 0
    skipped_rows: list[int] = field(default_factory=list)


def _read_raw(path: Path) -> list[Any]:
    """JSON list or JSONL lines; an unparsable JSONL line is kept as an error marker."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON list of rows or JSONL, found a single JSON object")
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            rows.append(_Unparsable(str(err)))
    if rows and all(isinstance(row, _Unparsable) for row in rows):
        raise DataError(f"{path}: neither a JSON list nor JSON lines ({rows[0].reason})")
    return rows


@dataclass
class _Unparsable:
    reason: str


def detect_format(path: str | Path) -> str:
    """hf_disk for a folder; llm_adapters when rows carry an `answer`; otherwise alpaca."""
    path = Path(path)
    if path.is_dir():
        return "hf_disk"
    raw = _read_raw(path)
    first = next((row for row in raw if isinstance(row, dict)), {})
    return "llm_adapters" if "answer" in first else "alpaca"


def _row_problem(row: Any, schema: str) -> str | None:
    if isinstance(row, _Unparsable):
        return f"not valid JSON ({row.reason})"
    if not isinstance(row, dict):
        return f"expected an object, found {type(row).__name__}"
    for key in _REQUIRED[schema]:
        if key not in row:
            return f"missing key {key!r}"
    for key in _REQUIRED[schema] + _OPTIONAL[schema]:
        if key in row and not isinstance(row[key], str):
            return f"key {key!r} is {type(row[key]).__name__}, expected a string"
    return None


def read_rows(path: str | Path | None = None, data_format: str = "auto", *, skip_malformed: bool = False) -> Rows:
    """Read and check every row; a malformed one raises DataError unless skipped (and counted)."""
    path = Path(path) if path is not None else EMBEDDED_TRAIN
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    fmt = detect_format(path) if data_format == "auto" else data_format
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; known: auto, {', '.join(FORMATS)}")

    if fmt == "hf_disk":
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path}: a DatasetDict without a 'train' split ({', '.join(loaded)})")
            loaded = loaded["train"]
        raw = loaded.to_list()
        schema = "llm_adapters" if "answer" in loaded.column_names else "alpaca"
    else:
        raw = _read_raw(path)
        schema = fmt

    rows, skipped = [], []
    for index, row in enumerate(raw):
        problem = _row_problem(row, schema)
        if problem is not None:
            if not skip_malformed:
                raise DataError(f"{path}: row {index}: {problem} (set skip_malformed_rows to skip such rows)")
            skipped.append(index)
            continue
        rows.append({key: row.get(key, "") for key in ("instruction", "input", "output", "answer")})
    if not rows:
        raise DataError(f"{path}: no usable rows ({len(skipped)} malformed)")
    return Rows(rows=rows, source=path, format=fmt, skipped=len(skipped), skipped_rows=skipped)


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
    tmpl = get_template(template)
    prompts = [tmpl.render(row["instruction"], row["input"]) for row in rows]
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
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        if len(ids) > cutoff_len:
            stats["truncated"] += 1
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(label == IGNORE_INDEX for label in labels):
            stats["dropped_no_target"] += 1
            continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["source_row"].append(i)
    return out, stats


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
) -> TokenizedData:
    """Tokenize a data file once and keep the result; later calls load it from disk.

    The cache key covers everything the ids depend on: the data, the tokenizer,
    the template, cutoff_len and this module's CACHE_VERSION. Writing goes to a
    private folder renamed into place, so concurrent ranks never see half a cache.
    """
    path = Path(data_path) if data_path is not None else EMBEDDED_TRAIN
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    fmt = detect_format(path) if data_format == "auto" else data_format
    key_parts = {
        "version": CACHE_VERSION,
        "source": _source_fingerprint(path),
        "format": fmt,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": asdict(get_template(template)),
        "cutoff_len": cutoff_len,
        "skip_malformed": skip_malformed,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cache_root) if cache_root is not None else cache_dir() / "tokenized"
    target = root / f"{path.stem}-{key}"
    meta_file = target / "reflora_meta.json"

    if meta_file.is_file():
        return TokenizedData(load_from_disk(str(target)), target, True, json.loads(meta_file.read_text()))

    rows = read_rows(path, fmt, skip_malformed=skip_malformed)
    columns, stats = tokenize_rows(rows.rows, tokenizer, template=template, cutoff_len=cutoff_len)
    stats.update(source=str(path), format=fmt, skipped_malformed=rows.skipped, samples=len(columns["input_ids"]))
    dataset = Dataset.from_dict(columns)

    # Concurrent ranks may tokenize at once: the first to finish puts its (identical) result in place.
    with atomic.staged_dir(target, on_exists="keep") as tmp:
        dataset.save_to_disk(str(tmp))
        (tmp / "reflora_meta.json").write_text(json.dumps(stats, indent=2))
    return TokenizedData(load_from_disk(str(target)), target, False, stats)


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
    """Right-pads input_ids with pad_token_id, labels with IGNORE_INDEX, and builds the mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(sample["input_ids"]) for sample in samples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = torch.as_tensor(sample["input_ids"])
            labels[row, :n] = torch.as_tensor(sample["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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


def epoch_shard(dataset: Dataset, seed: int, epoch: int, rank: int, world: int) -> Dataset:
    """This rank's rows of epoch ``epoch``, in order.

    Epoch e visits the training set in the order ``shuffle(seed + e)``; rank r
    takes rows r, r + W, ... of it, and optimizer step s consumes the
    contiguous block s of ``micro_batch_size × accumulation × W`` rows (see
    step_batches). Rows that do not fill a last global batch are left out of
    that epoch.
    """
    return shard_for_rank(shuffle(dataset, seed + epoch), rank, world)


def step_batches(shard: Dataset, step_in_epoch: int, micro_batch_size: int, accumulation: int,
                 collate: PadCollator) -> list[dict]:
    """This rank's micro-batches for optimizer step ``step_in_epoch`` of the epoch (contiguous rows)."""
    first = step_in_epoch * accumulation * micro_batch_size
    columns = shard[first:first + accumulation * micro_batch_size]
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(columns["input_ids"], columns["labels"])]
    return [collate(rows[j * micro_batch_size:(j + 1) * micro_batch_size]) for j in range(accumulation)]


def target_count(labels: torch.Tensor) -> int:
    """Tokens the loss is computed on: labels after the causal shift, minus the masked ones."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# --- a run's data -------------------------------------------------------------------


def tokenize_datasets(cfg, tokenizer) -> tuple[Dataset, Dataset | None, dict]:
    """(train, eval or None, stats) of a run configuration: tokenized (cached), and its evaluation set.

    The evaluation set is eval_data_path if given, else val_set_size rows held
    out of the training data, else none.
    """
    options = dict(template=cfg.prompt_template, cutoff_len=cfg.cutoff_len, skip_malformed=cfg.skip_malformed_rows)
    train_data = preprocess(cfg.data_path, tokenizer, data_format=cfg.data_format, **options)
    train_set, eval_set = train_data.dataset, None
    # The cache folders' names carry the key of everything the samples depend on: the run's data identity.
    stats = {"train": train_data.stats, "cache": str(train_data.path), "fingerprint": train_data.path.name}
    if cfg.eval_data_path is not None:
        eval_data = preprocess(cfg.eval_data_path, tokenizer, **options)
        eval_set, stats["eval"] = eval_data.dataset, eval_data.stats
        stats["fingerprint"] += f" + {eval_data.path.name}"
    elif cfg.val_set_size:
        train_set, eval_set = split_validation(train_set, cfg.val_set_size, cfg.seed)
    return train_set, eval_set, stats


def describe_data(stats: dict, train_set: Dataset, eval_set: Dataset | None) -> str:
    s = stats["train"]
    text = (f"data: {len(train_set)} training samples from {s['source']} "
            f"({s['truncated']} truncated, {s['dropped_no_target']} without target dropped, "
            f"{s['skipped_malformed']} malformed skipped)")
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
