"""Progress reports from library code: which step, how far, in which unit. The console draws them (console.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """A step a progress report counts: its name as the user sees it, and the unit it counts in."""

    name: str
    unit: str = "bytes"  # or what a step counts: "layers", "tensors", "samples", "files"

    def __str__(self) -> str:
        return self.name


Progress = Callable[[str | Step, int, int], None]  # (step, done, total); a plain str step counts bytes
