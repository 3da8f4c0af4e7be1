"""Prefill (chunked) and decode loops: prompt ids in, text chunks with finish reasons and timing stats out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .checkpoint import LoadedModel, load_model
from .config import Qwen2Config, load_config
from .errors import ContextOverflow
from .kv_cache import Int8KVCache, KVCache
from .load_options import DEFAULT_LOAD, LoadOptions
from .memory import check_cache_fits
from .sampling import SamplingParams, pick_token
from .stats import Stats
from .tokenizer import Qwen2Tokenizer

PREFILL_CHUNK = 512
STOP_TOKEN_TEXTS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class Engine:
    """A loaded model with its tokenizer: what every command that generates works on."""

    loaded: LoadedModel
    tokenizer: Qwen2Tokenizer
    model_dir: Path
    stop_ids: frozenset[int]
    sampleable_vocab: int  # logits rows at or past this index are padding and never sampled
    options: LoadOptions = DEFAULT_LOAD  # what it was loaded with
    load_seconds: float = 0.0

    @property
    def config(self) -> Qwen2Config:
        return self.loaded.config

    @property
    def ctx(self) -> int:
        """The context in tokens: the one asked for, else min(4096, the model's trained context)."""
        return self.loaded.ctx

    def new_cache(self, max_len: int) -> KVCache:
        """A KV cache of `max_len` positions on the model's device, in its dtype (int8 when asked); one the free
        memory cannot hold is refused before it is allocated."""
        int8 = self.options.kv_cache == "int8"
        element_bytes = 1 if int8 else self.loaded.dtype.itemsize
        check_cache_fits(self.config, max_len, element_bytes=element_bytes, device=str(self.loaded.device))
        kind = Int8KVCache if int8 else KVCache
        return kind(self.config, max_len, dtype=self.loaded.dtype, device=self.loaded.device)


def load_engine(model_dir: Path, options: LoadOptions = DEFAULT_LOAD) -> Engine:
    """Load model and tokenizer from a checkpoint directory as `options` say, and work out the stop ids."""
    started = time.perf_counter()
    load_config(Path(model_dir))  # a missing or foreign config.json is the first thing to report
    tokenizer = Qwen2Tokenizer.from_dir(Path(model_dir))
    loaded = load_model(Path(model_dir), options)
    stops = set(loaded.config.eos_token_ids)
    stops.update(i for i in (tokenizer.token_to_id(t) for t in STOP_TOKEN_TEXTS) if i is not None)
    sampleable = min(loaded.config.vocab_size, tokenizer.vocab_size)  # ids the tokenizer can produce
    return Engine(
        loaded=loaded,
        tokenizer=tokenizer,
        model_dir=Path(model_dir),
        stop_ids=frozenset(stops),
        sampleable_vocab=sampleable,
        options=options,
        load_seconds=time.perf_counter() - started,
    )


@dataclass
class Chunk:
    """A piece of answer text; the last chunk has a finish_reason ("stop" or "length") and the stats."""

    text: str
    finish_reason: str | None = None
    stats: Stats | None = None


def prefill(engine: Engine, cache: KVCache, token_ids: list[int], *, chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run `token_ids` through the model from cache.pos on, in chunks; return the last position's logits (vocab,)."""
    device = engine.loaded.device
    logits = None
    for begin in range(0, len(token_ids), chunk_size):
        piece = torch.tensor([token_ids[begin : begin + chunk_size]], device=device)
        logits = engine.loaded.model(piece, cache, cache.pos, last_only=True)
    assert logits is not None, "prefill needs at least one token"
    return logits[0, -1].float()


class TokenConstraint(Protocol):
    """A grammar the answer must follow: which tokens may come next, advanced by each one chosen."""

    def allowed(self) -> torch.Tensor: ...  # bool (vocab,)

    def advance(self, token_id: int) -> None: ...


def generate(
    engine: Engine,
    prompt_ids: list[int],
    *,
    params: SamplingParams,
    cache: KVCache,
    stats: Stats | None = None,
    constraint: TokenConstraint | None = None,
) -> Iterator[Chunk]:
    """Continue `prompt_ids`, reusing the cache's first cache.pos positions, which must hold prompt_ids' prefix.
    `stats`: a Stats to fill in as tokens come (the caller keeps counts and timings of an answer it stops);
    `constraint`: only the tokens it allows are sampled."""
    if len(prompt_ids) >= cache.max_len:
        raise ContextOverflow(
            f"the prompt is {len(prompt_ids)} tokens; the context holds {cache.max_len} "
            "(raise --ctx or shorten the prompt)"
        )
    if cache.pos >= len(prompt_ids):
        cache.trim(len(prompt_ids) - 1)  # at least one token must run to produce logits
    stats = Stats() if stats is None else stats
    stats.prompt_tokens, stats.prefilled_tokens = len(prompt_ids), len(prompt_ids) - cache.pos
    generator = torch.Generator(device=engine.loaded.device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    vocab = engine.config.vocab_size
    seen = torch.zeros(vocab, dtype=torch.bool, device=engine.loaded.device)
    seen[torch.tensor(prompt_ids, device=engine.loaded.device)] = True
    decoder = engine.tokenizer.stream_decoder()
    started = time.perf_counter()
    with torch.inference_mode():
        logits = prefill(engine, cache, prompt_ids[cache.pos :])
        stats.prefill_s = time.perf_counter() - started
        finish = "length"
        while True:
            logits[engine.sampleable_vocab :] = float("-inf")  # ids past the tokenizer's (padding rows)
            if constraint is not None:
                logits.masked_fill_(~constraint.allowed().to(logits.device), float("-inf"))
            token = pick_token(logits, params, seen=seen, generator=generator)
            if constraint is not None:
                constraint.advance(token)
            if not stats.completion_tokens:
                stats.ttft_s = time.perf_counter() - started
            stats.completion_tokens += 1
            stats.generated_ids.append(token)
            stats.decode_s = time.perf_counter() - started - stats.ttft_s
            if token in engine.stop_ids:
                finish = "stop"
                break
            text = decoder.push(token)
            if text:
                yield Chunk(text)
            if stats.completion_tokens >= params.max_tokens or cache.pos >= cache.max_len:
                break
            seen[token] = True
            logits = engine.loaded.model(
                torch.tensor([[token]], device=engine.loaded.device), cache, cache.pos, last_only=True
            )[0, -1].float()
    stats.decode_s = time.perf_counter() - started - stats.ttft_s
    yield Chunk(decoder.flush(), finish_reason=finish, stats=stats)
