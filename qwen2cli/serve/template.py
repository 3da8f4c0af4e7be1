"""The checkpoint's own Jinja chat template, rendered with jinja2 the way transformers' apply_chat_template does."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import BadCheckpoint
from .schema import RequestError


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    """transformers' tojson filter: json.dumps without HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _special_token_texts(model_dir: Path) -> dict[str, str]:
    """bos_token, eos_token, ... as tokenizer_config.json names them (the template may refer to them)."""
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    found = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found[name] = value
    return found


class ChatTemplate:
    """A compiled chat template: render(messages, tools) -> the prompt text, as transformers renders it."""

    def __init__(self, source: str, *, special_tokens: dict[str, str]) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as exc:
            raise BadCheckpoint(f"the chat template does not compile: {exc}") from exc
        self._special_tokens = special_tokens

    @classmethod
    def from_model(cls, model_dir: Path, source: str | None) -> ChatTemplate | None:
        """The template the tokenizer read (tokenizer_config.json or chat_template.jinja); None when it has none."""
        if source is None:
            return None
        return cls(source, special_tokens=_special_token_texts(Path(model_dir)))

    def render(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text; a template that rejects the conversation (raise_exception) is a RequestError."""
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise RequestError(f"the model's chat template rejects these messages: {exc}", param="messages") from exc
