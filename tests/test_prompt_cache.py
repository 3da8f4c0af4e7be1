"""The chat template's opening cached on disk: the same answer with and without the file, logits equal to a plain
prefill of the whole prompt, a damaged or foreign file ignored, other models and dtypes kept apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from qwen2cli.generate import load_engine, prefill
from qwen2cli.load_options import LoadOptions
from qwen2cli.prompt_cache import fill_opening, shared_prefix_length
from qwen2cli.runner import prompt_ids


def test_shared_prefix_length():
    assert shared_prefix_length([1, 2, 3, 4], [1, 2, 9], [1, 2, 3]) == 2
    assert shared_prefix_length([1, 2], [1, 2, 3]) == 2
    assert shared_prefix_length([5, 2], [1, 2]) == 0


def _opening(engine, text):
    ids = prompt_ids(engine, text, raw=False, system=None)
    others = [prompt_ids(engine, other, raw=False, system=None) for other in ("a", "b")]
    return ids, shared_prefix_length(ids, *others)


def test_opening_from_disk_gives_the_logits_of_a_full_prefill(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2_HOME", str(tmp_path))
    engine = load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32"))
    ids, shared = _opening(engine, "tell me about tokenizers")
    assert 0 < shared < len(ids) and ids[shared - 1] != ids[shared]
    full = engine.new_cache(256)
    expected = prefill(engine, full, ids)
    files = tmp_path / "cache" / "prompts"
    results = []
    for attempt in ("computed", "read back"):
        cache = engine.new_cache(256)
        fill_opening(engine, cache, ids[:shared])
        assert cache.pos == shared and len(list(files.glob("*.safetensors"))) == 1, attempt
        torch.testing.assert_close(cache.keys[1][:, :, :shared], full.keys[1][:, :, :shared], atol=1e-5, rtol=1e-5)
        results.append(prefill(engine, cache, ids[shared:]))
    torch.testing.assert_close(results[0], expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(results[0], results[1])  # from disk or computed: the same numbers
    # a damaged file is recomputed (and rewritten), never trusted
    (path,) = files.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    cache = engine.new_cache(256)
    fill_opening(engine, cache, ids[:shared])
    assert torch.equal(prefill(engine, cache, ids[shared:]), results[0])
    # another dtype, and each --load-in quantization, is another file
    for options in (
        LoadOptions(device="cpu", dtype="bfloat16"),
        LoadOptions(device="cpu", load_in="8bit"),
        LoadOptions(device="cpu", load_in="4bit"),
    ):
        other = load_engine(tiny_model, options)
        fill_opening(other, other.new_cache(256), ids[:shared])
    assert len(list(files.glob("*.safetensors"))) == 4


def test_run_answers_the_same_with_and_without_the_file(tiny_model, tmp_path):
    env = {**os.environ, "QWEN2_HOME": str(tmp_path)}
    command = [
        sys.executable,
        "-m",
        "qwen2cli",
        "run",
        str(tiny_model),
        "what is a tokenizer?",
        "--json",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
    ]
    answers = []
    for _ in range(2):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        answers.append(json.loads(done.stdout)["text"])
    assert len(list((tmp_path / "cache" / "prompts").glob("*.safetensors"))) == 1
    assert answers[0] == answers[1]
