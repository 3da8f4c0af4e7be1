"""One answer to one prompt: the library call behind `qwen2 run`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .chatml import Message, default_system_prompt, encode_chat
from .generate import Engine, TokenConstraint, generate, load_engine
from .load_options import LoadOptions
from .sampling import SamplingParams


def prompt_ids(engine: Engine, text: str, *, raw: bool, system: str | None) -> list[int]:
    """The prompt's token ids: plain text with --raw, else one user turn in the checkpoint's chat format."""
    if raw:
        return engine.tokenizer.encode(text)
    messages = ([Message("system", system)] if system is not None else []) + [Message("user", text)]
    return encode_chat(engine.tokenizer, messages, default_system=default_system_prompt(engine.tokenizer.chat_template))


def answer_once(
    model_dir: Path,
    text: str,
    *,
    options: LoadOptions,
    raw: bool,
    system: str | None,
    sampling: Callable[[Engine], SamplingParams],
    on_text: Callable[[str], None] | None,
    constraint: Callable[[Engine], TokenConstraint] | None = None,
) -> dict[str, Any]:
    """Generate one answer, streaming text to `on_text`; return text, finish reason and usage. `constraint`: the
    grammar the answer must follow, built for the loaded engine."""
    engine = load_engine(model_dir, options)
    params = sampling(engine)
    grammar = constraint(engine) if constraint is not None else None
    ids = prompt_ids(engine, text, raw=raw, system=system)
    cache = engine.new_cache(min(engine.ctx, len(ids) + params.max_tokens + 1))
    if (
        not raw and options.attention == "default"
    ):  # the template's opening comes from disk when this model saw it before
        from .prompt_cache import fill_opening, shared_prefix_length

        others = [prompt_ids(engine, other, raw=False, system=system) for other in ("a", "b")]
        fill_opening(engine, cache, ids[: shared_prefix_length(ids, *others)])
    pieces: list[str] = []
    stats = None
    finish = None
    for chunk in generate(engine, ids, params=params, cache=cache, constraint=grammar):
        if chunk.text:
            pieces.append(chunk.text)
            if on_text is not None:
                on_text(chunk.text)
        if chunk.finish_reason is not None:
            stats, finish = chunk.stats, chunk.finish_reason
    assert stats is not None
    return {
        "text": "".join(pieces),
        "finish_reason": finish,
        "usage": {
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "ttft_s": round(stats.ttft_s, 4),
            "decode_tok_s": round(stats.decode_tok_s, 2),
        },
    }
