"""The exception hierarchy, and the one place that turns an exception into a one-line message."""

from __future__ import annotations

import os
import sys
import traceback


class Qwen2Error(Exception):
    """A user-facing error: its message is printed as one line and the process exits with `exit_code`."""

    exit_code = 1


class ModelNotFound(Qwen2Error):
    """A model name, directory or file that does not exist."""


class BadCheckpoint(Qwen2Error):
    """A checkpoint that exists but cannot be used: wrong architecture, corrupt or missing files."""


class BadInput(Qwen2Error):
    """An option value, prompt or file the user gave that cannot be used."""


class ContextOverflow(BadInput):
    """A prompt or message longer than the context window."""


class DownloadError(Qwen2Error):
    """A transfer or verification failure while fetching a model."""


class OutputClosed(Exception):
    """The reader of our stdout went away (`| head`): stop quietly with success."""


class MissingDependency(Qwen2Error):
    """An optional package that this feature needs is not installed."""


def one_line(exc: BaseException) -> str:
    """Render an exception as the single line a user sees."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, Qwen2Error) else f"{type(exc).__name__}: {text}"


def report(exc: BaseException) -> int:
    """Print `exc` as one line on stderr (the traceback too when QWEN2_DEBUG=1) and return the exit code."""
    if os.environ.get("QWEN2_DEBUG") == "1":
        traceback.print_exception(exc)
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    print(f"error: {one_line(exc)}", file=sys.stderr)
    return exc.exit_code if isinstance(exc, Qwen2Error) else 1
