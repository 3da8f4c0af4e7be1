"""The context a model runs with: by default min(4096, the trained context), the model as trained; only an explicit
longer --ctx scales RoPE with YaRN, and the command says so. Checked through `qwen2 run` against transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devtools.tiny_tokenizer import write_tiny_tokenizer
from tests.test_moe_parity import write_tiny_moe

TRAINED = 256
PROMPT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"
NEW_TOKENS = 40
STOP_TEXTS = ("<|im_end|>", "<|endoftext|>")


def qwen2_run(model_dir: Path, home: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen2cli", "run", str(model_dir), "--raw", PROMPT, "--temperature", "0"]
        + ["--max-tokens", str(NEW_TOKENS), *extra],
        capture_output=True,
        timeout=300,
        env={**os.environ, "QWEN2_HOME": str(home), "NO_COLOR": "1"},
        stdin=subprocess.DEVNULL,
    )


def transformers_greedy(model_dir: Path, model) -> str:
    """transformers' greedy continuation of PROMPT, stopping where qwen2 stops, decoded by HF tokenizers."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stop_ids = [tokenizer.token_to_id(text) for text in STOP_TEXTS]
    ids = tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop_ids, pad_token_id=0
        )
    new = [token for token in out[0, len(ids) :].tolist() if token not in stop_ids]
    return tokenizer.decode(new, skip_special_tokens=False)


@pytest.fixture(scope="module")
def short_moe(tmp_path_factory) -> tuple[Path, str]:
    """A tiny Qwen2-MoE trained for 256 positions, and transformers' greedy text for PROMPT."""
    directory = tmp_path_factory.mktemp("short-moe")
    vocab_size = write_tiny_tokenizer(directory)
    # weights large enough that the text depends on the positions (at transformers' default 0.02 the tiny model
    # repeats one token whatever its RoPE)
    reference = write_tiny_moe(directory, vocab_size=vocab_size, max_position_embeddings=TRAINED, initializer_range=0.3)
    return directory, transformers_greedy(directory, reference)


def test_default_context_runs_the_model_as_trained(short_moe, tmp_path):
    model_dir, expected = short_moe
    done = qwen2_run(model_dir, tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode("utf-8") == expected
    assert b"YaRN" not in done.stderr


def test_explicit_longer_context_scales_rope_and_says_so(short_moe, tmp_path):
    """--ctx 1024 on a model trained for 256: YaRN with factor 4, as transformers computes it for that config."""
    from transformers import Qwen2MoeForCausalLM

    model_dir, unscaled = short_moe
    done = qwen2_run(model_dir, tmp_path, "--ctx", "1024")
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stderr.decode().splitlines()
    assert "context 1024 is beyond the model's trained 256: RoPE scaled with YaRN (factor 4)" in lines
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED, "rope_theta": 10000.0}
    scaled = Qwen2MoeForCausalLM.from_pretrained(
        model_dir, max_position_embeddings=4 * TRAINED, rope_parameters=yarn, dtype=torch.float32
    ).eval()
    assert done.stdout.decode("utf-8") == transformers_greedy(model_dir, scaled)
    assert done.stdout.decode("utf-8") != unscaled  # the fixture's text does depend on the RoPE


def test_context_within_the_trained_one_says_nothing(short_moe, tmp_path):
    model_dir, expected = short_moe
    done = qwen2_run(model_dir, tmp_path, "--ctx", str(TRAINED))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode("utf-8") == expected
    assert b"YaRN" not in done.stderr
