"""Standard input as text: UTF-8, with invalid bytes either replaced (and said so once) or refused."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

from .errors import BadInput


class Utf8Input:
    """Decodes input bytes as UTF-8. Invalid bytes become U+FFFD with one warning through `warn`, or, when
    `strict`, a BadInput naming the first one's offset."""

    def __init__(self, *, strict: bool, warn: Callable[[str], None]) -> None:
        self.strict = strict
        self.warn = warn
        self.warned = False
        self.offset = 0  # bytes decoded so far, to say where a bad one is

    def decode(self, data: bytes) -> str:
        """One piece of input (a line, or all of it) as text."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            where = f"byte 0x{data[exc.start]:02x} at offset {self.offset + exc.start}"
            if self.strict:
                raise BadInput(f"standard input is not valid UTF-8 ({where})") from None
            if not self.warned:
                self.warn(f"warning: standard input is not valid UTF-8 ({where}); invalid bytes read as U+FFFD")
                self.warned = True
            text = data.decode("utf-8", errors="replace")
        self.offset += len(data)
        return text

    def read(self, stream: BinaryIO) -> str:
        """All of `stream`."""
        return self.decode(stream.read())

    def lines(self, stream: BinaryIO) -> Iterator[str]:
        """`stream` line by line, without line endings (CRLF too)."""
        for raw in stream:
            yield self.decode(raw).rstrip("\r\n")
