"""The `qwen2` command: one thin Typer function per command over a library call. No torch at import time."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from .errors import BadInput, OutputClosed, report
from .load_options import LoadOptions
from .model_args import local_model, model_to_load
from .model_tools import load_shown
from .options import (
    AttentionOpt,
    CtxOpt,
    DeviceOpt,
    DtypeOpt,
    FloatHeadOpt,
    JsonOpt,
    KvCacheOpt,
    LoadInOpt,
    MaxTokensOpt,
    MinPOpt,
    ModelArg,
    ModelOpt,
    RepeatPenaltyOpt,
    SeedOpt,
    StrictOpt,
    SystemOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    UrlOpt,
)

if TYPE_CHECKING:
    from .remote import RemoteSampling

app = typer.Typer(
    name="qwen2",
    help="Run Qwen2 / Qwen2.5 models on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _sampling(engine, wanted: RemoteSampling):
    """SamplingParams from the options given, the rest from the model's generation_config.json."""
    from .sampling import SamplingParams

    defaults = engine.config.generation
    return SamplingParams(
        temperature=defaults.temperature if wanted.temperature is None else wanted.temperature,
        top_p=defaults.top_p if wanted.top_p is None else wanted.top_p,
        top_k=defaults.top_k if wanted.top_k is None else wanted.top_k,
        min_p=defaults.min_p if wanted.min_p is None else wanted.min_p,
        repeat_penalty=defaults.repetition_penalty if wanted.repeat_penalty is None else wanted.repeat_penalty,
        seed=wanted.seed,
        max_tokens=defaults.max_new_tokens if wanted.max_tokens is None else wanted.max_tokens,
    )


def _read_stdin(*, strict: bool = False) -> str:
    """Piped standard input, or '' when stdin is a terminal or closed; not UTF-8: a warning, or refused if strict."""
    from .console import warn
    from .input_text import Utf8Input

    if sys.stdin is None or sys.stdin.isatty():
        return ""
    return Utf8Input(strict=strict, warn=warn).read(sys.stdin.buffer)


