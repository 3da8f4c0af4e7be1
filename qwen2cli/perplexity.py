"""Perplexity of a text over consecutive, non-overlapping windows, behind `qwen2 perplexity`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import BadInput
from .generate import Engine


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    tokens: int  # tokens scored (every window's tokens but its first)
    windows: int


def perplexity(
    engine: Engine, text: str, *, ctx: int = 512, progress: Callable[[int, int], None] | None = None
) -> PerplexityResult:
    """Split the text's tokens into windows of `ctx`, score each independently on all its tokens but the first."""
    if ctx < 2:
        raise BadInput(f"--ctx must be at least 2 for perplexity, got {ctx}")
    ids = engine.tokenizer.encode(text)
    windows = [ids[begin : begin + ctx] for begin in range(0, len(ids), ctx)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise BadInput(f"the text is {len(ids)} token(s): too short to score")
    total_nll, scored = 0.0, 0
    cache = engine.new_cache(ctx)
    with torch.inference_mode():
        for index, window in enumerate(windows):
            cache.reset()
            tokens = torch.tensor([window], device=engine.loaded.device)
            logits = engine.loaded.model(tokens, cache, 0)[0, :-1].float()  # (T-1, vocab)
            total_nll += F.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
            scored += len(window) - 1
            if progress is not None:
                progress(index + 1, len(windows))
    return PerplexityResult(ppl=math.exp(total_nll / scored), tokens=scored, windows=len(windows))
