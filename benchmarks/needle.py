"""Needle in a haystack on a real model: a fact planted at several depths of a long context, then asked for.

  python benchmarks/needle.py [--model DIR] [--lengths 8192,16384,32768] [--depths 10] [--attention default|dca]
                              [--dtype bfloat16] [--kv-cache float|int8]

Prints one row per (length, depth): whether the greedy answer holds the planted passphrase, and prefill tok/s.
Contexts past the model's trained length turn YaRN on (default attention) or use dual chunk attention (dca).
The haystack is this machine's own documentation text (/usr/share/common-licenses and Python's stdlib docstrings).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    import inspect
    import json, argparse as ap, email, http.client, logging, textwrap  # noqa: E401 - docstrings as prose
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
    args = parser.parse_args()
    if args.model is None:
        from tests.real_model import real_hf_dir

        args.model = str(real_hf_dir())
    import torch

    from qwen2cli.chatml import Message, default_system_prompt, encode_chat
    from qwen2cli.generate import generate, load_engine
    from qwen2cli.sampling import SamplingParams

    lengths = [int(x) for x in args.lengths.split(",")]
    engine = load_engine(Path(args.model), device="cpu", dtype=args.dtype, ctx=max(lengths) + 64,
                         kv_cache=args.kv_cache, attention=args.attention)
    filler = engine.tokenizer.encode_ordinary(haystack_text())
    params = SamplingParams(temperature=0, max_tokens=16, repeat_penalty=1.0)
    system = default_system_prompt(engine.tokenizer.chat_template)
    print(f"attention={args.attention} dtype={args.dtype} kv_cache={args.kv_cache} rope_scaling={engine.config.rope_scaling}")
    print(f"{'length':>8} {'depth%':>7} {'found':>6} {'prefill tok/s':>14}  answer")
    for length in lengths:
        budget = length - 80
        hay = (filler * (budget // len(filler) + 1))[:budget]
        for index in range(args.depths):
            depth = index / max(1, args.depths - 1)
            cut = int(len(hay) * depth)
            context = engine.tokenizer.decode(hay[:cut]) + "\n" + NEEDLE + "\n" + engine.tokenizer.decode(hay[cut:])
            ids = encode_chat(engine.tokenizer, [Message("user", context + "\n\n" + QUESTION)], default_system=system)
            cache = engine.new_cache(len(ids) + 32)
            text, stats = "", None
            with torch.inference_mode():
                for chunk in generate(engine, ids, params=params, cache=cache):
                    text += chunk.text
                    stats = chunk.stats or stats
            found = ANSWER in text
            print(f"{len(ids):>8} {depth * 100:>7.0f} {str(found):>6} {stats.prefill_tok_s:>14.1f}  {text.strip()[:40]!r}",
                  flush=True)


if __name__ == "__main__":
    main()
