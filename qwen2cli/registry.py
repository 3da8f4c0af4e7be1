"""Resolve what the user typed as MODEL into a local checkpoint directory."""
from __future__ import annotations

from pathlib import Path

from .errors import ModelNotFound


def resolve_model(name: str | None) -> Path:
    """A local directory for MODEL: for now, a checkpoint directory path."""
    if name is None:
        raise ModelNotFound("no MODEL given")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise ModelNotFound(f"no such model directory: {name}")
