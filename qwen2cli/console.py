"""Terminal output: answers to stdout, status/progress/stats to stderr; plain when not a TTY or NO_COLOR is set."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from .errors import OutputClosed
from .progress import Step


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


class _AmountColumn(ProgressColumn):
    """Bytes as a download shows them; anything else as done/total and its unit."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "bytes")
        if unit == "bytes":
            return self._bytes.render(task)
        if task.total is None:  # a step that cannot tell how far it is: the bar pulses
            return Text(f"{int(task.completed)} {unit}" if task.completed else "", style="progress.download")
        return Text(f"{int(task.completed)}/{int(task.total)} {unit}", style="progress.download")


class _RateColumn(ProgressColumn):
    """Transfer speed for bytes; units per second, or seconds per unit when slower than one a second."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "bytes")
        if unit == "bytes":
            return self._bytes.render(task)
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("", style="progress.data.speed")
        shown = f"{speed:.1f} {unit}/s" if speed >= 1 else f"{1 / speed:.1f} s each"
        return Text(shown, style="progress.data.speed")


class ProgressBars:
    """Progress bars on stderr, one per step (downloads, imports, loading, calibrating, quantizing, saving), each in
    its step's unit with an ETA; nothing is drawn when stderr is not a terminal."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            _AmountColumn(),
            _RateColumn(),
            TimeRemainingColumn(),
            console=status_console(),
            transient=True,
            disable=not sys.stderr.isatty(),
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressBars:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def update(self, what: str | Step, done: int, total: int) -> None:
        """A progress report (the library's Progress callback): `what` a Step, or a plain name counting bytes."""
        name, unit = (what.name, what.unit) if isinstance(what, Step) else (what, "bytes")
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=total or None, unit=unit)
            self._progress.refresh()  # every step is drawn at least once, however quickly it ends
        self._progress.update(self._tasks[name], completed=done, total=total or None)

    def notice(self, text: str) -> None:
        status_console().print(text, style="dim", markup=False, highlight=False)
