"""The int8 KV cache: half the bytes, and on the real model the same greedy text and nearly the same perplexity."""

from __future__ import annotations

import pytest
import torch

from devtools.corpus import PERPLEXITY_CTX, PERPLEXITY_TEXT_CHARS, documentation_text
from qwen2cli.generate import generate, load_engine
from qwen2cli.kv_cache import Int8KVCache, KVCache
from qwen2cli.load_options import LoadOptions
from qwen2cli.perplexity import perplexity
from qwen2cli.sampling import SamplingParams


def test_int8_cache_halves_a_bfloat16_cache(tiny_model):
    engine = load_engine(tiny_model, LoadOptions(device="cpu", dtype="bfloat16"))
    full = KVCache(engine.config, 256, dtype=torch.bfloat16)
    small = Int8KVCache(engine.config, 256, dtype=torch.bfloat16)
    assert small.bytes_per_token() < 0.6 * full.bytes_per_token()


@pytest.mark.real
def test_real_greedy_and_perplexity_match_the_float_cache(real_model_dir, real_float_perplexity):
    # in float32, greedy text and perplexity: the float cache is then exact, and what differs is the int8 cache's
    # rounding alone (in bfloat16 both caches round, and which near-tie flips over 32 tokens follows every other
    # rounding too: 5 of 6 with torch's attention for prompts, 3 of 6 with quant/attention.c's float32 one, whose
    # logits are the closer to float32's)
    greedy = {
        kind: load_engine(real_model_dir, LoadOptions(device="cpu", dtype="float32", kv_cache=kind))
        for kind in ("float", "int8")
    }
    prompts = [
        "def fibonacci(n):",
        "The three laws of thermodynamics are",
        "SELECT name FROM users WHERE",
        "请解释什么是递归。",
        "Once upon a time, in a small village,",
        "import numpy as np\n\narr = np.",
    ]
    params = SamplingParams(temperature=0, max_tokens=32, repeat_penalty=1.0)
    same = 0
    for prompt in prompts:
        texts = []
        for engine in greedy.values():
            ids = engine.tokenizer.encode(prompt)
            texts.append("".join(c.text for c in generate(engine, ids, params=params, cache=engine.new_cache(64))))
        same += texts[0] == texts[1]
    assert same >= 5
    int8 = load_engine(real_model_dir, LoadOptions(device="cpu", dtype="float32", kv_cache="int8"))
    float_ppl = real_float_perplexity  # the same text, windows and dtype with the float cache (conftest)
    int8_ppl = perplexity(int8, documentation_text(PERPLEXITY_TEXT_CHARS), ctx=PERPLEXITY_CTX).ppl
    assert abs(int8_ppl - float_ppl) <= 0.005 * float_ppl, (float_ppl, int8_ppl)


def test_info_reports_cache_bytes_and_context_for_a_budget(tiny_model):
    from qwen2cli.model_info import describe

    engine = load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32"))
    facts = describe(tiny_model, memory="1GiB")
    assert facts["kv_bytes_per_token"]["bfloat16"] == KVCache(engine.config, 64, dtype=torch.bfloat16).bytes_per_token()
    assert facts["kv_bytes_per_token"]["int8"] == Int8KVCache(engine.config, 64).bytes_per_token()
    expected = (2**30 - facts["size_bytes"]) // facts["kv_bytes_per_token"]["int8"]
    assert facts["max_context"]["int8"] == expected
