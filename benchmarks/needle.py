"""Needle in a haystack on a real model: a fact planted at several depths of a long context, then asked for.

  python benchmarks/needle.py [--model DIR] [--lengths 8192,16384,32768] [--depths 10] [--attention default|dca]
                              [--dtype bfloat16] [--kv-cache float|int8] [--device auto|cpu|cuda]
                              [--haystack FILE]

Prints one row per (length, depth): whether the greedy answer holds the planted passphrase, the prefill tok/s of
that length's haystack (prefilled once; each depth reuses the cached haystack before its needle, deepest first)
and the process's peak RSS so far (on CUDA: the GPU memory allocated at its peak).
Contexts past the model's trained length turn YaRN on (default attention) or use dual chunk attention (dca).
The haystack is this machine's own documentation text (/usr/share/common-licenses and Python's stdlib docstrings),
or FILE's text (`--haystack`: the same text on another machine, say a GPU one).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from qwen2cli.load_options import LoadOptions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NEEDLE = "The secret passphrase for the vault is 'amber-harmonica-417'."
QUESTION = "What is the secret passphrase for the vault? Answer with the passphrase only."
ANSWER = "amber-harmonica-417"


def haystack_text() -> str:
    """Plain English text from files every Debian machine has."""
    parts = []
    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file():
            parts.append(path.read_text(errors="ignore"))
    import argparse as ap
    import email
    import http.client
    import inspect
    import json  # noqa: E401 - docstrings as prose
    import logging
    import textwrap

    for module in (json, ap, email, http.client, logging, textwrap):
        parts.append(inspect.getdoc(module) or "")
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--depths", type=int, default=10)
    parser.add_argument("--attention", default="default", choices=["default", "dca"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache", default="float", choices=["float", "int8"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--haystack", type=Path, help="a text file to use as the haystack")
    args = parser.parse_args()
    if args.model is None:
        from devtools.real_model import real_hf_dir

        args.model = str(real_hf_dir())
    import torch

    from qwen2cli.chatml import Message, default_system_prompt, encode_chat
    from qwen2cli.generate import generate, load_engine, prefill
    from qwen2cli.sampling import SamplingParams

    lengths = [int(x) for x in args.lengths.split(",")]
    engine = load_engine(
        Path(args.model),
        LoadOptions(
            device=args.device, dtype=args.dtype, ctx=max(lengths), kv_cache=args.kv_cache, attention=args.attention
        ),
    )
    text = args.haystack.read_text() if args.haystack else haystack_text()
    filler = engine.tokenizer.encode_ordinary(text)
    params = SamplingParams(temperature=0, max_tokens=16, repeat_penalty=1.0)
    system = default_system_prompt(engine.tokenizer.chat_template)
    on_gpu = engine.loaded.device.type == "cuda"  # there the memory that counts is the GPU's
    print(
        f"device={engine.loaded.device} attention={args.attention} dtype={args.dtype} kv_cache={args.kv_cache} "
        f"rope_scaling={engine.config.rope_scaling}"
    )
    print(
        f"{'length':>8} {'depth%':>7} {'found':>6} {'prefill tok/s':>14} "
        f"{'peak GPU MiB' if on_gpu else 'peak RSS MiB':>13}  answer"
    )
    base = encode_chat(engine.tokenizer, [Message("user", "")], default_system=system)
    end_of_turn = engine.tokenizer.token_to_id("<|im_end|>")
    if end_of_turn is None:
        raise SystemExit("the model's tokenizer has no <|im_end|>: not a ChatML model")
    insert_at = len(base) - 1 - base[::-1].index(end_of_turn)  # the user turn's end
    head, foot = base[:insert_at], base[insert_at:]
    needle = engine.tokenizer.encode_ordinary("\n" + NEEDLE + "\n")
    question = engine.tokenizer.encode_ordinary("\n\n" + QUESTION)
    for length in lengths:
        budget = length - len(base) - len(needle) - len(question) - 16
        if budget < 1:
            raise SystemExit(f"--lengths {length} leaves no room for a haystack")
        hay = (filler * (budget // len(filler) + 1))[:budget]
        # the haystack alone once: its prefill speed is the row's, and every depth reuses its cached prefix
        cache = engine.new_cache(length)
        started = time.perf_counter()
        with torch.inference_mode():
            prefill(engine, cache, head + hay)
        rate = (len(head) + len(hay)) / (time.perf_counter() - started)
        cuts = [int(len(hay) * index / max(1, args.depths - 1)) for index in range(args.depths)]
        for cut in sorted(cuts, reverse=True):  # deepest first: each run keeps the haystack before its needle
            ids = head + hay[:cut] + needle + hay[cut:] + question + foot
            cache.trim(len(head) + cut)  # the deeper run before extended the cache past it
            text = ""
            with torch.inference_mode():
                for chunk in generate(engine, ids, params=params, cache=cache):
                    text += chunk.text
            found = ANSWER in text
            rss = (
                torch.cuda.max_memory_allocated(engine.loaded.device) / 2**20
                if on_gpu
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            )
            print(
                f"{len(ids):>8} {100 * cut / len(hay):>7.0f} {str(found):>6} {rate:>14.1f} {rss:>13.0f}  "
                f"{text.strip()[:40]!r}",
                flush=True,
            )
        del cache  # the next length's cache is not allocated beside this one


if __name__ == "__main__":
    main()
