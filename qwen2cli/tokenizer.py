"""The Qwen2 tokenizer on tiktoken: ids identical to Hugging Face `tokenizers` loading the same files."""
from __future__ import annotations

import codecs
import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tiktoken

from .errors import BadCheckpoint

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_PADDING = re.compile(r"\[PAD\d+\]")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: "Qwen2Tokenizer") -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id), final=False)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadCheckpoint(f"cannot read {path}: {exc}") from exc


def _pattern_from(pre_tokenizer: dict | None) -> str:
    """The Split regex of tokenizer.json's pre-tokenizer (Qwen2's own when it names none)."""
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            return step["pattern"]["Regex"]
    return QWEN2_PATTERN


def _normalizer_from(normalizer: dict | None) -> str | None:
    """'NFC' (Qwen's own files), None (what transformers writes from a GGUF); others are refused."""
    if not normalizer:
        return None
    kinds = [n.get("type") for n in normalizer.get("normalizers", [normalizer])]
    forms = [k for k in kinds if k in ("NFC", "NFD", "NFKC", "NFKD")]
    if len(forms) != len(kinds) or len(forms) > 1:
        raise BadCheckpoint(f"unsupported tokenizer normalizer {kinds}: qwen2cli handles NFC-style normalizers only")
    return forms[0] if forms else None


class Qwen2Tokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer; `encode` recognises added tokens, `encode_ordinary` never does."""

    def __init__(self, *, vocab: dict[str, int], merges: Sequence[tuple[str, str]], added: Sequence[dict],
                 pattern: str, normalizer: str | None, chat_template: str | None) -> None:
        to_byte = _byte_decoder()
        try:
            token_bytes = {token: bytes(to_byte[ch] for ch in token) for token in vocab}
        except KeyError as exc:
            raise BadCheckpoint(f"tokenizer vocabulary is not byte-level BPE (character {exc})") from exc
        # ranks follow merge order, as Hugging Face's BPE applies merges; single bytes come first
        ranks: dict[bytes, int] = {}
        for token, token_id in vocab.items():
            if len(token_bytes[token]) == 1:
                ranks[token_bytes[token]] = len(ranks)
        if len(ranks) != 256:
            raise BadCheckpoint(f"tokenizer vocabulary covers {len(ranks)} of the 256 bytes")
        for left, right in merges:
            ranks.setdefault(token_bytes[left] + token_bytes[right], len(ranks))
        by_bytes = {b: i for t, i in vocab.items() for b in (token_bytes[t],)}
        self._rank_to_id = [0] * len(ranks)
        for piece, rank in ranks.items():
            self._rank_to_id[rank] = by_bytes[piece]
        self._identity = all(rank == token_id for rank, token_id in enumerate(self._rank_to_id))
        self._bpe = tiktoken.Encoding("qwen2", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.special_tokens = {entry["content"]: int(entry["id"]) for entry in added}
        self._added_split = (re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True)) + ")")
                             if self.special_tokens else None)
        size = max([*vocab.values(), *self.special_tokens.values()]) + 1
        self._bytes_by_id: list[bytes] = [b""] * size
        for token, token_id in vocab.items():
            self._bytes_by_id[token_id] = token_bytes[token]
        for content, token_id in self.special_tokens.items():
            self._bytes_by_id[token_id] = content.encode("utf-8")
        self.vocab_size = size
        padding = {i for t, i in vocab.items() if _PADDING.fullmatch(t)}
        sampleable = size
        while sampleable > 0 and sampleable - 1 in padding:
            sampleable -= 1
        self.sampleable_size = sampleable  # ids at or past this are filler rows ([PAD...]) a model must never emit
        self._normal_form = normalizer
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, model_dir: Path) -> "Qwen2Tokenizer":
        """tokenizer.json, else vocab.json + merges.txt, with tokenizer_config.json's added tokens and template."""
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        template = config.get("chat_template")
        if template is None and (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # the list-of-named-templates form
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        config_added = [{"id": int(i), **entry} for i, entry in (config.get("added_tokens_decoder") or {}).items()]
        if (model_dir / "tokenizer.json").is_file():
            data = _read_json(model_dir / "tokenizer.json")
            model = data.get("model") or {}
            if model.get("type") != "BPE":
                raise BadCheckpoint(f"tokenizer.json holds a {model.get('type')} model; Qwen2 uses byte-level BPE")
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return cls(vocab=model["vocab"], merges=merges, added=data.get("added_tokens") or config_added,
                       pattern=_pattern_from(data.get("pre_tokenizer")),
                       normalizer=_normalizer_from(data.get("normalizer")), chat_template=template)
        if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
            lines = (model_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version")]
            return cls(vocab=_read_json(model_dir / "vocab.json"), merges=merges, added=config_added,
                       pattern=QWEN2_PATTERN, normalizer="NFC", chat_template=template)
        raise BadCheckpoint(f"no tokenizer.json or vocab.json+merges.txt in {model_dir}")

    def _ids(self, ranks: list[int]) -> list[int]:
        return ranks if self._identity else [self._rank_to_id[r] for r in ranks]

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: special-token strings stay text."""
        if self._normal_form:
            text = unicodedata.normalize(self._normal_form, text)
        return self._ids(self._bpe.encode_ordinary(text))

    def encode(self, text: str) -> list[int]:
        """Token ids as `tokenizers` gives them: added/special-token strings become their ids."""
        if self._added_split is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for index, part in enumerate(self._added_split.split(text)):
            if index % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token's text as UTF-8)."""
        return self._bytes_by_id[token_id] if 0 <= token_id < len(self._bytes_by_id) else b""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        """Id of an added/special token, or of a plain-text token given by its text."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        ids = self._ids(self._bpe.encode_ordinary(token)) if token else []
        return ids[0] if len(ids) == 1 else None

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)
