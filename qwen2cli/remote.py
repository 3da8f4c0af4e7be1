"""A client of any OpenAI-compatible server (ours included), on the standard library: what `run --url` and
`chat --url` use in place of a local model."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .chatml import Message
from .errors import BadInput
from .stats import Stats
from .transcript import write_transcript

API_KEY_ENV = "OPENAI_API_KEY"  # sent as `Authorization: Bearer ...` when set


@dataclass(frozen=True)
class RemoteSampling:
    """The sampling fields to send; None leaves a field to the server (its model's defaults)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None

    def fields(self) -> dict[str, Any]:
        names = {"repeat_penalty": "repetition_penalty"}
        return {names.get(k, k): v for k, v in self.__dict__.items() if v is not None}


class RemoteServer:
    """One server: its base URL (with or without /v1) and the model to ask for (default: the first it lists)."""

    def __init__(self, url: str, *, model: str | None, api_key: str | None = None) -> None:
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else f"{base}/v1"
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        listed = self._call("GET", "/models")
        self.listed = [entry for entry in listed.get("data") or [] if isinstance(entry, dict)]
        if model is None and not self.listed:
            raise BadInput(f"{url} lists no models")
        self.model: str = model or str(self.listed[0].get("id"))

    @property
    def ctx(self) -> int:
        """The model's context when the server says it (max_model_len), else 0."""
        return next((int(e.get("max_model_len") or 0) for e in self.listed if e.get("id") == self.model), 0)

    def _open(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as exc:
            raise BadInput(f"the server answered {exc.code}: {_error_message(exc)}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BadInput(f"cannot reach {self.base}: {reason}") from exc

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._open(method, path, body) as response:
            try:
                return json.loads(response.read())
            except ValueError as exc:
                raise BadInput(f"{self.base}{path} did not answer JSON") from exc

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The events of a streamed completion, as JSON objects."""
        body = {**body, "model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        with self._open("POST", path, body) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise BadInput(f"the server failed: {event['error'].get('message', event['error'])}")
                yield event


def connect(
    url: str, model: str | None, text: str | None, *, model_option: str | None
) -> tuple[RemoteServer, str | None]:
    """The server, and the text (prompt or first message) of `qwen2 run|chat --url URL [MODEL] [TEXT]`: a lone
    argument is the model when the server lists it, else the text; -m names the model outright."""
    server = RemoteServer(url, model=model_option)
    if model_option is not None or model is None:
        return server, text if text is not None else model
    if text is None and all(entry.get("id") != model for entry in server.listed):
        return server, model
    server.model = model
    return server, text


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read()).get("error")
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return exc.reason if isinstance(exc.reason, str) else str(exc)


@dataclass
class RemoteAnswer:
    """One streamed answer: its text pieces as they come, then finish_reason and stats."""

    server: RemoteServer
    path: str
    body: dict[str, Any]
    text: str = ""
    finish_reason: str | None = None
    stats: Stats | None = None

    def stream(self) -> Iterator[str]:
        started = time.perf_counter()
        stats = Stats()
        for event in self.server.stream(self.path, self.body):
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                if piece:
                    if not stats.ttft_s:  # all a client sees of the server's prefill
                        stats.ttft_s = stats.prefill_s = time.perf_counter() - started
                    self.text += piece
                    yield piece
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
            usage = event.get("usage")
            if usage:
                stats.prompt_tokens = usage.get("prompt_tokens", 0)
                stats.completion_tokens = usage.get("completion_tokens", 0)
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                stats.prefilled_tokens = stats.prompt_tokens - cached
        stats.decode_s = time.perf_counter() - started - stats.ttft_s
        self.stats = stats


def remote_answer(
    server: RemoteServer,
    text: str,
    *,
    raw: bool,
    system: str | None,
    sampling: RemoteSampling,
    on_text: Callable[[str], None] | None,
    response_format: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`qwen2 run --url`: one answer from the server, streamed to `on_text`; the same dict as runner.answer_once."""
    if raw and response_format is not None:
        raise BadInput("--json-schema with --url needs the chat form (no --raw)")
    if raw:
        answer = RemoteAnswer(server, "/completions", {"prompt": text, **sampling.fields()})
    else:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": text}
        ]
        shape = {"response_format": response_format} if response_format is not None else {}
        answer = RemoteAnswer(server, "/chat/completions", {"messages": messages, **sampling.fields(), **shape})
    for piece in answer.stream():
        if on_text is not None:
            on_text(piece)
    stats = answer.stats or Stats()
    return {
        "text": answer.text,
        "finish_reason": answer.finish_reason,
        "usage": {
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "ttft_s": round(stats.ttft_s, 4),
            "decode_tok_s": round(stats.decode_tok_s, 2),
        },
    }


@dataclass
class RemoteTurn(RemoteAnswer):
    """A chat answer from the server; it joins the conversation when it ends, or when cancelled (Ctrl-C)."""

    chat: RemoteChat | None = None
    dropped_turns: int = 0
    _done: bool = False

    def stream(self) -> Iterator[str]:
        yield from super().stream()
        self._finish(cut=False)

    def cancel(self) -> None:
        if not self._done:
            self.finish_reason = "interrupted"
            self._finish(cut=True)

    def _finish(self, *, cut: bool) -> None:
        self._done = True
        assert self.chat is not None
        self.chat.messages.append(Message("assistant", self.text))
        self.chat.cut_flags.append(cut)
        if self.stats is not None:
            self.chat.context_used = self.stats.prompt_tokens + self.stats.completion_tokens


class RemoteChat:
    """A conversation held here and sent whole each turn (the server's prefix cache makes that cheap); what the
    REPL drives in place of a ChatSession under `chat --url`."""

    def __init__(self, server: RemoteServer, *, params: RemoteSampling, system: str | None) -> None:
        self.server = server
        self.params = params
        self.system = system
        self.ctx = server.ctx
        self.messages: list[Message] = []
        self.cut_flags: list[bool] = []
        self.context_used = 0

    def _turn(self, messages: list[Message]) -> RemoteTurn:
        self.messages = messages
        sent = ([{"role": "system", "content": self.system}] if self.system is not None else []) + [
            {"role": m.role, "content": m.content} for m in messages
        ]
        body = {"messages": sent, **self.params.fields()}
        return RemoteTurn(server=self.server, path="/chat/completions", body=body, chat=self)

    def ask(self, text: str) -> RemoteTurn:
        if not text.strip():
            raise BadInput("empty message")
        return self._turn([*self.messages, Message("user", text)])

    def regenerate(self) -> RemoteTurn:
        if not self.messages or self.messages[-1].role != "assistant":
            raise BadInput("nothing to regenerate yet")
        self.cut_flags.pop()
        return self._turn(self.messages[:-1])

    def undo(self) -> bool:
        if len(self.messages) < 2:
            return False
        del self.messages[-2:]
        self.cut_flags.pop()
        return True

    def reset(self) -> None:
        self.messages, self.cut_flags, self.context_used = [], [], 0

    def set_params(self, **changes: Any) -> None:
        self.params = replace(self.params, **changes)

    def save(self, path: Path, *, model: str) -> None:
        """The conversation as a transcript `qwen2 chat --load` reads (temporary file, then rename)."""
        write_transcript(
            path,
            model=model,
            system=self.system,
            ctx=self.ctx,
            settings={k: v for k, v in self.params.__dict__.items() if v is not None},
            messages=self.messages,
            cut=self.cut_flags,
        )

    def load(self, path: Path) -> dict[str, Any]:
        """Continue a saved transcript."""
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
            self.messages = [Message(m["role"], m["content"]) for m in data["messages"]]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"cannot load transcript {path}: {exc}") from exc
        self.system = data.get("system")
        self.cut_flags = list(data.get("cut") or [False] * (len(self.messages) // 2))
        return data
