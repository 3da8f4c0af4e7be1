"""The local model store: one Hugging Face-layout directory per model, installed atomically under a lock."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .errors import BadInput, ModelNotFound, Qwen2Error

METADATA = "qwen2cli.json"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")


class StoreFull(Qwen2Error):
    """Not enough free disk space for an install."""


@dataclass(frozen=True)
class StoreEntry:
    name: str
    path: Path
    metadata: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def directory_name(name: str) -> str:
    """The store's directory for a model name ('Qwen/Qwen2.5-7B' -> 'Qwen--Qwen2.5-7B'); refuses odd names."""
    flat = name.replace("/", "--")
    if not _SAFE_NAME.fullmatch(flat) or ".." in flat:
        raise BadInput(f"{name!r} is not a valid model name (letters, digits, . _ : + - and one /)")
    return flat


def entry_path(name: str) -> Path:
    return paths.models_dir() / directory_name(name)


def find(name: str) -> StoreEntry | None:
    """The installed entry called `name`, or None."""
    path = entry_path(name)
    if not (path / "config.json").is_file():
        return None
    meta_path = path / METADATA
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return StoreEntry(name=metadata.get("name", name), path=path, metadata=metadata)


def entries() -> list[StoreEntry]:
    """Every installed model, by name."""
    root = paths.models_dir()
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not (child / "config.json").is_file():
            continue
        meta_path = child / METADATA
        metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        found.append(StoreEntry(name=metadata.get("name", child.name), path=child, metadata=metadata))
    return found


def remove(name: str) -> Path:
    """Delete an installed model; returns where it was."""
    entry = find(name)
    if entry is None:
        raise ModelNotFound(f"{name!r} is not installed (qwen2 list shows what is)")
    with install_lock(name):
        shutil.rmtree(entry.path)
    return entry.path


def check_free_space(needed_bytes: int, *, where: Path | None = None) -> None:
    """Refuse to start an install that cannot fit (with 5% and 100 MB to spare)."""
    where = where or paths.models_dir()
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if needed_bytes * 1.05 + 100 * 2**20 > free:
        raise StoreFull(
            f"not enough disk space in {where}: need {needed_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        )


@contextmanager
def install_lock(name: str) -> Iterator[None]:
    """An exclusive lock per model name, so two qwen2 processes never install the same model at once."""
    locks = paths.models_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{directory_name(name)}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def staging(name: str) -> Iterator[Path]:
    """A temporary directory inside the store; removed unless `commit` moved it into place."""
    root = paths.models_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".staging-{directory_name(name)}-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def commit(name: str, staged: Path, metadata: dict[str, Any]) -> StoreEntry:
    """Write metadata and rename a complete, verified staging directory into place."""
    if not (staged / "config.json").is_file():
        raise Qwen2Error(f"refusing to install {name}: the download has no config.json")
    (staged / METADATA).write_text(json.dumps({"name": name, "installed": time.time(), **metadata}, indent=2))
    target = entry_path(name)
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        target.replace(old)
        staged.replace(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.replace(target)
    found = find(name)
    assert found is not None
    return found
