"""Files and folders that appear whole or not at all.

A reader (another rank, a resumed run, a person) never sees half a file:
everything is written under a private name in the same folder and renamed
into place, which POSIX makes atomic. ``durable`` adds the fsyncs that make
the rename survive a power loss as well as a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def _private_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """Replace ``path`` with ``text`` in one step."""
    path = Path(path)
    tmp = _private_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
    return path


def write_json(path: str | Path, data, *, durable: bool = False, indent: int | None = 2, default=None) -> Path:
    return write_text(path, json.dumps(data, indent=indent, default=default) + "\n", durable=durable)


def fsync_dir(path: str | Path) -> None:
    """Make renames in ``path`` survive a power loss (where the platform allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_dir(target: str | Path, *, on_exists: str = "replace") -> Iterator[Path]:
    """Build a folder privately; when the block succeeds, put it in place as ``target``.

    ``on_exists`` says what happens when ``target`` exists by then:
    ``"replace"`` it; ``"keep"`` it (another process built the same thing
    first: ours is dropped); ``"merge"``: move our files into it one by one,
    each replacing its namesake (other files there stay). A failed block
    leaves nothing behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _private_name(target)
    tmp.mkdir()
    try:
        yield tmp
        if on_exists == "merge" and target.is_dir():
            for item in tmp.iterdir():
                os.replace(item, target / item.name)
        elif on_exists == "replace" and target.exists():
            old = _private_name(target)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                if on_exists != "keep" or not target.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
