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
