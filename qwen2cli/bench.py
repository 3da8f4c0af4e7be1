"""Prefill/decode/TTFT/load/peak-RSS measurement behind `qwen2 bench`."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .generate import load_engine, prefill
from .load_options import DEFAULT_LOAD, LoadOptions

FILLER = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 def add(a, b):\n    return a + b\n"


@dataclass
class BenchResult:
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    load_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None  # CUDA: the most memory torch's allocator held on the GPU; None on the CPU
    prompt_tokens: int
    new_tokens: int
    device: str
    dtype: str


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def run_bench(
    model_dir: Path,
    options: LoadOptions = DEFAULT_LOAD,
    *,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
) -> BenchResult:
    """Load, prefill `prompt_tokens`, then decode `new_tokens` greedily (ignoring stop tokens), timing each part."""
    started = time.perf_counter()
    engine = load_engine(model_dir, options)
    load_s = time.perf_counter() - started
    ids = engine.tokenizer.encode(FILLER * (prompt_tokens // 20 + 1))[:prompt_tokens]
    cache = engine.new_cache(prompt_tokens + new_tokens + 1)
    with torch.inference_mode():
        warm = engine.new_cache(8)
        prefill(engine, warm, ids[:4])  # first-call overheads are load, not throughput
        began = time.perf_counter()
        logits = prefill(engine, cache, ids)
        token = int(logits.argmax())
        ttft = time.perf_counter() - began
        decode_started = time.perf_counter()
        for _ in range(new_tokens - 1):
            step = torch.tensor([[token]], device=engine.loaded.device)
            token = int(engine.loaded.model(step, cache, cache.pos, last_only=True)[0, -1].argmax())
        decode_s = time.perf_counter() - decode_started
    return BenchResult(
        prefill_tok_s=len(ids) / ttft,
        decode_tok_s=(new_tokens - 1) / decode_s if new_tokens > 1 else 0.0,
        ttft_s=ttft,
        load_s=load_s,
        peak_rss_mb=peak_rss_mb(),
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if engine.loaded.device.type == "cuda" else None,
        prompt_tokens=len(ids),
        new_tokens=new_tokens,
        device=str(engine.loaded.device),
        dtype=str(engine.loaded.dtype).removeprefix("torch."),
    )


def as_dict(result: BenchResult) -> dict:
    return asdict(result)
