"""Shared fixtures: tiny random Qwen2 checkpoints written by transformers, and the real-model group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    # Two workers share the two cores: one thread each, and for the commands they start (set before torch loads).
    # Two one-thread jobs at once do 1.4x the work of one two-thread job here; two two-thread jobs thrash.
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402 - after the thread settings above

from devtools.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402 - after the thread settings above

if XDIST_WORKER:
    torch.set_num_threads(1)  # in case torch was loaded before this file

# The slowest files first (seconds of a 2-thread serial run), so that the longest one starts at once on one worker
# while the other works through the rest; files not named keep their order after these.
SLOWEST_FILES = (
    "test_quant_real.py",  # ~490
    "test_real_engine.py",
    "test_gguf_import.py",
    "test_kv_int8.py",  # ~125, ~95, ~90
    "test_quant.py",
    "test_cli_errors.py",
    "test_repl.py",
    "test_tokenizer.py",
)  # 25-60 each


def pytest_configure(config):
    config.addinivalue_line("markers", "real: needs the real Qwen2.5-Coder-0.5B-Instruct model (fetched on first use)")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny untied Qwen2 with 2 KV heads and a tiny tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real model's float32 HF directory; fails (never skips) when it cannot be had."""
    from devtools.real_model import real_hf_dir

    try:
        return real_hf_dir()
    except Exception as exc:  # noqa: BLE001 - any failure to fetch must fail the real group loudly
        pytest.fail(f"the real model could not be had: {exc}")


@pytest.fixture(scope="session")
def real_float_perplexity(real_model_dir) -> float:
    """The float32 real model's perplexity on the documentation text the quantization and int8-cache tests score
    (computed once: both compare against it)."""
    from devtools.corpus import PERPLEXITY_CTX, PERPLEXITY_TEXT_CHARS, documentation_text
    from qwen2cli.generate import load_engine
    from qwen2cli.load_options import LoadOptions
    from qwen2cli.perplexity import perplexity

    engine = load_engine(real_model_dir, LoadOptions(device="cpu", dtype="float32"))
    return perplexity(engine, documentation_text(PERPLEXITY_TEXT_CHARS), ctx=PERPLEXITY_CTX).ppl
