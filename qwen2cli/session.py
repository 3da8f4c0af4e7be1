"""ChatSession: the conversation and its KV cache kept in step; each turn prefills only what the cache lacks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .chatml import Message, default_system_prompt, encode_chat
from .errors import BadInput, ContextOverflow
from .generate import Chunk, Engine, Stats, generate
from .sampling import SamplingParams
from .transcript import read_transcript, write_transcript


@dataclass
class Turn:
    """One answer being produced: stream it, and cancel it on Ctrl-C to keep what was said."""

    session: ChatSession
    prompt_ids: list[int]
    dropped_turns: int = 0
    text: str = ""
    stats: Stats | None = None  # when the answer ended, or was stopped after its first token
    finish_reason: str | None = None
    _done: bool = field(default=False, repr=False)
    _progress: Stats = field(default_factory=Stats, repr=False)  # filled in by generate as the answer goes

    def stream(self) -> Iterator[str]:
        """Answer text as it is generated; the answer joins the history when it ends."""
        for chunk in generate(
            self.session.engine,
            self.prompt_ids,
            params=self.session.params,
            cache=self.session.cache,
            stats=self._progress,
        ):
            self._take(chunk)
            if chunk.text:
                yield chunk.text
        self._finish(cut=False)

    def _take(self, chunk: Chunk) -> None:
        self.text += chunk.text
        if chunk.finish_reason is not None:
            self.stats, self.finish_reason = chunk.stats, chunk.finish_reason

    def cancel(self) -> None:
        """Stop here (Ctrl-C): keep the partial answer, marked as cut, and forget cache entries we cannot vouch for."""
        if not self._done:
            self.finish_reason = "interrupted"
            self.stats = self._progress if self._progress.completion_tokens else None
            self._finish(cut=True)

    def _finish(self, *, cut: bool) -> None:
        self._done = True
        session = self.session
        if cut:
            session.cache.trim(min(session.cache.pos, len(self.prompt_ids)))
            session.cached_ids = self.prompt_ids[: session.cache.pos]
        else:
            generated = self.stats.generated_ids if self.stats else []
            session.cached_ids = (self.prompt_ids + generated)[: session.cache.pos]
        session.messages.append(Message("assistant", self.text))
        session.cut_flags.append(cut)
        stop_ids = session.engine.stop_ids
        answer_ids = [] if cut or self.stats is None else [t for t in self.stats.generated_ids if t not in stop_ids]
        session.answer_ids.append(None if cut else answer_ids)


class ChatSession:
    """Messages, sampling settings and a KV cache for one conversation with one model."""

    def __init__(
        self, engine: Engine, *, params: SamplingParams, ctx: int | None = None, system: str | None = None
    ) -> None:
        """`ctx`: the tokens the conversation may hold; default the engine's context."""
        self.engine = engine
        self.params = params
        self.ctx = engine.ctx if ctx is None else ctx
        self.system = system
        self.messages: list[Message] = []  # user and assistant turns, alternating
        self.cut_flags: list[bool] = []  # per assistant message: stopped by the user?
        self.answer_ids: list[list[int] | None] = []  # per assistant message: its tokens as generated
        self.cache = engine.new_cache(self.ctx)
        self.cached_ids: list[int] = []  # the token ids whose keys and values the cache holds

    # -- rendering -------------------------------------------------------------------------------------------
    def _render(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        prefix = [Message("system", self.system)] if self.system is not None else []
        default = default_system_prompt(self.engine.tokenizer.chat_template)
        # the answers' own tokens, aligned with the tail of self.messages that `messages` may be
        answers = iter(self.answer_ids[len(self.answer_ids) - sum(m.role == "assistant" for m in messages) :])
        content = [None] * len(prefix) + [next(answers, None) if m.role == "assistant" else None for m in messages]
        return encode_chat(
            self.engine.tokenizer,
            prefix + messages,
            default_system=default,
            content_ids=content,
            add_generation_prompt=add_generation_prompt,
        )

    def _fit(self, messages: list[Message]) -> tuple[list[int], int]:
        """Prompt ids for `messages`, dropping the oldest turns (never the system prompt) until the answer has room."""
        reserve = min(self.params.max_tokens, self.ctx // 2)
        dropped = 0
        ids = self._render(messages)
        while len(ids) + reserve > self.ctx and len(messages) > 1:
            messages = messages[2:]  # one user message and its answer
            dropped += 1
            ids = self._render(messages)
        if len(ids) + 1 > self.ctx:
            alone = len(self._render(messages[-1:]))
            raise ContextOverflow(
                f"that message needs {alone} tokens with the system prompt; the context holds {self.ctx} (raise --ctx)"
            )
        return ids, dropped

    # -- turns -----------------------------------------------------------------------------------------------
    def ask(self, text: str) -> Turn:
        """Add a user message and prepare its answer (call .stream() on the result)."""
        if not text.strip():
            raise BadInput("empty message")
        return self._prepare([*self.messages, Message("user", text)])

    def regenerate(self) -> Turn:
        """Drop the last answer and answer the same user message again."""
        if not self.messages or self.messages[-1].role != "assistant":
            raise BadInput("nothing to regenerate yet")
        self.messages.pop()
        self.cut_flags.pop()
        self.answer_ids.pop()
        return self._prepare(self.messages)

    def _prepare(self, messages: list[Message]) -> Turn:
        ids, dropped = self._fit(messages)
        self.messages = messages[2 * dropped :]
        self.cut_flags = self.cut_flags[dropped:]
        self.answer_ids = self.answer_ids[dropped:]
        common = 0
        limit = min(len(ids), len(self.cached_ids), self.cache.pos)
        while common < limit and ids[common] == self.cached_ids[common]:
            common += 1
        self.cache.trim(common)
        self.cached_ids = self.cached_ids[:common]
        return Turn(session=self, prompt_ids=ids, dropped_turns=dropped)

    def undo(self) -> bool:
        """Forget the last question and its answer; False when there is none."""
        if len(self.messages) < 2:
            return False
        del self.messages[-2:]
        self.cut_flags.pop()
        self.answer_ids.pop()
        # the cache keeps only what the remaining conversation shares with it, so the context used drops too
        kept = self._render(self.messages, add_generation_prompt=False) if self.messages else []
        common = 0
        limit = min(len(kept), len(self.cached_ids), self.cache.pos)
        while common < limit and kept[common] == self.cached_ids[common]:
            common += 1
        self.cache.trim(common)
        self.cached_ids = self.cached_ids[:common]
        return True

    def reset(self) -> None:
        self.messages.clear()
        self.cut_flags.clear()
        self.answer_ids.clear()
        self.cache.reset()
        self.cached_ids = []

    def set_params(self, **changes: Any) -> None:
        """Change sampling settings (validated by SamplingParams)."""
        self.params = replace(self.params, **changes)

    @property
    def context_used(self) -> int:
        return self.cache.pos

    # -- transcripts -----------------------------------------------------------------------------------------
    def save(self, path: Path, *, model: str) -> None:
        """Write the conversation, model and settings as JSON (temporary file, then rename)."""
        write_transcript(
            path,
            model=model,
            system=self.system,
            ctx=self.ctx,
            settings=asdict(self.params),
            messages=self.messages,
            cut=self.cut_flags,
        )

    def load(self, path: Path) -> dict[str, Any]:
        """Replace the conversation with a saved transcript; returns the transcript's data."""
        data = read_transcript(path)
        self.reset()
        self.system = data.get("system")
        self.messages = [Message(m["role"], m["content"]) for m in data["messages"]]
        self.cut_flags = list(data.get("cut") or [False] * (len(self.messages) // 2))
        self.answer_ids = [None] * len(self.cut_flags)  # a transcript holds text: answers are re-encoded
        if data.get("settings"):
            self.params = SamplingParams(**data["settings"])
        return data
