"""The Qwen2 tokenizer on tiktoken: ids identical to Hugging Face `tokenizers` loading the same files."""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import tiktoken

from .errors import BadCheckpoint
from .tokenizer_tables import AddedToken, NormalForm, TokenizerTables, cache_path, load_tables, save_tables

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
NORMAL_FORMS: tuple[NormalForm, ...] = ("NFC", "NFD", "NFKC", "NFKD")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class ByteLevelAlphabet:
    """Converts byte-level vocabulary strings ("Ġthe") to the bytes they stand for, as `tokenizers` decodes them."""

    def __init__(self) -> None:
        decoder = _byte_decoder()
        self._chars = frozenset(decoder)
        self._to_latin1 = str.maketrans({char: chr(byte) for char, byte in decoder.items()})

    def covers(self, token: str) -> bool:
        return self._chars.issuperset(token)

    def to_bytes(self, token: str) -> bytes:
        """Byte-level strings map char by char; any other string stands for its own UTF-8 (tokenizers' rule)."""
        return token.translate(self._to_latin1).encode("latin-1") if self.covers(token) else token.encode("utf-8")


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Qwen2Tokenizer) -> None:
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


def _pattern_from(pre_tokenizer: dict[str, Any] | None) -> str:
    """The regex of Qwen2's pre-tokenizer (Split, then ByteLevel without its own regex); others are refused."""
    steps: list[dict[str, Any]] = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    split, byte_level = steps if len(steps) == 2 else [{}, {}]
    if (
        split.get("type") == "Split"
        and "Regex" in split.get("pattern", {})
        and not split.get("invert")
        and split.get("behavior") == "Isolated"
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("use_regex", True)
        and not byte_level.get("add_prefix_space")
    ):
        return split["pattern"]["Regex"]
    kinds = [step.get("type") for step in steps]
    raise BadCheckpoint(f"unsupported tokenizer pre-tokenizer {kinds}: qwen2cli handles Qwen2's Split + ByteLevel")


def _normalizer_from(normalizer: dict[str, Any] | None) -> NormalForm | None:
    """'NFC' (Qwen's own files), None (what transformers writes from a GGUF); others are refused."""
    if not normalizer:
        return None
    kinds = [n.get("type") for n in normalizer.get("normalizers", [normalizer])]
    forms = [k for k in kinds if k in NORMAL_FORMS]
    if len(forms) != len(kinds) or len(forms) > 1:
        raise BadCheckpoint(f"unsupported tokenizer normalizer {kinds}: qwen2cli handles NFC-style normalizers only")
    return forms[0] if forms else None


def _added_tokens_from(entries: Sequence[dict]) -> list[AddedToken]:
    added = []
    for entry in entries:
        if entry.get("lstrip") or entry.get("rstrip") or entry.get("single_word"):
            raise BadCheckpoint(f"added token {entry['content']!r} uses lstrip/rstrip/single_word: not supported")
        if entry["content"]:
            added.append(
                AddedToken(
                    content=entry["content"],
                    id=int(entry["id"]),
                    special=bool(entry.get("special")),
                    normalized=bool(entry.get("normalized", not entry.get("special"))),
                )
            )
    return added


def build_tables(
    *,
    vocab: dict[str, int],
    merges: Sequence[tuple[str, str]],
    added: Sequence[AddedToken],
    pattern: str,
    normalizer: NormalForm | None,
    chat_template: str | None,
) -> TokenizerTables:
    """Ranks in merge order (the order Hugging Face's BPE applies merges), single bytes first."""
    alphabet = ByteLevelAlphabet()
    ranks: dict[bytes, int] = {alphabet.to_bytes(t): 0 for t in vocab if len(t) == 1 and alphabet.covers(t)}
    if len(ranks) != 256:
        raise BadCheckpoint(f"tokenizer vocabulary covers {len(ranks)} of the 256 bytes")
    for left, right in merges:
        if left + right not in vocab:
            raise BadCheckpoint(f"tokenizer merge {left!r} + {right!r} makes a token missing from the vocabulary")
        if not alphabet.covers(left + right):  # never fires in `tokenizers` either: BPE starts from byte symbols
            continue
        merged = alphabet.to_bytes(left + right)
        if merged in ranks:
            raise BadCheckpoint(f"tokenizer merges build {left + right!r} twice: not representable by rank")
        ranks[merged] = 0
    id_of = {alphabet.to_bytes(token): token_id for token, token_id in vocab.items() if alphabet.covers(token)}
    ranked = list(ranks)
    size = max([*vocab.values(), *(token.id for token in added)]) + 1
    bytes_by_id = [b""] * size
    for token, token_id in vocab.items():
        bytes_by_id[token_id] = alphabet.to_bytes(token)
    for added_token in added:  # `tokenizers` decodes a normalized added token from its normalized text
        text = added_token.content
        shown = unicodedata.normalize(normalizer, text) if added_token.normalized and normalizer else text
        bytes_by_id[added_token.id] = alphabet.to_bytes(shown)
    return TokenizerTables(
        ranked=ranked,
        rank_to_id=[id_of[piece] for piece in ranked],
        bytes_by_id=bytes_by_id,
        added_tokens=list(added),
        pattern=pattern,
        normalizer=normalizer,
        chat_template=chat_template,
    )


