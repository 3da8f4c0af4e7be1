"""Requests to answers: render and check the prompt, choose sampling and constraints, run the job on the scheduler
and turn its tokens into answer text, tool calls and a finish reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from ..chatml import Message, default_system_prompt, render_text
from ..errors import BadInput
from ..generate import Engine
from ..sampling import SamplingParams
from .constrain import Constraint, compiler_for
from .scheduler import Failed, Finished, Job, Scheduler, Token
from .schema import ChatRequest, Common, CompletionRequest, RequestError
from .template import ChatTemplate
from .tools import Piece, StopStrings, ToolCallSplitter


@dataclass(frozen=True)
class Prepared:
    """A checked request, ready to run."""

    common: Common
    prompt_ids: list[int]
    params: SamplingParams
    constraint: Constraint | None
    banned_ids: tuple[int, ...]
    split_tool_calls: bool
    logprobs: int | None = None  # as ChatRequest.logprobs


@dataclass(frozen=True)
class Outcome:
    """How an answer ended: finish_reason (stop, length, tool_calls) and the OpenAI usage object."""

    finish_reason: str
    usage: dict[str, Any]


class ServerError(Exception):
    """The model failed while answering (HTTP 500)."""


class Service:
    """The warm model and everything a request needs around it."""

    def __init__(self, engine: Engine, *, model_id: str, slots: int) -> None:
        self.engine = engine
        self.model_id = model_id
        self.scheduler = Scheduler(engine, slots=slots)
        tokenizer = engine.tokenizer
        self.template = ChatTemplate.from_model(engine.model_dir, tokenizer.chat_template)
        self.grammars = compiler_for(engine)
        self.markers = self.grammars.special_ids

    # -- preparing -------------------------------------------------------------------------------------------
    def _chat_text(self, request: ChatRequest) -> str:
        if self.template is not None:
            return self.template.render(request.messages, tools=request.tools)
        if request.tools or any(m["role"] == "tool" for m in request.messages):
            raise RequestError("this model has no chat template, so it cannot take tools", param="tools")
        messages = [Message(m["role"], m["content"]) for m in request.messages]
        return render_text(messages, default_system=default_system_prompt(None))

    def prepare_chat(self, request: ChatRequest) -> Prepared:
        ids = self.engine.tokenizer.encode(self._chat_text(request))
        constraint = None
        banned: tuple[int, ...] = ()
        choice = request.tool_choice
        if request.response_format is not None:
            schema = request.response_format.get("schema") or {"type": "object"}
            constraint = self.grammars.json_schema(schema)
        if choice == "none":
            banned = tuple(self.markers.values())
            if request.tools and constraint is None:  # the tools are in the prompt: no call marker, even spelled out
                constraint = self.grammars.plain_text()
        elif request.tools:
            tools = request.tools
            if isinstance(choice, dict):
                tools = [t for t in tools if t["function"]["name"] == choice["name"]]
            mode = "auto" if choice == "auto" else "required"
            constraint = self.grammars.tool_calls(tools, mode=mode, parallel=request.parallel_tool_calls)
        prepared = self._prepared(request.common, ids, constraint, banned, split_tool_calls=choice != "none")
        return replace(prepared, logprobs=request.logprobs)

    def prepare_completion(self, request: CompletionRequest) -> Prepared:
        ids = self.engine.tokenizer.encode(request.prompt)
        return self._prepared(request.common, ids, None, (), split_tool_calls=False)

    def _prepared(
        self,
        common: Common,
        ids: list[int],
        constraint: Constraint | None,
        banned: tuple[int, ...],
        *,
        split_tool_calls: bool,
    ) -> Prepared:
        if common.model != self.model_id:
            raise RequestError(f"model {common.model!r} is not served here; this server serves {self.model_id!r}",
                               param="model", status=404, code="model_not_found")  # fmt: skip
        ctx = self.engine.ctx
        if len(ids) >= ctx:
            raise RequestError(
                f"the prompt is {len(ids)} tokens; the context holds {ctx} (nothing is truncated)",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = common.max_tokens if common.max_tokens is not None else ctx - len(ids)
        if len(ids) + max_tokens > ctx:
            raise RequestError(
                f"the prompt is {len(ids)} tokens and max_tokens asks for {max_tokens} more; the context holds {ctx}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        params = self._params(common, max_tokens)
        return Prepared(common, ids, params, constraint, banned, split_tool_calls)

    def _params(self, common: Common, max_tokens: int) -> SamplingParams:
        asked, defaults = common.sampling, self.engine.config.generation
        try:
            return SamplingParams(
                temperature=defaults.temperature if asked.temperature is None else asked.temperature,
                top_p=defaults.top_p if asked.top_p is None else asked.top_p,
                top_k=defaults.top_k if asked.top_k is None else asked.top_k,
                min_p=defaults.min_p if asked.min_p is None else asked.min_p,
                repeat_penalty=defaults.repetition_penalty
                if asked.repetition_penalty is None
                else asked.repetition_penalty,
                seed=asked.seed,
                max_tokens=max_tokens,
            )
        except BadInput as exc:
            raise RequestError(str(exc).replace("--", "").replace("-", "_")) from exc

    # -- running ---------------------------------------------------------------------------------------------
    async def run(self, prepared: Prepared) -> AsyncIterator[Piece | Outcome]:
        """Answer pieces as they are generated, then the Outcome; leaving early cancels the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

        asked = prepared.common.sampling
        job = Job(
            prompt_ids=prepared.prompt_ids,
            params=prepared.params,
            emit=emit,
            frequency_penalty=asked.frequency_penalty,
            presence_penalty=asked.presence_penalty,
            constraint=prepared.constraint,
            banned_ids=prepared.banned_ids,
            logprobs=prepared.logprobs,
        )
        decoder = self.engine.tokenizer.stream_decoder()
        stops = StopStrings(prepared.common.stop)
        splitter = ToolCallSplitter() if prepared.split_tool_calls else None
        received = 0
        pending: list[dict[str, Any]] = []  # logprobs entries of tokens whose text is not out yet
        self.scheduler.submit(job)
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Failed):
                    raise ServerError(event.message)
                if isinstance(event, Token):
                    received += 1
                    if event.logprob is not None:
                        pending.append(self._logprob_entry(event))
                    text = stops.push(decoder.push(event.token_id))
                    for piece in self._split(splitter, text, last=stops.stopped):
                        yield self._with_logprobs(piece, pending)
                    if stops.stopped:
                        job.cancelled.set()
                        self.scheduler.wake()
                        finished = await self._finished(queue)
                        yield self._outcome("stop", finished.cached_tokens, len(job.prompt_ids), received, splitter)
                        return
                    continue
                assert isinstance(event, Finished)
                if event.finish_reason == "cancelled":
                    raise ServerError("the server is shutting down")
                text = stops.push(decoder.flush())
                text += stops.finish()
                for piece in self._split(splitter, text, last=True):
                    yield self._with_logprobs(piece, pending)
                if pending:  # tokens that added no text (a stop string's, or an unfinished character)
                    yield self._with_logprobs(Piece(), pending)
                yield self._outcome(
                    event.finish_reason, event.cached_tokens, event.prompt_tokens, event.completion_tokens, splitter
                )
                return
        finally:
            job.cancelled.set()
            self.scheduler.wake()

    def _logprob_entry(self, token: Token) -> dict[str, Any]:
        tokenizer = self.engine.tokenizer

        def described(token_id: int, logprob: float) -> dict[str, Any]:
            piece = tokenizer.token_bytes(token_id)
            text = piece.decode("utf-8", errors="replace")
            return {"token": text, "logprob": logprob, "bytes": list(piece)}

        assert token.logprob is not None
        entry = described(token.token_id, token.logprob)
        entry["top_logprobs"] = [described(i, lp) for i, lp in token.top]
        return entry

    @staticmethod
    def _with_logprobs(piece: Piece, pending: list[dict[str, Any]]) -> Piece:
        """The piece carrying the entries of the tokens behind it (the first piece after them takes them all)."""
        if not pending:
            return piece
        taken = tuple(pending)
        pending.clear()
        return replace(piece, logprobs=taken)

    @staticmethod
    async def _finished(queue: asyncio.Queue) -> Finished:
        while True:
            event = await queue.get()
            if isinstance(event, Finished | Failed):
                return event if isinstance(event, Finished) else Finished("stop", 0, 0, 0)

    @staticmethod
    def _split(splitter: ToolCallSplitter | None, text: str, *, last: bool) -> list[Piece]:
        if splitter is None:
            return [Piece(text=text)] if text else []
        return splitter.push(text) + (splitter.finish() if last else [])

    @staticmethod
    def _outcome(
        reason: str, cached_tokens: int, prompt_tokens: int, completion_tokens: int, splitter: ToolCallSplitter | None
    ) -> Outcome:
        if reason == "stop" and splitter is not None and splitter.calls:
            reason = "tool_calls"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        }
        return Outcome(reason, usage)
