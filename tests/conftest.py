"""Shared fixtures: tiny random Qwen2 checkpoints written by transformers, and the real-model group."""

from __future__ import annotations

import json
import os
from pathlib import Path

XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    # Two workers share the two cores: one thread each, and for the commands they start (set before torch loads).
    # Two one-thread jobs at once do 1.4x the work of one two-thread job here; two two-thread jobs thrash.
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

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


def write_tiny_checkpoint(
    directory: Path,
    *,
    vocab_size: int = 512,
    num_kv_heads: int = 2,
    tie: bool = False,
    rope_scaling: dict | None = None,
    sliding_window: int | None = None,
    max_window_layers: int = 1,
    seed: int = 0,
    with_tokenizer: bool = True,
    max_position_embeddings: int = 2048,
) -> Path:
    """A tiny random Qwen2 checkpoint saved by transformers (the reference), plus a tiny tokenizer."""
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM as HFModel

    torch.manual_seed(seed)
    config = HFConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        if rope_scaling is None
        else {"rope_theta": 10000.0, **rope_scaling},
        tie_word_embeddings=tie,
        use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window,
        max_window_layers=max_window_layers,
        bos_token_id=None,
        eos_token_id=[2],
        rms_norm_eps=1e-6,
    )
    model = HFModel(config).float().eval()
    with torch.no_grad():  # random biases and norms so that every parameter matters
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0, 0.5 if "norm" in name else 0.1).add_(1.0 if "norm" in name else 0.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if with_tokenizer:
        from tests.tiny_tokenizer import write_tiny_tokenizer

        size = write_tiny_tokenizer(directory)
        assert size <= vocab_size
        eos = json.loads((directory / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in eos["added_tokens"]}
        generation = {
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "repetition_penalty": 1.05,
        }
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny untied Qwen2 with 2 KV heads and a tiny tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real model's float32 HF directory; fails (never skips) when it cannot be had."""
    from tests.real_model import real_hf_dir

    try:
        return real_hf_dir()
    except Exception as exc:  # noqa: BLE001 - any failure to fetch must fail the real group loudly
        pytest.fail(f"the real model could not be had: {exc}")


@pytest.fixture(scope="session")
def real_float_perplexity(real_model_dir) -> float:
    """The float32 real model's perplexity on the documentation text the quantization and int8-cache tests score
    (computed once: both compare against it)."""
    from qwen2cli.generate import load_engine
    from qwen2cli.perplexity import perplexity
    from tests.corpus import PERPLEXITY_CTX, PERPLEXITY_TEXT_CHARS, documentation_text

    engine = load_engine(real_model_dir, device="cpu", dtype="float32")
    return perplexity(engine, documentation_text(PERPLEXITY_TEXT_CHARS), ctx=PERPLEXITY_CTX).ppl
