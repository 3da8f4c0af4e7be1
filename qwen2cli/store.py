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
        """Bytes the entry takes on disk (blocks allocated, a file linked twice counted once)."""
        return disk_usage(self.path)


def disk_usage(path: Path) -> int:
    """Bytes allocated under `path`, like `du`: sparse files as stored, hard links once, symlinks not followed."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for entry in (root, *(os.path.join(root, name) for name in dirs + files)):
            try:
                info = os.lstat(entry)
            except OSError:  # removed while we looked
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


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
    """Every installed model, by name (leftovers of processes that died mid-install are removed first)."""
    root = paths.models_dir()
    if not root.is_dir():
        return []
    remove_stale_staging()
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
    remove_stale_staging()
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
    """An exclusive lock per model name, so two qwen2 processes never install the same model at once. The lock
    file is removed on release (a waiter that then finds its file gone or replaced locks afresh)."""
    lock_path = paths.models_dir() / ".locks" / f"{directory_name(name)}.lock"  # the name is checked first
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # the holder before us removed this file: lock the one there now
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


_STAGING = re.compile(r"\.staging-.+-(\d+)-\d+")  # staging(): name, pid, ns
_REPLACED = re.compile(r"\.old-(.+)-(\d+)")  # commit(): the entry it replaces, moved aside, and the pid


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging() -> list[Path]:
    """Clean up after processes killed mid-install: their staging directories are deleted, and an entry they had
    moved aside to replace is put back if its replacement never arrived (deleted if it did). A live process's
    directories are left alone. Returns the directories deleted."""
    root = paths.models_dir()
    removed = []
    for child in root.iterdir() if root.is_dir() else ():
        staging_match, replaced_match = _STAGING.fullmatch(child.name), _REPLACED.fullmatch(child.name)
        if not child.is_dir() or not (staging_match or replaced_match):
            continue
        if staging_match and not process_alive(int(staging_match.group(1))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        elif replaced_match and not process_alive(int(replaced_match.group(2))):
            entry = root / replaced_match.group(1)
            if entry.exists():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
            else:
                child.rename(entry)
    return removed


@contextmanager
def staging(name: str) -> Iterator[Path]:
    """A temporary directory inside the store, named with our process id; removed unless `commit` moved it into
    place (or, if we are killed, by the next store operation)."""
    root = paths.models_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".staging-{directory_name(name)}-{os.getpid()}-{time.monotonic_ns()}"
    remove_stale_staging()
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
