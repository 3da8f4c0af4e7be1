"""Token selection: repetition penalty, temperature, top-k, top-p, min-p; pure functions over one logits row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BadInput


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token; temperature 0 is greedy. Defaults are Qwen2.5-Instruct's generation_config."""

    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    min_p: float = 0.0
    repeat_penalty: float = 1.05
    seed: int | None = None
    max_tokens: int = 512

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"--top-k must be >= 0 (0 turns it off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"--min-p must be in [0, 1), got {self.min_p}"),
            (self.repeat_penalty > 0, f"--repeat-penalty must be > 0, got {self.repeat_penalty}"),
            (self.max_tokens >= 1, f"--max-tokens must be >= 1, got {self.max_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty as transformers applies it: positive logits of seen tokens are divided by it,
    negative ones multiplied."""
    if penalty == 1.0:
        return logits
    # only the seen entries (hundreds of a vocabulary of 150K): whole-vocabulary passes took 0.9 ms a token
    ids = seen.nonzero().squeeze(-1)
    picked = logits[ids]
    penalized = logits.clone()
    penalized[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return penalized


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (transformers' order); removed entries become -inf."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - params.top_p
        remove_sorted[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove_sorted.scatter(0, order, remove_sorted), float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def pick_token(
    logits: torch.Tensor, params: SamplingParams, *, seen: torch.Tensor, generator: torch.Generator | None
) -> int:
    """Choose the next token id from one float32 logits row (vocab,)."""
    logits = penalize_repeats(logits, seen, params.repeat_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
