"""Request bodies of /v1/chat/completions and /v1/completions checked into dataclasses: every accepted field is
honoured, and any other field, or a value outside what is honoured, is a RequestError naming it (HTTP 400)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import BadInput


class RequestError(BadInput):
    """A request the server will not serve as asked: an OpenAI-shaped error with this status and parameter."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling; None means the model's generation_config default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class Common:
    """What chat and plain completions share: streaming, length, stop strings, sampling."""

    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    stop: tuple[str, ...]
    sampling: Sampling


@dataclass(frozen=True)
class ChatRequest:
    common: Common
    messages: list[dict[str, Any]]  # as the chat template expects them: content strings, tool-call arguments as dicts
    tools: list[dict[str, Any]] | None
    tool_choice: str | dict[str, Any]  # "auto", "none", "required" or {"name": ...}
    parallel_tool_calls: bool
    response_format: dict[str, Any] | None  # None (text), {"type": "json_object"} or {"type": "json_schema", ...}
    logprobs: int | None  # None: no logprobs; else each token's and this many alternatives' (top_logprobs)


@dataclass(frozen=True)
class CompletionRequest:
    common: Common
    prompt: str


COMMON_FIELDS = {
    "model", "stream", "stream_options", "max_tokens", "stop", "seed", "n", "user", "temperature", "top_p", "top_k",
    "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "logprobs",
}  # fmt: skip
CHAT_FIELDS = COMMON_FIELDS | {
    "messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "top_logprobs",
}  # fmt: skip
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "suffix"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MESSAGE_FIELDS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls"},
    "tool": {"role", "content", "tool_call_id"},
}


def _number(body: dict, name: str, low: float, high: float, *, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return value


def _check_fields(body: Any, allowed: set[str], where: str = "") -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"{where or 'the request body'} must be a JSON object", param=where or None)
    for name in body:
        if name not in allowed:
            raise RequestError(f"unsupported field '{where}{name}': this server does not honour it", param=where + name)
    return body


def _must_be_off(body: dict, name: str, off: tuple[Any, ...]) -> None:
    if name in body and body[name] not in off:
        raise RequestError(f"'{name}' = {body[name]!r} is not supported by this server", param=name)


def _common(body: dict) -> Common:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required (see GET /v1/models)", param="model")
    _must_be_off(body, "n", (None, 1))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError("'user' must be a string", param="user")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    options = _check_fields(body.get("stream_options") or {}, {"include_usage"}, "stream_options.")
    if options and not stream:
        raise RequestError("'stream_options' is only allowed with 'stream': true", param="stream_options")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of them", param="stop")
    max_tokens = _number(body, "max_completion_tokens", 1, 2**31, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 2**31, integer=True)
    top_k = _number(body, "top_k", -1, 2**31, integer=True)
    sampling = Sampling(
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 1e-9, 1),
        top_k=0 if top_k == -1 else top_k,
        min_p=_number(body, "min_p", 0, 0.999999),
        repetition_penalty=_number(body, "repetition_penalty", 1e-6, 100),
        frequency_penalty=_number(body, "frequency_penalty", -2, 2) or 0.0,
        presence_penalty=_number(body, "presence_penalty", -2, 2) or 0.0,
        seed=_number(body, "seed", -(2**63), 2**63 - 1, integer=True),
    )
    return Common(
        model=model,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        max_tokens=max_tokens,
        stop=tuple(stops),
        sampling=sampling,
    )


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            part = _check_fields(part, {"type", "text"}, f"{where}[{index}].")
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"'{where}[{index}]': only text parts are supported", param=f"{where}[{index}]")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"'{where}' must be a string or a list of text parts", param=where)


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    call = _check_fields(call, {"id", "type", "function"}, where)
    function = _check_fields(call.get("function"), {"name", "arguments"}, f"{where}function.")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise RequestError(f"'{where}function.arguments' is not JSON: {exc}", param=f"{where}function") from exc
    if not isinstance(function.get("name"), str) or not isinstance(arguments, dict):
        raise RequestError(f"'{where}function' needs a name and object arguments", param=f"{where}function")
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _message(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"'{where}.role' must be one of {', '.join(ROLES)}", param=f"{where}.role")
    role = ROLES[message["role"]]
    _check_fields(message, MESSAGE_FIELDS[role], f"{where}.")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RequestError(f"'{where}.tool_calls' must be a list", param=f"{where}.tool_calls")
    content = message.get("content")
    if content is None and role == "assistant" and calls:
        content = ""
    normalized: dict[str, Any] = {"role": role, "content": _text_content(content, f"{where}.content")}
    if calls:
        normalized["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{i}].") for i, c in enumerate(calls)]
    return normalized


def _tools(body: dict) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        raise RequestError("'tools' must be a non-empty list", param="tools")
    checked = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]."
        tool = _check_fields(tool, {"type", "function"}, where)
        function = _check_fields(
            tool.get("function"), {"name", "description", "parameters", "strict"}, where + "function."
        )
        if tool.get("type") != "function" or not isinstance(function.get("name"), str):
            raise RequestError(f"'{where}' must be a function with a name", param=f"tools[{index}]")
        if not isinstance(function.get("parameters", {}), dict):
            raise RequestError(f"'{where}function.parameters' must be a JSON schema object", param=f"tools[{index}]")
        checked.append({"type": "function", "function": {k: v for k, v in function.items() if k != "strict"}})
    return checked


def _tool_choice(body: dict, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("auto", "none", "required"):
        if choice != "none" and not tools:
            raise RequestError(f"'tool_choice' {choice!r} needs 'tools'", param="tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if tools and any(t["function"]["name"] == name for t in tools):
            return {"name": name}
        raise RequestError(f"'tool_choice' names {name!r}, which is not in 'tools'", param="tool_choice")
    raise RequestError("'tool_choice' must be auto, none, required or a named function", param="tool_choice")


def _response_format(body: dict) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    fmt = _check_fields(fmt, {"type", "json_schema"}, "response_format.")
    if fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = _check_fields(
            fmt.get("json_schema"), {"name", "schema", "strict", "description"}, "response_format.json_schema."
        )
        if not isinstance(spec.get("schema", {}), dict):
            raise RequestError("'response_format.json_schema.schema' must be an object", param="response_format")
        return {"type": "json_schema", "schema": spec.get("schema", {})}
    raise RequestError("'response_format.type' must be text, json_object or json_schema", param="response_format")


def parse_chat(body: Any) -> ChatRequest:
    """A /v1/chat/completions body, checked."""
    body = _check_fields(body, CHAT_FIELDS)
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError("'logprobs' must be a boolean", param="logprobs")
    top_logprobs = _number(body, "top_logprobs", 0, 20, integer=True)
    if top_logprobs is not None and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    tools = _tools(body)
    choice = _tool_choice(body, tools)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    response_format = _response_format(body)
    if response_format is not None and choice != "none":
        raise RequestError(
            "'response_format' needs 'tool_choice': 'none' when 'tools' are given", param="response_format"
        )
    return ChatRequest(
        common=_common(body),
        messages=[_message(m, i) for i, m in enumerate(messages)],
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        response_format=response_format,
        logprobs=(top_logprobs or 0) if logprobs else None,
    )


def parse_completion(body: Any) -> CompletionRequest:
    """A /v1/completions body, checked: one prompt string."""
    body = _check_fields(body, COMPLETION_FIELDS)
    _must_be_off(body, "logprobs", (None,))
    _must_be_off(body, "echo", (None, False))
    _must_be_off(body, "suffix", (None,))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be one non-empty string", param="prompt")
    return CompletionRequest(common=_common(body), prompt=prompt)
