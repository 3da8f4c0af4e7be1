"""The HTTP side: Starlette routes for /health, /v1/models, /v1/chat/completions and /v1/completions, bearer-key
auth, OpenAI-shaped errors, and answers as one JSON object or as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .schema import RequestError, parse_chat, parse_completion
from .service import Outcome, Prepared, ServerError, Service
from .tools import Piece

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not JSON: {exc}") from exc


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Routes:
    """The endpoints over one Service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.service.model_id, "requests": self.service.scheduler.load()})

    async def models(self, request: Request) -> Response:
        model = {"id": self.service.model_id, "object": "model", "created": 0, "owned_by": "qwen2cli"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(self, request: Request) -> Response:
        prepared = self.service.prepare_chat(parse_chat(await _json_body(request)))
        return await self._answer(prepared, request, chat=True)

    async def completions(self, request: Request) -> Response:
        prepared = self.service.prepare_completion(parse_completion(await _json_body(request)))
        return await self._answer(prepared, request, chat=False)

    async def _answer(self, prepared: Prepared, request: Request, *, chat: bool) -> Response:
        answer_id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        head = {
            "id": answer_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.service.model_id,
        }
        pieces = self.service.run(prepared)
        if prepared.common.stream:
            return StreamingResponse(
                self._stream(pieces, head, chat=chat, include_usage=prepared.common.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        collected = await self._collect(pieces, request)
        if collected is None:
            return Response(status_code=499)  # the client has gone: nobody reads this
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        entries: list[dict[str, Any]] = []
        outcome = None
        for item in collected:
            if isinstance(item, Outcome):
                outcome = item
                continue
            entries.extend(item.logprobs)
            if item.call is not None:
                calls.append(item.call)
            else:
                texts.append(item.text)
        assert outcome is not None
        text = "".join(texts)
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
            if calls:
                message["tool_calls"] = calls
            logprobs = {"content": entries} if prepared.logprobs is not None else None
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": outcome.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
        body = {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice]}
        return JSONResponse({**body, "usage": outcome.usage})

    @staticmethod
    async def _collect(pieces: AsyncIterator[Piece | Outcome], request: Request) -> list[Piece | Outcome] | None:
        """The whole answer; None when the client disconnected first (its generation is then cancelled)."""
        collected: list[Piece | Outcome] = []

        async def consume() -> None:
            async for item in pieces:
                collected.append(item)

        task = asyncio.ensure_future(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
        task.result()  # raises what the generation raised
        return collected

    async def _stream(
        self, pieces: AsyncIterator[Piece | Outcome], head: dict[str, Any], *, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's shape; leaving early (the client went away) cancels the generation."""
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: tuple[dict[str, Any], ...] = ()) -> str:
            choice: dict[str, Any] = {
                "index": 0,
                "logprobs": {"content": list(logprobs)} if logprobs else None,
                "finish_reason": finish,
            }
            choice.update({"delta": delta} if chat else {"text": delta.get("content", "")})
            return _sse({**head, "choices": [choice], **extra})

        calls = 0
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            async for item in pieces:
                if isinstance(item, Outcome):
                    yield chunk({}, item.finish_reason)
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": item.usage})
                    yield _sse("[DONE]")
                elif item.call is not None:
                    yield chunk({"tool_calls": [{"index": calls, **item.call}]}, logprobs=item.logprobs)
                    calls += 1
                else:
                    yield chunk({"content": item.text}, logprobs=item.logprobs)
        except ServerError as exc:
            yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]


def build_app(service: Service, *, api_key: str | None) -> Starlette:
    """The ASGI app; with `api_key`, every route but /health needs `Authorization: Bearer <api_key>`."""
    routes = Routes(service)

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if api_key is not None:
                given = request.headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    return error_response(
                        401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key"
                    )
            try:
                return await handler(request)
            except RequestError as exc:
                return error_response(exc.status, exc.message, param=exc.param, code=exc.code)
            except ServerError as exc:
                return error_response(500, str(exc))

        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.scheduler.start()
        try:
            yield
        finally:
            service.scheduler.stop()

    return Starlette(
        routes=[
            Route("/health", routes.health, methods=["GET"]),
            Route("/v1/models", guarded(routes.models), methods=["GET"]),
            Route("/v1/chat/completions", guarded(routes.chat), methods=["POST"]),
            Route("/v1/completions", guarded(routes.completions), methods=["POST"]),
        ],
        lifespan=lifespan,
    )
