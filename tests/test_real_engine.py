"""The real Qwen2.5-Coder-0.5B-Instruct: our greedy text and logits against transformers'."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qwen2cli.load_options import LoadOptions

pytestmark = pytest.mark.real

LONG_PROMPT = "".join(f"Line {i}: the value of item {i} is {i * 7 % 13}.\n" for i in range(90)) + "Summary:"
PROMPTS = {
    "english": "The three most important rules of writing clear prose are",
    "chinese": "请用一句话介绍长城：",
    "code": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "sql": "-- list the ten customers with the largest total order value\nSELECT",
    "mixed": "Translate to French: 'The cat sleeps on the warm windowsill.' ->",
    "long": LONG_PROMPT,
}


@pytest.fixture(scope="module")
def reference(real_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(real_model_dir)


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_greedy_48_tokens_match_transformers(real_model_dir, reference, name):
    model, tokenizer = reference
    prompt = PROMPTS[name]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if name == "long":
        assert ids.shape[1] >= 1000
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=48, do_sample=False, eos_token_id=[151643, 151645], pad_token_id=151643
        )[0, ids.shape[1] :]
    expected = tokenizer.decode([t for t in out.tolist() if t not in (151643, 151645)])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen2cli",
            "run",
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            "48",
            "--dtype",
            "float32",
            str(real_model_dir),
            "--",
            prompt,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


def test_last_position_logits_within_1e_3(real_model_dir, reference):
    from qwen2cli.checkpoint import load_model
    from qwen2cli.kv_cache import KVCache

    model, tokenizer = reference
    ids = tokenizer(PROMPTS["code"] + PROMPTS["chinese"], return_tensors="pt").input_ids
    ours = load_model(real_model_dir, LoadOptions(device="cpu", dtype="float32"))
    with torch.inference_mode():
        expected = model(ids).logits[0, -1]
        got = ours.model(ids, KVCache(ours.config, ids.shape[1] + 1), 0, last_only=True)[0, -1]
    assert (got - expected).abs().max().item() < 1e-3


def test_padding_rows_are_never_sampled(real_model_dir):
    """The checkpoint has 151936 logit rows but the tokenizer only makes 151665 ids: rows past that must never win,
    even when their logits are the largest."""
    from qwen2cli.generate import generate, load_engine
    from qwen2cli.kv_cache import KVCache
    from qwen2cli.sampling import SamplingParams

    engine = load_engine(real_model_dir, LoadOptions(device="cpu", dtype="float32"))
    assert engine.sampleable_vocab == 151665 < engine.config.vocab_size
    head = engine.loaded.model.lm_head.weight
    prompt = engine.tokenizer.encode("def add(a, b):")
    with torch.no_grad():  # point every padding row along the prompt's last hidden state, scaled far past any real row
        head[151665:] = head[prompt[-1]] * 1000
    for params in (
        SamplingParams(temperature=0, max_tokens=6),
        SamplingParams(temperature=2.0, top_k=0, top_p=1.0, max_tokens=6, seed=3),
    ):
        *_, last = generate(engine, prompt, params=params, cache=KVCache(engine.config, 64))
        assert last.stats is not None and last.stats.generated_ids and max(last.stats.generated_ids) < 151665