def _splitter(contents: Sequence[str]) -> re.Pattern | None:
    """A regex whose split() isolates the given strings, leftmost-longest as `tokenizers` matches them."""
    longest_first = sorted(set(contents), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None


class Qwen2Tokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer; `encode` recognises added tokens, `encode_ordinary` never does."""

    def __init__(self, tables: TokenizerTables) -> None:
        self._identity = all(rank == token_id for rank, token_id in enumerate(tables.rank_to_id))
        self._rank_to_id = [] if self._identity else tables.rank_to_id
        ranks = dict(zip(tables.ranked, range(len(tables.ranked)), strict=True))
        self._bpe = tiktoken.Encoding("qwen2", pat_str=tables.pattern, mergeable_ranks=ranks, special_tokens={})
        # tiktoken copies the ranks into its Rust tables and keeps this dict only for features we do not use:
        # emptied, it frees ~15 MB (the tokenizer held ~70 MB for Qwen2's 151k tokens)
        ranks.clear()
        self._normal_form = tables.normalizer
        added = tables.added_tokens
        self.special_tokens = {token.content: token.id for token in added}
        matched_after = {token.content: token for token in added if token.normalized and self._normal_form}
        self._raw_split = _splitter([t.content for t in added if t.content not in matched_after])
        self._normalized_ids = {self._normalize(t.content): t.id for t in matched_after.values()}
        self._normalized_split = _splitter(list(self._normalized_ids))
        # one bytes object per token: where a token's bytes equal its merge-table entry's, that entry's
        self._bytes_by_id = tables.bytes_by_id
        if self._identity:
            ranked = tables.ranked
            self._bytes_by_id = [
                # the table covers the merge-ranked ids only; the ids past it (added tokens) are appended as they are
                entry if entry == piece else piece
                for entry, piece in zip(ranked, self._bytes_by_id, strict=False)
            ] + self._bytes_by_id[len(ranked) :]
        self.vocab_size = max([*tables.rank_to_id, *self.special_tokens.values()]) + 1
        self.chat_template = tables.chat_template
        self._alphabet = ByteLevelAlphabet()

    @classmethod
    def from_dir(cls, model_dir: Path) -> Qwen2Tokenizer:
        """tokenizer.json, else vocab.json + merges.txt, with tokenizer_config.json's added tokens and template."""
        model_dir = Path(model_dir)
        cache = cache_path(model_dir)
        if cache is not None:
            tables = load_tables(cache)
            if tables is None:
                tables = tables_from_files(model_dir)
                save_tables(tables, cache)
            return cls(tables)
        return cls(tables_from_files(model_dir))

    def _normalize(self, text: str) -> str:
        return unicodedata.normalize(self._normal_form, text) if self._normal_form else text

    def _bpe_ids(self, normalized_text: str) -> list[int]:
        ranks = self._bpe.encode_ordinary(normalized_text)
        return ranks if self._identity else [self._rank_to_id[r] for r in ranks]

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: special-token strings stay text."""
        return self._bpe_ids(self._normalize(text))

    def encode(self, text: str) -> list[int]:
        """Token ids as `tokenizers` gives them: added tokens split out of the raw text, then normalized ones."""
        parts = self._raw_split.split(text) if self._raw_split is not None else [text]
        if len(parts) == 1:  # the common case, kept short: no added token in the text
            return self._encode_normalized(self._normalize(text) if self._normal_form else text)
        ids: list[int] = []
        for index, part in enumerate(parts):
            if index % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_normalized(self._normalize(part)))
        return ids

    def _encode_normalized(self, text: str) -> list[int]:
        if self._normalized_split is None:
            return self._bpe.encode_ordinary(text) if self._identity else self._bpe_ids(text)
        ids: list[int] = []
        for index, part in enumerate(self._normalized_split.split(text)):
            if index % 2:
                ids.append(self._normalized_ids[part])
            elif part:
                ids.extend(self._bpe_ids(part))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token's text as UTF-8); unknown ids stand for nothing."""
        return self._bytes_by_id[token_id] if 0 <= token_id < len(self._bytes_by_id) else b""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        """Id of an added token, or of a vocabulary entry in its byte-level spelling ("Ġthe"), like `tokenizers`."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if not token or not self._alphabet.covers(token):
            return None
        return self._id_by_bytes.get(self._alphabet.to_bytes(token))

    @cached_property
    def _id_by_bytes(self) -> dict[bytes, int]:
        """Vocabulary entries by their bytes; added tokens are found by their text instead."""
        added_ids = set(self.special_tokens.values())
        return {
            piece: token_id
            for token_id, piece in reversed(list(enumerate(self._bytes_by_id)))
            if piece and token_id not in added_ids
        }

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    """One BPE merge, written "left right" (merges.txt, older tokenizer.json) or ["left", "right"] (newer)."""
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left, right


def tables_from_files(model_dir: Path) -> TokenizerTables:
    """Tokenizer tables from the checkpoint's own files (tokenizer.json, or vocab.json + merges.txt)."""
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
        merges = [_merge_pair(m) for m in model["merges"]]
        return build_tables(
            vocab=model["vocab"],
            merges=merges,
            added=_added_tokens_from(data.get("added_tokens") or config_added),
            pattern=_pattern_from(data.get("pre_tokenizer")),
            normalizer=_normalizer_from(data.get("normalizer")),
            chat_template=template,
        )
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        lines = (model_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [_merge_pair(line) for line in lines if line and not line.startswith("#version")]
        return build_tables(
            vocab=_read_json(model_dir / "vocab.json"),
            merges=merges,
            added=_added_tokens_from(config_added),
            pattern=QWEN2_PATTERN,
            normalizer="NFC",
            chat_template=template,
        )
    raise BadCheckpoint(f"no tokenizer.json or vocab.json+merges.txt in {model_dir}")
