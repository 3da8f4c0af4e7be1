"""Terminal output: answers to stdout, status/progress/stats to stderr; plain when not a TTY or NO_COLOR is set."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

from .errors import OutputClosed


def _plain() -> bool:
    return bool(os.environ.get("NO_COLOR")) or not sys.stderr.isatty()


def status_console() -> Console:
    """A console on stderr for everything that is not the answer."""
    return Console(stderr=True, no_color=_plain(), highlight=False, soft_wrap=True)


def write_answer(text: str) -> None:
    """Answer text to stdout, flushed at once so pipes stream; a closed pipe becomes OutputClosed."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise OutputClosed() from exc


def print_json(data: Any) -> None:
    """One JSON object on stdout."""
    write_answer(json.dumps(data, ensure_ascii=False) + "\n")


def dim(text: str) -> None:
    """A dim status line on stderr."""
    status_console().print(text, style="dim", markup=False)


def warn(text: str) -> None:
    """A warning line on stderr."""
    status_console().print(text, style="yellow", markup=False, highlight=False)


class ProgressBars:
    """Progress bars on stderr for downloads and imports (silent when stderr is not a terminal)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=status_console(),
            transient=True,
            disable=_plain(),
        )
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> ProgressBars:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def update(self, what: str, done: int, total: int) -> None:
        if what not in self._tasks:
            self._tasks[what] = self._progress.add_task(what, total=total or None)
        self._progress.update(self._tasks[what], completed=done, total=total or None)

    def notice(self, text: str) -> None:
        status_console().print(text, style="dim", markup=False, highlight=False)
