"""The `qwen2 serve` command: an OpenAI-compatible HTTP server over one warm model (registered on cli.app)."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from .errors import BadInput, MissingDependency
from .load_options import LoadOptions
from .options import (
    AttentionOpt,
    CtxOpt,
    DeviceOpt,
    DtypeOpt,
    FloatHeadOpt,
    KvCacheOpt,
    LoadInOpt,
    ModelArg,
)

SERVER_PACKAGES = ("starlette", "uvicorn", "jinja2", "llguidance")


def check_server_packages() -> None:
    """The server's optional packages are importable, else one MissingDependency naming the extra."""
    import importlib.util

    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependency(f"qwen2 serve needs {', '.join(missing)}: pip install 'qwen2cli[serve]'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_name(model: str | None, model_dir: Path) -> str:
    """The id clients ask for: the alias or repo id given, or the file or directory name of a local model."""
    if model is None:
        return model_dir.name
    given = Path(model).expanduser()
    return given.stem if given.suffix == ".gguf" else given.name if given.exists() else model


def serve(
    model: ModelArg = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; another than loopback needs --api-key.")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Require `Authorization: Bearer KEY` on every /v1 request.")
    ] = None,
    parallel: Annotated[
        int, typer.Option("--parallel", help="Requests answered at once (one KV cache of --ctx each).")
    ] = 4,
    ctx: CtxOpt = None,
    kv_cache: KvCacheOpt = "float",
    attention: AttentionOpt = "default",
    load_in: LoadInOpt = None,
    float_head: FloatHeadOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health)."""
    from .console import dim
    from .model_args import model_to_load

    check_server_packages()
    if parallel < 1:
        raise BadInput(f"--parallel must be at least 1, got {parallel}")
    if not 0 < port < 65536:
        raise BadInput(f"--port must be in 1..65535, got {port}")
    options = LoadOptions(
        device=device, dtype=dtype, ctx=ctx, kv_cache=kv_cache, attention=attention, load_in=load_in,
        float_head=float_head,
    )  # fmt: skip
    if not is_loopback(host) and api_key is None:
        dim(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model")
    model_dir, _ = model_to_load(model, options)
    import uvicorn

    from .generate import load_engine
    from .serve.app import build_app
    from .serve.service import Service

    engine = load_engine(model_dir, options)
    service = Service(engine, model_id=served_name(model, model_dir), slots=parallel)
    app = build_app(service, api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))

    async def announce() -> None:  # once listening (a port that cannot be bound ends the server first)
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        if server.started:
            dim(f"serving {service.model_id} on http://{host}:{port}/v1 (context {engine.ctx}, {parallel} at once)")

    async def answer() -> None:
        announcing = asyncio.create_task(announce())
        await server.serve()
        await announcing

    def answer_http() -> None:
        try:
            asyncio.run(answer())
        finally:  # stopped, or never listening (the port taken): the model's loop ends too
            service.scheduler.stop()

    # the model runs in this thread, the one that loaded it (Scheduler.run_here says why), HTTP in another; Ctrl-C
    # is KeyboardInterrupt here ("interrupted", 130), SIGTERM a clean exit (0): both end the requests in flight as
    # cancelled, then let the HTTP server finish
    signal.signal(signal.SIGTERM, _stopped)
    # a background job of a script inherits SIGINT ignored: Ctrl-C (or kill -INT) must stop the server all the same
    signal.signal(signal.SIGINT, signal.default_int_handler)
    service.scheduler.will_run_here()  # before the HTTP server's startup would start a worker thread
    http = threading.Thread(target=answer_http, name="qwen2-http", daemon=True)
    http.start()
    try:
        service.scheduler.run_here()
    finally:
        server.should_exit = True
        http.join(timeout=30)
    if not server.started:
        raise BadInput(f"cannot listen on {host}:{port} (in use, or not an address of this machine)")


def _stopped(signum: int, frame: object) -> None:
    raise SystemExit(0)


def register(app: typer.Typer) -> None:
    """Add `serve` to the `qwen2` app."""
    app.command(name="serve")(serve)
