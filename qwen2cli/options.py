"""Shared Annotated option aliases, so every command spells an option the same way."""

from __future__ import annotations

from typing import Annotated

import typer

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Catalogue alias, Hub repo id, local directory or .gguf file.", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", help="0 is greedy. Default: the model's.")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Keep the k likeliest tokens (0: off).")]
MinPOpt = Annotated[float | None, typer.Option("--min-p", help="Drop tokens below min_p x the top probability.")]
RepeatPenaltyOpt = Annotated[float | None, typer.Option("--repeat-penalty", help="1.0 turns it off.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Same seed, same text.")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Stop after this many new tokens.")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="System prompt (default: the model's own).")]
CtxOpt = Annotated[
    int | None,
    typer.Option(
        "--ctx",
        help="Context window in tokens (KV cache size). Default: 4096, or the model's trained context if shorter; "
        "a longer one than trained scales RoPE with YaRN.",
        show_default=False,
    ),
]
KvCacheOpt = Annotated[str, typer.Option("--kv-cache", help="float, or int8 (half the memory).")]
AttentionOpt = Annotated[
    str, typer.Option("--attention", help="default, or dca (dual chunk attention for long contexts).")
]
LoadInOpt = Annotated[
    str | None, typer.Option("--load-in", help="8bit or 4bit: quantize an unquantized model as it loads.")
]
FloatHeadOpt = Annotated[
    bool,
    typer.Option(
        "--float-head", help="CPU: keep a quantized model's head in float (default: int8 rows, faster and smaller)."
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Refuse standard input that is not UTF-8 (default: read it as U+FFFD, warn once)."),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "-m", "--model", help="The model, named explicitly: then every argument is the prompt.", show_default=False
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Ask an OpenAI-compatible server (such as `qwen2 serve`'s http://127.0.0.1:8000) instead of loading a "
        "model; OPENAI_API_KEY is sent as its key when set.",
        show_default=False,
    ),
]
