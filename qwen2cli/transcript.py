"""Saved conversations on disk (`/save`, `chat --load`): one JSON shape, shared by local and remote chats."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .chatml import Message
from .errors import BadInput

TRANSCRIPT_VERSION = 1


def write_transcript(
    path: Path,
    *,
    model: str,
    system: str | None,
    ctx: int,
    settings: dict[str, Any],
    messages: Sequence[Message],
    cut: list[bool],
) -> None:
    """Write a conversation, its model and settings as JSON (temporary file, then rename)."""
    data = {
        "version": TRANSCRIPT_VERSION,
        "model": model,
        "system": system,
        "ctx": ctx,
        "settings": settings,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "cut": cut,
    }
    path = Path(path).expanduser()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        temporary.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        raise BadInput(f"cannot save to {path}: {exc.strerror or exc}") from exc


def read_transcript(path: Path) -> dict[str, Any]:
    """A saved transcript, checked for shape; a bad file is a BadInput."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        messages = data["messages"]
        roles = [m["role"] for m in messages]
        if roles != ["user", "assistant"] * (len(roles) // 2) or not all(
            isinstance(m["content"], str) for m in messages
        ):
            raise ValueError("messages must alternate user, assistant")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"cannot load transcript {path}: {exc}") from exc
    return data
