"""Where a command writes a model directory the user named (`quantize --out DIR`): checked before any work, written
into a fresh sibling directory and renamed into place, so nothing the user had there is lost."""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInput


def _is_checkpoint(path: Path) -> bool:
    """A model directory as this program writes them: config.json and plain files only, no subdirectories."""
    children = list(path.iterdir())
    return (path / "config.json").is_file() and all(child.is_file() for child in children)


def check_output_dir(out: str | Path, *, replace: bool, source: Path | None = None) -> Path:
    """The absolute directory to write, refused (BadInput) when writing it could lose something: a file in its
    place, the model being read (`source`), or a non-empty directory, unless `replace` and it is a checkpoint.
    What a killed earlier writer left beside it is cleaned up first (_recover)."""
    target = Path(out).expanduser().resolve()
    if target.parent == target:
        raise BadInput(f"cannot write a model to {target}: choose a new directory")
    _recover(target)
    if Path.cwd().resolve().is_relative_to(target):
        raise BadInput(f"--out {out} is the current directory or holds it: choose a new directory")
    if source is not None and target == Path(source).expanduser().resolve():
        raise BadInput(f"--out {out} is the model being read: choose a new directory")
    if target.exists() and not target.is_dir():
        raise BadInput(f"--out {out} is a file, not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not replace:
            raise BadInput(
                f"--out {out} ({target}) is not empty: choose a new directory, or --force to replace a model there"
            )
        if not _is_checkpoint(target):
            raise BadInput(
                f"--out {out} ({target}) holds more than a model (subdirectories or no config.json): "
                "it is not replaced even with --force; choose a new directory"
            )
    parent = target.parent
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write in {parent}: permission denied")
    return target


def _recover(target: Path) -> None:
    """Undo what a killed writer of `target` left beside it: its unfinished directory is deleted; the model it had
    moved aside is put back when nothing took its place (deleted when the new one did)."""
    from .store import process_alive

    for sibling in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        kind, _, pid = sibling.name[len(target.name) + 2 :].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or process_alive(int(pid)) or not sibling.is_dir():
            continue
        if kind == "old" and not target.exists():
            sibling.rename(target)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


@contextmanager
def written_in_place(out: str | Path, *, replace: bool) -> Iterator[Path]:
    """A fresh sibling directory to fill; when the block ends it becomes `out` (an old model there is moved aside
    and deleted only after the new one is in place). On an error the sibling is removed and `out` is untouched."""
    target = check_output_dir(out, replace=replace)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # our own pid's leftover: no live process owns it
    staging.mkdir()
    try:
        yield staging
        check_output_dir(target, replace=replace)  # again: the directory may have changed while we worked
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            target.rename(old)
        try:
            staging.rename(target)
        except OSError:
            if old.exists():
                old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
