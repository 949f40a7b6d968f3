"""Where rows come from: a JSON/JSONL, Parquet, CSV or Arrow file, a folder of them, a ``save_to_disk``
folder, or a dataset id on the Hugging Face hub.

JSON and JSONL are read here, line by line, so that a malformed row is named
by its number (and can be skipped); the other file types and hub ids go
through ``datasets.load_dataset``. Everything comes back as a list of raw rows
for data.py to check and normalise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class SourceError(ValueError):
    """A source that cannot be read (data.py turns it into a DataError)."""


@dataclass
class Unparsable:
    """A JSONL line that is not JSON, kept in place so that its row number stays right."""

    reason: str


def read_json_rows(path: Path) -> list[Any]:
    """A JSON list, or JSON lines; an unparsable line is kept as an Unparsable marker."""
    text = path.read_text(encoding="utf-8")
    try:  # a .jsonl file of one line is one row, not a JSON document
        data = None if path.suffix.lower() == ".jsonl" else json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON list of rows or JSONL, found a single JSON object")
    rows: list[Any] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            rows.append(Unparsable(str(err)))
    if rows and all(isinstance(row, Unparsable) for row in rows):
        raise SourceError(f"{path}: neither a JSON list nor JSON lines ({rows[0].reason})")
    return rows


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def looks_like_path(value: str) -> bool:
    """A local path by its spelling (a hub id is never one): a leading /, ./, ../ or ~, or a data-file suffix."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).suffix in BUILDERS


# The switches that keep the Hugging Face libraries off the network.
MODEL_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DATASETS_OFFLINE = MODEL_OFFLINE + ("HF_DATASETS_OFFLINE",)


def hub_offline(switches: tuple[str, ...] = DATASETS_OFFLINE) -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in switches)


def read_raw(source: str | Path, split: str = "train") -> list[Any]:
    """The raw rows of a file, a folder or a hub dataset (``split`` picks the split where there are several)."""
    path = Path(source).expanduser()
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower(), "json")
        return read_json_rows(path) if builder == "json" else _load(builder, data_files=str(path))
    if is_saved_dataset(path):
        return _saved_rows(path, split)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
        kinds = {BUILDERS[p.suffix.lower()] for p in files}
        if not files:
            raise SourceError(f"{source}: a folder with no data files ({', '.join(BUILDERS)}) and no saved dataset")
        if len(kinds) > 1:
            raise SourceError(f"{source}: a folder mixing {', '.join(sorted(kinds))} files; keep one kind per folder "
                              "or list the files as separate datasets")
        (builder,) = kinds
        if builder == "json":
            return [row for p in files for row in read_json_rows(p)]
        return _load(builder, data_files=[str(p) for p in files])
    return _hub_rows(str(source), split)


def _saved_rows(path: Path, split: str) -> list[Any]:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise SourceError(f"{path}: a DatasetDict without a {split!r} split ({', '.join(loaded)}); "
                              "set the dataset's split")
        loaded = loaded[split]
    return loaded.to_list()


def _load(builder: str, **kwargs) -> list[Any]:
    from datasets import load_dataset

    try:
        return load_dataset(builder, split="train", **kwargs).to_list()
    except Exception as err:  # a file the builder cannot parse: one line naming it
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SourceError(f"{kwargs.get('data_files')}: not readable as {builder} ({first})") from None


def _hub_rows(repo_id: str, split: str) -> list[Any]:
    from datasets import load_dataset

    if looks_like_path(repo_id):
        raise SourceError(f"no such file or directory: {repo_id}")
    if hub_offline():
        raise SourceError(f"{repo_id} is not a file or folder on this machine, and the hub is offline "
                          "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); give a local path")
    try:
        return load_dataset(repo_id, split=split).to_list()
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SourceError(f"{repo_id} is not a file or folder on this machine and could not be loaded from the "
                          f"hub ({first}); give a local path, or check the id and the network") from None
