"""Calibration text for GPTQ/AWQ: the default set every CPython install carries, a user's text or JSONL file, and
the token windows taken from it."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import BadInput

if TYPE_CHECKING:  # torch loads only where windows are cut: reading a calibration file needs none
    import torch


# Languages of the multilingual part: Qwen2's most used, in several scripts
CALIBRATION_LANGUAGES = ("zh_CN", "ja", "ko", "de", "fr", "es", "ru", "pt_BR", "it", "ar", "vi")
LOCALE_DIR = Path("/usr/share/locale")


def default_calibration_text() -> str:
    """Real text every CPython install carries, under the Python Software Foundation License (docs/quantization.md):
    the language reference's topics from pydoc_data (English prose with code examples), standard-library
    docstrings (prose) and source (code), and some of that prose as ChatML question/answer turns; then, where
    the system has them, human translations in other languages from its gettext catalogues (`translations`)."""
    import argparse  # noqa: E401
    import collections
    import csv
    import datetime
    import email
    import http.client
    import json as json_module
    import logging
    import pathlib  # noqa: E401
    import subprocess
    import textwrap
    import threading
    import unittest
    import urllib.request

    modules = (
        argparse,
        collections,
        csv,
        datetime,
        email,
        http.client,
        json_module,
        logging,
        pathlib,
        subprocess,
        textwrap,
        threading,
        unittest,
        urllib.request,
    )
    try:
        from pydoc_data.topics import topics

        reference = [text for _, text in sorted(topics.items())]
    except ImportError:  # some distributions package pydoc_data separately
        reference = []
    prose = [inspect.getdoc(m) or "" for m in modules]
    code = [inspect.getsource(m) for m in modules]
    chat = [
        f"<|im_start|>user\nWhat does the Python documentation say about {name.replace('-', ' ')}?<|im_end|>\n"
        f"<|im_start|>assistant\n{text[:3000]}<|im_end|>\n"
        for name, text in (sorted(topics.items())[::3] if reference else [])
    ]
    chat += [f"<|im_start|>user\nExplain this module.<|im_end|>\n<|im_start|>assistant\n{p}<|im_end|>\n" for p in prose]
    return "\n\n".join(reference + prose + code + chat + translations())


def translations(
    languages: tuple[str, ...] = CALIBRATION_LANGUAGES,
    *,
    locale_dir: Path = LOCALE_DIR,
    chars_per_language: int = 12_000,
) -> list[str]:
    """Multilingual prose for calibration: the translated messages (sentences of 30 characters or more) of the
    gettext catalogues under /usr/share/locale, up to `chars_per_language` per language, catalogues in name
    order; each text is under its own package's licence, read where it is installed and never shipped. Empty
    where the system has no catalogues (macOS, Windows, images stripped of locales)."""
    texts = []
    for language in languages:
        kept: dict[str, None] = {}  # insertion-ordered: the same text on every run
        size = 0
        for catalogue in sorted((locale_dir / language / "LC_MESSAGES").glob("*.mo")):
            if size >= chars_per_language:  # enough: the remaining catalogues are not read
                break
            for message in mo_translations(catalogue):
                if len(message) >= 30 and message not in kept and size < chars_per_language:
                    kept[message] = None
                    size += len(message) + 1
        if kept:
            texts.append("\n".join(kept)[:chars_per_language])
    return texts


def mo_translations(path: Path) -> list[str]:
    """The translated strings of a GNU gettext .mo catalogue (plural forms each), header excluded; [] for a file
    that is not one or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    for order in ("little", "big"):
        if len(data) >= 20 and int.from_bytes(data[:4], order) == 0x950412DE:
            break
    else:
        return []

    def word(offset: int) -> int:
        return int.from_bytes(data[offset : offset + 4], order)

    count, originals, translated = word(8), word(12), word(16)
    messages = []
    try:
        for index in range(count):
            if word(originals + 8 * index) == 0:  # the empty msgid: the catalogue's header
                continue
            length, offset = word(translated + 8 * index), word(translated + 8 * index + 4)
            messages += [m for m in data[offset : offset + length].decode("utf-8").split("\x00") if m]
    except (UnicodeDecodeError, IndexError):
        return []
    return messages


class TextEncoder(Protocol):
    """What calibration reads of a tokenizer (ours, or another library's behind the same method)."""

    def encode(self, text: str) -> list[int]: ...


def calibration_batches(tokenizer: TextEncoder, text: str, *, samples: int, seq_len: int) -> torch.Tensor:
    """(samples, seq_len) token ids: windows spread evenly over the whole text (so a mixed text gives a mixed
    set); too little text is a clear error."""
    import torch

    ids = tokenizer.encode(text)
    available = len(ids) // seq_len
    if available < min(samples, 8):
        raise BadInput(
            f"the calibration text is {len(ids)} tokens; at least {min(samples, 8) * seq_len} are needed "
            f"({min(samples, 8)} samples of --seq-len {seq_len})"
        )
    windows = torch.tensor(ids[: available * seq_len], device="cpu").reshape(available, seq_len)
    count = min(samples, available)
    return windows[torch.linspace(0, available - 1, count, device="cpu").round().long()]


def read_calibration(path: Path) -> str:
    """A calibration file: plain text, or JSONL with a "text" field (or chat "messages") per line."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read calibration file {path}: {exc}") from exc
    if not str(path).endswith(".jsonl"):
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            texts.append(
                item["text"]
                if "text" in item
                else "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in item["messages"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInput(f'{path}:{number}: expected a JSON object with "text" or "messages"') from exc
    return "\n\n".join(texts)
