"""`--json-schema FILE` / `--grammar FILE`: the shape an answer must take, read before anything heavy loads and
enforced by constrained decoding (llguidance, through qwen2cli.serve.constrain)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadInput

if TYPE_CHECKING:
    from .generate import Engine, TokenConstraint


@dataclass(frozen=True)
class OutputGrammar:
    """A JSON schema (kind "json_schema", source a dict) or a Lark/GBNF grammar (kind "grammar", source its text)."""

    kind: str
    source: Any

    @classmethod
    def from_files(cls, *, json_schema: str | None, grammar: str | None) -> OutputGrammar | None:
        if json_schema is not None and grammar is not None:
            raise BadInput("give --json-schema or --grammar, not both")
        path = json_schema or grammar
        if path is None:
            return None
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
        if grammar is not None:
            return cls("grammar", text)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path} is not JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise BadInput(f"{path} must hold a JSON schema object")
        return cls("json_schema", schema)

    def constraint(self, engine: Engine) -> TokenConstraint:
        """The constraint for a loaded model (llguidance must be installed)."""
        from .serve.constrain import compiler_for

        compiler = compiler_for(engine)
        return compiler.json_schema(self.source) if self.kind == "json_schema" else compiler.lark(self.source)

    def response_format(self) -> dict[str, Any]:
        """The same demand as an OpenAI response_format (a server takes JSON schemas, not grammars)."""
        if self.kind != "json_schema":
            raise BadInput("--grammar needs a local model; with --url give --json-schema")
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": self.source, "strict": True}}
