"""ChatML rendering identical to Qwen2/Qwen2.5 chat templates; user text can never forge a special token."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import BadInput
from .tokenizer import Qwen2Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
_TEMPLATE_DEFAULT = re.compile(r"<\|im_start\|>system\\n(.*?)<\|im_end\|>")


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system prompt the checkpoint's template inserts when the conversation has none (None: it inserts none)."""
    if chat_template is None:
        return QWEN2_DEFAULT_SYSTEM
    if IM_START not in chat_template:
        return None
    found = _TEMPLATE_DEFAULT.findall(chat_template)
    return found[-1] if found else None


def _with_system(messages: Sequence[Message], default_system: str | None) -> list[Message]:
    if messages and messages[0].role == "system" or default_system is None:
        return list(messages)
    return [Message("system", default_system), *messages]


def render_text(messages: Sequence[Message], *, default_system: str | None, add_generation_prompt: bool = True) -> str:
    """The prompt text exactly as the checkpoint's chat template renders it."""
    parts = [f"{IM_START}{m.role}\n{m.content}{IM_END}\n" for m in _with_system(messages, default_system)]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def encode_chat(
    tokenizer: Qwen2Tokenizer,
    messages: Sequence[Message],
    *,
    default_system: str | None,
    add_generation_prompt: bool = True,
    content_ids: Sequence[list[int] | None] = (),
) -> list[int]:
    """Token ids of the rendered prompt: markers as special ids, every text segment with encode_ordinary.

    content_ids[i], when given, are message i's content tokens as the model produced them (a chat keeps its
    answers' own tokens, which may differ from re-encoding their text).
    """
    start, end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    if start is None or end is None:
        raise BadInput("this tokenizer has no ChatML tokens: use --raw")
    rendered = _with_system(messages, default_system)
    offset = len(rendered) - len(messages)
    ids: list[int] = []
    for index, message in enumerate(rendered):
        if index:
            ids.extend(tokenizer.encode_ordinary("\n"))
        ids.append(start)
        own = content_ids[index - offset] if 0 <= index - offset < len(content_ids) else None
        if own is None:
            ids.extend(tokenizer.encode_ordinary(f"{message.role}\n{message.content}"))
        else:
            ids.extend(tokenizer.encode_ordinary(f"{message.role}\n") + own)
        ids.append(end)
    if add_generation_prompt:
        if ids:
            ids.extend(tokenizer.encode_ordinary("\n"))
        ids.append(start)
        ids.extend(tokenizer.encode_ordinary("assistant\n"))
    elif ids:
        ids.extend(tokenizer.encode_ordinary("\n"))
    return ids
