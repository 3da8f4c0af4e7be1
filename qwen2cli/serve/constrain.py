"""Constrained decoding with llguidance: JSON schemas and Qwen2.5 tool calls as grammars, applied as a logits mask."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MissingDependency
from ..generate import Engine
from .schema import RequestError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# one spelling, json.dumps' (", " and ": "), as Qwen2.5's template writes tool calls: no runaway whitespace
PLAIN_TEXT = f"/(?s:.*)/ & ~/(?s:.*{TOOL_CALL_OPEN}.*)/"  # a Lark terminal: any text without a call marker
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:
        raise MissingDependency("constrained output needs llguidance: pip install 'qwen2cli[serve]'") from exc
    return llguidance


class Constraint:
    """One request's grammar state: which tokens may come next, advanced by each token chosen."""

    def __init__(self, matcher: Any, *, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """Boolean (vocab,) mask of the tokens the grammar allows next (the stop tokens once it is complete)."""
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.zeros(self._vocab_size, dtype=torch.bool)
        count = min(len(bits), self._vocab_size)
        mask[:count] = torch.from_numpy(bits[:count].astype(bool))
        return mask

    def advance(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"the grammar rejected a token it allowed: {self._matcher.get_error()}")


def compiler_for(engine: Engine) -> GrammarCompiler:
    """The GrammarCompiler of a loaded model; Qwen2.5's tool-call markers by id where its tokenizer has them."""
    markers = {m: i for m in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE) if (i := engine.tokenizer.token_to_id(m)) is not None}
    return GrammarCompiler(
        engine.model_dir, vocab_size=engine.config.vocab_size, stop_ids=engine.stop_ids, special_ids=markers
    )


class GrammarCompiler:
    """Builds Constraints for one model: its tokenizer as llguidance sees it, made on first use (a second or so)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        vocab_size: int,
        stop_ids: frozenset[int],
        special_ids: dict[str, int],
    ) -> None:
        self._model_dir = Path(model_dir)
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self.special_ids = special_ids
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                llguidance = _llguidance()
                text = (self._model_dir / "tokenizer.json").read_text(encoding="utf-8")
                self._tokenizer = llguidance.LLTokenizer(text, eos_token=self._stop_ids)
            return self._tokenizer

    def _compile(self, grammar: str) -> Constraint:
        llguidance = _llguidance()
        tokenizer = self._ll_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error and not error.startswith("WARNING"):
            raise RequestError(f"cannot build a grammar for this request: {error}", param="response_format")
        return Constraint(llguidance.LLMatcher(tokenizer, grammar, log_level=0), vocab_size=self._vocab_size)

    def json_schema(self, schema: dict[str, Any]) -> Constraint:
        """Output that is one JSON value valid under `schema` ({"type": "object"} for json_object)."""
        llguidance = _llguidance()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise RequestError(f"unusable JSON schema: {exc}", param="response_format") from exc
        return self._compile(grammar)

    def lark(self, grammar: str) -> Constraint:
        """Output matching a Lark grammar in llguidance's dialect (GBNF is converted)."""
        llguidance = _llguidance()
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            lark = any_to_lark(grammar)
        except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions on bad input
            raise RequestError(f"cannot read the grammar: {exc}", param="grammar") from exc
        return self._compile(llguidance.LLMatcher.grammar_from_lark(lark))

    def plain_text(self) -> Constraint:
        """Any text without a tool-call marker."""
        llguidance = _llguidance()
        return self._compile(llguidance.LLMatcher.grammar_from_lark(f"start: TEXT\nTEXT: {PLAIN_TEXT}"))

    def _marker(self, text: str) -> str:
        """A tool-call marker in Lark: the added token by id where the tokenizer has it, else the literal text."""
        token_id = self.special_ids.get(text)
        return f"<[{token_id}]>" if token_id is not None else json.dumps(text)

    def tool_calls(self, tools: list[dict[str, Any]], *, mode: str, parallel: bool) -> Constraint:
        """Qwen2.5 tool calls, each `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, for `tools`.

        mode "required": one or more calls and nothing else; "auto": either plain text without a call marker, or calls.
        """
        bodies = []
        for tool in tools:
            function = tool["function"]
            call_schema = {
                "type": "object",
                "properties": {
                    "name": {"const": function["name"]},
                    "arguments": function.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
                "x-guidance": JSON_OPTIONS,
            }
            bodies.append(f"%json {json.dumps(call_schema)}")
        repeat = ' ("\\n" call)*' if parallel else ""
        lines = [
            f"calls: call{repeat}",
            f'call: {self._marker(TOOL_CALL_OPEN)} "\\n" body "\\n" {self._marker(TOOL_CALL_CLOSE)}',
            "body: " + " | ".join(bodies),
        ]
        if mode == "required":
            lines.insert(1, "start: calls")
        else:
            lines.insert(1, "start: TEXT | calls")
            lines.append(f"TEXT: {PLAIN_TEXT}")
        llguidance = _llguidance()
        return self._compile(llguidance.LLMatcher.grammar_from_lark("\n".join(lines)))
