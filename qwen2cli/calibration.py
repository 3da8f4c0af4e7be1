"""Calibration text for GPTQ/AWQ: the default set every CPython install carries, a user's text or JSONL file, and
the token windows taken from it."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from .errors import BadInput
from .generate import Engine


def default_calibration_text() -> str:
    """Real text every CPython install carries, under the Python Software Foundation License (see README):
    the language reference's topics from pydoc_data (English prose with code examples), standard-library
    docstrings (prose) and source (code), and some of that prose as ChatML question/answer turns."""
    import argparse, collections, csv, datetime, email, http.client, json as json_module, logging  # noqa: E401
    import pathlib, subprocess, textwrap, threading, unittest, urllib.request  # noqa: E401

    modules = (argparse, collections, csv, datetime, email, http.client, json_module, logging, pathlib, subprocess,
               textwrap, threading, unittest, urllib.request)
    try:
        from pydoc_data.topics import topics
        reference = [text for _, text in sorted(topics.items())]
    except ImportError:  # some distributions package pydoc_data separately
        reference = []
    prose = [inspect.getdoc(m) or "" for m in modules]
    code = [inspect.getsource(m) for m in modules]
    chat = [f"<|im_start|>user\nWhat does the Python documentation say about {name.replace('-', ' ')}?<|im_end|>\n"
            f"<|im_start|>assistant\n{text[:3000]}<|im_end|>\n"
            for name, text in (sorted(topics.items())[::3] if reference else [])]
    chat += [f"<|im_start|>user\nExplain this module.<|im_end|>\n<|im_start|>assistant\n{p}<|im_end|>\n"
             for p in prose]
    return "\n\n".join(reference + prose + code + chat)


def calibration_batches(engine: Engine, text: str, *, samples: int, seq_len: int) -> torch.Tensor:
    """(samples, seq_len) token ids: windows spread evenly over the whole text (so a mixed text gives a mixed
    set); too little text is a clear error."""
    ids = engine.tokenizer.encode(text)
    available = len(ids) // seq_len
    if available < min(samples, 8):
        raise BadInput(f"the calibration text is {len(ids)} tokens; at least {min(samples, 8) * seq_len} are needed "
                       f"({min(samples, 8)} samples of --seq-len {seq_len})")
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
            texts.append(item["text"] if "text" in item else
                         "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in item["messages"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"{path}:{number}: expected a JSON object with \"text\" or \"messages\"") from exc
    return "\n\n".join(texts)
