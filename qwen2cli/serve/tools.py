"""Qwen2.5 tool calls (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) split out of generated text as
it streams, and stop strings held back so that they are never emitted."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from .constrain import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


@dataclass(frozen=True)
class Piece:
    """A stretch of answer text, or one complete tool call in the OpenAI shape."""

    text: str = ""
    call: dict[str, Any] | None = None
    logprobs: tuple[dict[str, Any], ...] = ()  # OpenAI logprobs entries of the tokens behind this piece


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could begin one of `markers`."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


def parse_call(body: str) -> dict[str, Any] | None:
    """One call's JSON as an OpenAI tool call with a fresh id; None when it is not a well-formed call."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", {})
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


class ToolCallSplitter:
    """Feed text as it is generated; get back answer text and each tool call as soon as its closing tag arrives."""

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False
        self.calls = 0

    def push(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while True:
            if self._inside:
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return pieces
                body, self._buffer = self._buffer[:end], self._buffer[end + len(TOOL_CALL_CLOSE) :]
                self._inside = False
                call = parse_call(body)
                if call is None:
                    pieces.append(Piece(text=TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE))
                else:
                    self.calls += 1
                    pieces.append(Piece(call=call))
                continue
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = _held_back(self._buffer, (TOOL_CALL_OPEN,))
                ready, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
                pieces.extend(self._text(ready))
                return pieces
            pieces.extend(self._text(self._buffer[:start]))
            self._buffer = self._buffer[start + len(TOOL_CALL_OPEN) :]
            self._inside = True

    def _text(self, text: str) -> list[Piece]:
        if not text or (self.calls and not text.strip()):  # the newlines between calls are not answer text
            return []
        return [Piece(text=text)]

    def finish(self) -> list[Piece]:
        """What is left at the end: an unclosed call stays text."""
        rest = (TOOL_CALL_OPEN if self._inside else "") + self._buffer
        self._buffer, self._inside = "", False
        return self._text(rest)


class StopStrings:
    """Cuts the answer at the first stop string; text that might begin one is held back until it is decided."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The text that is now safe to emit; sets `stopped` when a stop string has appeared."""
        if self.stopped:
            return ""
        self._buffer += text
        found = [i for i in (self._buffer.find(s) for s in self._stops) if i >= 0]
        if found:
            self.stopped = True
            ready, self._buffer = self._buffer[: min(found)], ""
            return ready
        keep = _held_back(self._buffer, self._stops)
        ready, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
        return ready

    def finish(self) -> str:
        rest, self._buffer = self._buffer, ""
        return "" if self.stopped else rest
