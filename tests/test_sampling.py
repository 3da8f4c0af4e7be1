"""Token selection against transformers' logits processors: the repetition penalty, temperature, top-k, top-p and
min-p give the scores transformers gives, entry for entry."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from qwen2cli.sampling import SamplingParams, filter_logits, penalize_repeats, pick_token


def logits_and_history(seed: int, vocab: int = 5000) -> tuple[torch.Tensor, Any]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=generator) * 4
    logits[:3] = 0.0  # exact zeros: neither divided nor multiplied away
    history = torch.cat([torch.arange(3), torch.randint(0, vocab, (300,), generator=generator)])
    return logits, history


@pytest.mark.parametrize("penalty", [1.0, 1.05, 1.3, 0.8])
def test_repetition_penalty_is_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits, history = logits_and_history(0)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[history] = True
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history[None], logits[None].clone())[0]
    got = penalize_repeats(logits, seen, penalty)
    assert torch.equal(got, expected)
    assert torch.equal(logits, logits_and_history(0)[0])  # the caller's row is left as it was


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
        SamplingParams(temperature=1.3, top_k=0, top_p=0.5),
        SamplingParams(temperature=0.5, top_k=50, top_p=1.0, min_p=0.05),
    ],
)
def test_filters_are_transformers_warpers(params):
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits, history = logits_and_history(1)
    scores = TemperatureLogitsWarper(params.temperature)(history[None], logits[None].clone())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(history[None], scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(history[None], scores)
    if params.min_p:
        scores = MinPLogitsWarper(params.min_p)(history[None], scores)
    got = filter_logits(logits, params)
    kept = torch.isfinite(scores[0])
    assert torch.equal(torch.isfinite(got), kept)
    torch.testing.assert_close(got[kept], scores[0][kept], rtol=0, atol=0)


def test_greedy_takes_the_best_penalized_token():
    logits, history = logits_and_history(2)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[history] = True
    best = int(torch.argmax(logits))
    seen[best] = True
    params = SamplingParams(temperature=0, repeat_penalty=50.0)
    assert pick_token(logits, params, seen=seen, generator=None) == int(
        torch.argmax(penalize_repeats(logits, seen, 50.0))
    )
    assert pick_token(logits, params, seen=seen, generator=None) != best