@app.command()
def run(
    model: ModelArg = None,
    prompt: Annotated[str | None, typer.Argument(help="The prompt; piped stdin is appended to it.")] = None,
    model_option: ModelOpt = None,
    url: UrlOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Plain completion: no chat template.")] = False,
    json_schema: Annotated[
        str | None, typer.Option("--json-schema", help="The answer is JSON valid under this schema file (enforced).")
    ] = None,
    grammar: Annotated[
        str | None,
        typer.Option("--grammar", help="The answer follows this grammar file: Lark (llguidance's dialect) or GBNF."),
    ] = None,
    json_output: JsonOpt = False,
    strict: StrictOpt = False,
    system: SystemOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    ctx: CtxOpt = None,
    kv_cache: KvCacheOpt = "float",
    attention: AttentionOpt = "default",
    load_in: LoadInOpt = None,
    float_head: FloatHeadOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Answer one prompt and print only the answer on stdout. A lone argument that names no model (an alias, an
    installed name, a path, an org/name id) is the prompt, answered by the default model."""
    from .console import print_json, write_answer
    from .registry import split_model_and_prompt
    from .remote import RemoteSampling

    wanted = RemoteSampling(temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens)
    options = LoadOptions(
        device=device,
        dtype=dtype,
        ctx=ctx,
        kv_cache=kv_cache,
        attention=attention,
        load_in=load_in,
        float_head=float_head,
    )
    from .output_grammar import OutputGrammar

    shape = OutputGrammar.from_files(json_schema=json_schema, grammar=grammar)
    server = None
    if url is not None:
        from .remote import connect

        server, prompt = connect(url, model, prompt, model_option=model_option)
    else:
        model, prompt = split_model_and_prompt(model, prompt, model=model_option)
    piped = _read_stdin(strict=strict).rstrip("\n")
    text = "\n".join(part for part in (prompt, piped) if part)
    if not text:
        raise BadInput("no prompt: give PROMPT or pipe text on stdin")
    if server is not None:
        from .remote import remote_answer

        on_text = None if json_output else write_answer
        response_format = shape.response_format() if shape is not None else None
        result = remote_answer(
            server, text, raw=raw, system=system, sampling=wanted, on_text=on_text, response_format=response_format
        )
        if json_output:
            print_json(result)
        elif sys.stdout.isatty():
            write_answer("\n")
        return
    model_dir, _ = model_to_load(model, options)
    from .runner import answer_once  # torch loads here

    result = answer_once(
        model_dir,
        text,
        options=options,
        raw=raw,
        system=system,
        sampling=lambda engine: _sampling(engine, wanted),
        on_text=None if json_output else write_answer,
        constraint=shape.constraint if shape is not None else None,
    )
    if json_output:
        print_json(result)
    elif sys.stdout.isatty():
        write_answer("\n")


@app.command()
def chat(
    model: ModelArg = None,
    model_option: ModelOpt = None,
    url: UrlOpt = None,
    load: Annotated[str | None, typer.Option("--load", help="Continue a conversation saved with /save.")] = None,
    strict: StrictOpt = False,
    system: SystemOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    ctx: CtxOpt = None,
    kv_cache: KvCacheOpt = "float",
    attention: AttentionOpt = "default",
    load_in: LoadInOpt = None,
    float_head: FloatHeadOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Chat in a REPL; with stdin not a terminal, one user turn per input line. An argument that names no model is
    the first message, to the default model."""
    from .remote import RemoteSampling

    wanted = RemoteSampling(temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens)
    options = LoadOptions(
        device=device,
        dtype=dtype,
        ctx=ctx,
        kv_cache=kv_cache,
        attention=attention,
        load_in=load_in,
        float_head=float_head,
    )
    from .repl import run_chat

    if url is not None:
        from .remote import RemoteChat, connect

        server, first_message = connect(url, model, None, model_option=model_option)
        remote = RemoteChat(server, params=wanted, system=system)
        if load:
            remote.load(Path(load))
            remote.system = system if system is not None else remote.system
        # the REPL drives a remote conversation through the same methods as a local one
        raise typer.Exit(
            run_chat(cast(Any, remote), model_name=server.model, strict=strict, first_message=first_message)
        )
    from .registry import split_model_and_prompt
    from .session import ChatSession
    from .transcript import read_transcript

    model, first_message = split_model_and_prompt(model, None, model=model_option)
    transcript = read_transcript(Path(load)) if load else None
    if model is None and transcript is not None:
        model = transcript.get("model")
    engine = load_shown(model_to_load(model, options)[0], options)
    params = _sampling(engine, wanted)
    session = ChatSession(engine, params=params, system=system)
    if load:
        session.load(Path(load))
        if system is not None:
            session.system = system
    raise typer.Exit(
        run_chat(session, model_name=str(model or engine.model_dir), strict=strict, first_message=first_message)
    )


@app.command()
def tokenize(model: ModelArg = None, json_output: JsonOpt = False) -> None:
    """Token ids of the text on stdin."""
    from .console import print_json, write_answer
    from .tokenizer import Qwen2Tokenizer

    ids = Qwen2Tokenizer.from_dir(local_model(model)).encode(_read_stdin())
    if json_output:
        print_json(ids)
    else:
        write_answer(" ".join(map(str, ids)) + "\n")


@app.command()
def info(
    model: ModelArg = None,
    json_output: JsonOpt = False,
    memory: Annotated[
        str | None,
        typer.Option("--memory", help="A memory budget (e.g. 24GB): report the longest context it holds."),
    ] = None,
) -> None:
    """What a model is: architecture, size, context, quantization, KV bytes per token, files."""
    from .console import print_json
    from .model_info import describe

    facts = describe(local_model(model), memory=memory)
    if json_output:
        print_json(facts)
    else:
        width = max(map(len, facts))
        for key, value in facts.items():
            sys.stdout.write(f"{key:<{width}}  {value}\n")


@app.command()
def bench(
    model: ModelArg = None,
    prompt_tokens: Annotated[int, typer.Option("-p", "--prompt-tokens", help="Prompt length.")] = 512,
    new_tokens: Annotated[int, typer.Option("-n", "--new-tokens", help="Tokens to decode.")] = 128,
    json_output: JsonOpt = False,
    load_in: LoadInOpt = None,
    float_head: FloatHeadOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Prefill and decode tokens/s, time to first token, load time, peak RSS."""
    from .console import print_json

    options = LoadOptions(device=device, dtype=dtype, load_in=load_in, float_head=float_head)
    if prompt_tokens < 1 or new_tokens < 1:
        raise BadInput("-p and -n must be at least 1")
    model_dir, _ = model_to_load(model, options)
    from .bench import as_dict, run_bench  # torch loads here

    result = as_dict(run_bench(model_dir, options, prompt_tokens=prompt_tokens, new_tokens=new_tokens))
    if json_output:
        print_json(result)
    else:
        for key, value in result.items():
            shown = f"{value:.2f}" if isinstance(value, float) else value
            sys.stdout.write(f"{key:<14} {shown}\n")


# commands defined in modules of their own, each with a register(app): they never import this module
from . import model_tools, serve_command, store_commands  # noqa: E402

store_commands.register(app)
model_tools.register(app)
serve_command.register(app)


def main() -> None:
    """Console-script entry point: run the app, turning every failure into one line and an exit code."""
    _leave(_run_app())


def _warning_printer(python_show: Any) -> Any:
    """A warnings.showwarning that prints a failed build of the native kernels as one line on stderr (with the
    compiler's output under QWEN2_DEBUG=1) and leaves any other warning to `python_show`."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        native = sys.modules.get("qwen2cli.quant.native")  # loaded by then if the warning is its own
        if native is None or not issubclass(category, native.KernelBuildWarning):
            python_show(message, category, filename, lineno, file, line)
            return
        output = getattr(message, "output", "")
        debug = os.environ.get("QWEN2_DEBUG") == "1"
        hint = " (QWEN2_DEBUG=1 shows the compiler's output)" if output and not debug else ""
        sys.stderr.write(f"warning: {message}{hint}\n")
        if output and debug:
            sys.stderr.write(output.rstrip() + "\n")

    return show


def _run_app() -> int:
    """The app's exit code; every failure is reported as one line on stderr."""
    from typer import Abort, Exit

    try:  # typer >= 0.24 vendors click
        from typer._click.exceptions import ClickException, NoArgsIsHelpError
    except ImportError:  # older typer raises click's own classes (the same names; mypy sees one typer only)
        from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[assignment]

    try:
        with warnings.catch_warnings():  # restores Python's own printer on the way out
            warnings.showwarning = _warning_printer(warnings.showwarning)
            result = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:  # its message is the help, or empty where rich has already printed it
        if exc.format_message().strip():
            sys.stdout.write(exc.format_message() + "\n")
        return 0
    except Exit as exc:
        return exc.exit_code
    except ClickException as exc:
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return 1
    except (Abort, KeyboardInterrupt) as exc:
        return report(KeyboardInterrupt()) if isinstance(exc, Abort) else report(exc)
    except (BrokenPipeError, OutputClosed):
        _quiet_broken_pipe()
        return 0
    except Exception as exc:  # noqa: BLE001 - the one place every error becomes a message
        return report(exc)
    return result if isinstance(result, int) else 0


def _leave(code: int) -> None:
    """Flush the output, run the exit handlers, and end the process without tearing the interpreter down: with
    torch and a model loaded, that teardown (freeing every module and object) took 0.3-0.5 s after the answer."""
    import atexit

    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
    try:
        sys.stderr.flush()
    except (OSError, ValueError):  # nowhere left to say anything
        pass
    atexit._run_exitfuncs()
    os._exit(code)


def _quiet_broken_pipe() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain about the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
