"""Grammar engines on CPU for JSON-schema constrained decoding: llguidance (what `qwen2 serve` uses), xgrammar and
outlines-core, on the real model's tokenizer, in one run.

  pip install llguidance xgrammar outlines-core
  python benchmarks/grammar_engines.py [--model DIR] [--repeats 5]

For each schema: the time to compile it (cold, the tokenizer already loaded: what a request with a new schema
pays before its first token) and the time to compute each next-token mask while a valid answer is fed token by
token (what every constrained token pays), median and p95. The engines take turns, repeat after repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

SCHEMAS = {
    "person": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "admin": {"type": "boolean"},
                "role": {"enum": ["user", "guest", "owner"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["name", "age", "admin", "role", "tags"],
            "additionalProperties": False,
        },
        {"name": "Ann Lee", "age": 30, "admin": False, "role": "owner", "tags": ["alpha", "beta", "gamma"]},
    ),
    "tool call": (
        {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer"},
                    },
                    "required": ["city", "unit", "days"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
        {"name": "get_weather", "arguments": {"city": "San Francisco", "unit": "celsius", "days": 3}},
    ),
}


class Llguidance:
    name = "llguidance"

    def __init__(self, model_dir: Path, stop_ids: list[int], vocab_size: int) -> None:
        import llguidance

        self.llguidance = llguidance
        self.tokenizer = llguidance.LLTokenizer((model_dir / "tokenizer.json").read_text(), eos_token=stop_ids)
        self.mask_buffer = torch.zeros((self.tokenizer.vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict):
        options: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        grammar = self.llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        return self.llguidance.LLMatcher(self.tokenizer, grammar)

    def mask(self, matcher) -> None:
        buffer = self.mask_buffer
        matcher.unsafe_compute_mask_ptr(buffer.data_ptr(), buffer.numel() * buffer.element_size())

    def advance(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, model_dir: Path, stop_ids: list[int], vocab_size: int) -> None:
        import xgrammar
        from transformers import AutoTokenizer

        self.xgrammar = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            AutoTokenizer.from_pretrained(model_dir), vocab_size=vocab_size, stop_token_ids=stop_ids
        )
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)

    def compile(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        return self.xgrammar.GrammarMatcher(compiled)

    def mask(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.bitmask)

    def advance(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, model_dir: Path, stop_ids: list[int], vocab_size: int) -> None:
        from outlines_core import Vocabulary  # type: ignore[import-untyped]

        from qwen2cli.tokenizer import Qwen2Tokenizer

        tokenizer = Qwen2Tokenizer.from_dir(model_dir)
        by_bytes: dict[bytes, list[int]] = {}
        for token_id in range(tokenizer.vocab_size):
            piece = tokenizer.token_bytes(token_id)
            if piece and token_id not in stop_ids:
                by_bytes.setdefault(piece, []).append(token_id)
        self.vocabulary = Vocabulary(stop_ids[-1], by_bytes)
        self.mask_buffer = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict):
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema  # type: ignore[import-untyped]

        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        return Guide(Index(regex, self.vocabulary))

    def mask(self, guide) -> None:
        guide.write_mask_into(self.mask_buffer.data_ptr(), self.mask_buffer.numel(), self.mask_buffer.element_size())

    def advance(self, guide, token: int) -> None:
        guide.advance(token)


def measure(engine, schema: dict, tokens: list[int]) -> tuple[float, list[float]]:
    started = time.perf_counter()
    matcher = engine.compile(schema)
    compile_s = time.perf_counter() - started
    steps = []
    for token in tokens:  # the answer's tokens; the last mask is the one that allows only the stop tokens
        started = time.perf_counter()
        engine.mask(matcher)
        steps.append(time.perf_counter() - started)
        engine.advance(matcher, token)
    return compile_s, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="an HF model directory (default: the real model)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.model is None:
        from devtools.real_model import real_hf_dir

        args.model = real_hf_dir()
    from qwen2cli.config import load_config
    from qwen2cli.tokenizer import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_dir(args.model)
    stop_ids = sorted(i for i in (tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")) if i)
    vocab_size = load_config(args.model).vocab_size
    engines = []
    for kind in (Llguidance, Xgrammar, OutlinesCore):
        started = time.perf_counter()
        engines.append(kind(args.model, stop_ids, vocab_size))
        print(f"{kind.name}: tokenizer set up in {time.perf_counter() - started:.2f} s")
    for name, (schema, answer) in SCHEMAS.items():
        tokens = tokenizer.encode(json.dumps(answer))
        results: dict[str, tuple[list[float], list[float]]] = {engine.name: ([], []) for engine in engines}
        for repeat in range(args.repeats):
            for engine in engines if repeat % 2 == 0 else engines[::-1]:
                compile_s, steps = measure(engine, schema, tokens)
                results[engine.name][0].append(compile_s)
                results[engine.name][1].extend(steps)
        print(f"\n{name} ({len(tokens)} tokens)  {'compile ms':>11} {'mask ms p50':>12} {'mask ms p95':>12}")
        for engine_name, (compiles, steps) in results.items():
            steps.sort()
            compile_ms, p50_ms = statistics.median(compiles) * 1e3, statistics.median(steps) * 1e3
            p95_ms = steps[int(0.95 * (len(steps) - 1))] * 1e3
            print(f"  {engine_name:<14} {compile_ms:>11.2f} {p50_ms:>12.3f} {p95_ms:>12.3f}")


if __name__ == "__main__":
    main()
