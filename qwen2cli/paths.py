"""Where things live: QWEN2_HOME, else the platform's data directory. The only module with path defaults."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Root of qwen2cli's data: the model store, history, locks."""
    configured = os.environ.get("QWEN2_HOME")
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("qwen2cli", appauthor=False))


def models_dir() -> Path:
    """The model store: one directory per installed model."""
    return home() / "models"


def history_file() -> Path:
    """The REPL's persistent input history."""
    return home() / "history"


def prompt_cache_dir() -> Path:
    """Keys and values of chat-template openings (prompt_cache.py), beside the tokenizer tables' cache."""
    return home() / "cache" / "prompts"


def kernel_cache_dir() -> Path:
    """Native kernels compiled at first use (quant/native.py), one file per source version."""
    return home() / "cache" / "kernels"
