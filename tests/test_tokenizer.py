"""Our tiktoken-based tokenizer against Hugging Face `tokenizers` loading the same files."""

from __future__ import annotations

import json
import random
import shutil
import unicodedata

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import BPE

from devtools.corpus import EDGE_CASES, build_corpus, gettext_corpus
from devtools.tiny_tokenizer import write_tiny_tokenizer
from qwen2cli.errors import BadCheckpoint
from qwen2cli.tokenizer import Qwen2Tokenizer, tables_from_files
from qwen2cli.tokenizer_tables import load_tables


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Tables are built from the files here, so a stale cache elsewhere can never hide a difference."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QWEN2_HOME", str(tmp_path_factory.mktemp("qwen2-home")))
        yield


@pytest.fixture(scope="module")
def tiny_pair(tiny_dir):
    return Qwen2Tokenizer.from_dir(tiny_dir), Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def real_pair(real_model_dir):
    return Qwen2Tokenizer.from_dir(real_model_dir), Tokenizer.from_file(str(real_model_dir / "tokenizer.json"))


def id_of(tokenizer: Qwen2Tokenizer, token: str) -> int:
    """The id of a token the vocabulary must hold."""
    token_id = tokenizer.token_to_id(token)
    assert token_id is not None, token
    return token_id


def assert_same_ids(ours: Qwen2Tokenizer, reference: Tokenizer, documents: list[str]) -> None:
    for document in documents:
        expected = reference.encode(document, add_special_tokens=False).ids
        got = ours.encode(document)
        assert got == expected, f"first difference in {document[:60]!r}"
        assert ours.decode(got) == reference.decode(expected, skip_special_tokens=False)


def test_corpus_spans_twenty_languages():
    assert len(gettext_corpus()) >= 20


def test_tiny_vocabulary_matches_tokenizers(tiny_dir, corpus):
    assert_same_ids(Qwen2Tokenizer.from_dir(tiny_dir), Tokenizer.from_file(str(tiny_dir / "tokenizer.json")), corpus)


def test_round_trip_and_ordinary_encoding(tiny_dir, corpus):
    """The tiny tokenizer normalises to NFC, as Qwen's own files do, so text comes back in NFC."""
    tokenizer = Qwen2Tokenizer.from_dir(tiny_dir)
    special_ids = set(tokenizer.special_tokens.values())
    for document in corpus:
        assert tokenizer.decode(tokenizer.encode(document)) == unicodedata.normalize("NFC", document)
        ordinary = tokenizer.encode_ordinary(document)
        assert not special_ids & set(ordinary)
        assert tokenizer.decode(ordinary) == unicodedata.normalize("NFC", document)


def test_special_strings_become_special_ids_only_in_encode(tiny_dir):
    tokenizer = Qwen2Tokenizer.from_dir(tiny_dir)
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end in tokenizer.encode("a<|im_end|>b")
    assert im_end not in tokenizer.encode_ordinary("a<|im_end|>b")


def test_stream_decoder_never_splits_a_character(tiny_dir):
    tokenizer = Qwen2Tokenizer.from_dir(tiny_dir)
    text = "emoji 👨‍👩‍👧 and 中文 and é"
    ids = tokenizer.encode(text)
    assert any(len(tokenizer.decode([i]).encode()) != len(tokenizer.token_bytes(i)) for i in ids), (
        "the text should contain tokens that are partial UTF-8 characters"
    )
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_vocab_and_merges_files_equal_tokenizer_json(tiny_dir, tmp_path, corpus):
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "added_tokens_decoder": {str(t["id"]): {"content": t["content"], "special": True} for t in data["added_tokens"]}
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    from_files = Qwen2Tokenizer.from_dir(tmp_path)
    from_json = Qwen2Tokenizer.from_dir(tiny_dir)
    for document in corpus[:40]:
        assert from_files.encode(document) == from_json.encode(document)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(BadCheckpoint, match="no tokenizer.json"):
        Qwen2Tokenizer.from_dir(tmp_path)


def test_cached_tables_are_reused_and_refreshed(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2_HOME", str(tmp_path / "home"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    first = Qwen2Tokenizer.from_dir(copy)
    assert list((tmp_path / "home" / "cache" / "tokenizers").glob("*.bin"))
    cached = Qwen2Tokenizer.from_dir(copy)
    assert cached.encode(EDGE_CASES[0]) == first.encode(EDGE_CASES[0])
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "changed"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert Qwen2Tokenizer.from_dir(copy).chat_template == "changed"


def test_cached_tables_equal_the_built_ones_and_a_truncated_cache_is_rebuilt(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2_HOME", str(tmp_path / "home"))
    built = tables_from_files(tiny_dir)
    Qwen2Tokenizer.from_dir(tiny_dir)
    (cache,) = (tmp_path / "home" / "cache" / "tokenizers").glob("*.bin")
    assert vars(load_tables(cache)) == vars(built)
    cache.write_bytes(cache.read_bytes()[:-100])
    assert load_tables(cache) is None
    assert Qwen2Tokenizer.from_dir(tiny_dir).encode(EDGE_CASES[0]) == Qwen2Tokenizer(built).encode(EDGE_CASES[0])
    assert vars(load_tables(cache)) == vars(built)


@pytest.mark.real
def test_real_tokenizer_matches_tokenizers_and_round_trips(real_pair, corpus):
    ours, reference = real_pair
    assert_same_ids(ours, reference, corpus)
    for document in corpus:  # no normalizer in this file: every text comes back byte for byte
        assert ours.decode(ours.encode(document)) == document


@pytest.mark.real
def test_real_tokenizer_with_nfc_normalizer(real_model_dir, tmp_path, corpus):
    """Qwen's own tokenizer.json names an NFC normalizer (the GGUF-derived copy has none): both must match."""
    data = json.loads((real_model_dir / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "NFC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    ours = Qwen2Tokenizer.from_dir(tmp_path)
    assert_same_ids(ours, Tokenizer.from_file(str(tmp_path / "tokenizer.json")), corpus)
    assert ours.encode("e\u0301") == ours.encode("\u00e9")


@pytest.mark.real
def test_real_vocab_size_counts_producible_ids(real_model_dir):
    """The GGUF-derived file pads its vocabulary to 151936 rows; only 151665 ids can come out of the tokenizer."""
    tokenizer = Qwen2Tokenizer.from_dir(real_model_dir)
    reference = Tokenizer.from_file(str(real_model_dir / "tokenizer.json"))
    assert tokenizer.vocab_size == 151665
    assert tokenizer.token_to_id("<|im_end|>") == 151645
    padding = [151665, 151935, 151936, 10**9]
    assert tokenizer.decode(padding) == reference.decode(padding, skip_special_tokens=False)


@pytest.mark.real
def test_real_bpe_core_matches_on_token_concatenations(real_model_dir):
    assert_same_bpe(real_model_dir, samples=20_000)


@pytest.mark.real
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_real_random_text_matches_tokenizers(real_pair, text):
    ours, reference = real_pair
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids


def assert_same_bpe(directory, *, samples: int) -> None:
    """The BPE core alone (no pre-tokenizer): merge priority in `tokenizers` = rank of the merged bytes in ours."""
    data = json.loads((directory / "tokenizer.json").read_text())
    merges = [tuple(m) for m in data["model"]["merges"]]
    model = BPE(vocab=data["model"]["vocab"], merges=merges)
    ours = Qwen2Tokenizer.from_dir(directory)
    tables = tables_from_files(directory)  # the ranks ours hands tiktoken
    whole = tiktoken.Encoding(
        "whole-text",
        pat_str=r"[\s\S]+",
        mergeable_ranks=dict(zip(tables.ranked, range(len(tables.ranked)), strict=True)),
        special_tokens={},
    )
    pieces = sorted({left + right for left, right in merges})
    generator = random.Random(0)
    checked = 0
    while checked < samples:
        spelled = "".join(generator.choice(pieces) for _ in range(generator.randint(1, 4)))
        try:
            text = b"".join(ours.token_bytes(id_of(ours, char)) for char in spelled).decode("utf-8")
        except UnicodeDecodeError:
            continue
        checked += 1
        assert [tables.rank_to_id[r] for r in whole.encode_ordinary(text)] == [t.id for t in model.tokenize(spelled)]


def test_tiny_bpe_core_matches_on_token_concatenations(tiny_dir):
    assert_same_bpe(tiny_dir, samples=20_000)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_tiny_random_text_matches_tokenizers(tiny_pair, text):
    ours, reference = tiny_pair
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert ours.decode(ours.encode(text)) == reference.decode(ours.encode(text), skip_special_tokens=False)


def test_decoding_any_ids_matches_tokenizers(tiny_dir):
    """Ids that cut UTF-8 characters apart decode to U+FFFD exactly where `tokenizers` puts them."""
    ours = Qwen2Tokenizer.from_dir(tiny_dir)
    reference = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    generator = random.Random(0)
    for _ in range(3000):
        ids = [generator.randrange(ours.vocab_size + 3) for _ in range(generator.randint(1, 6))]
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False)


def test_added_tokens_of_every_kind_match_tokenizers(tiny_dir, tmp_path):
    """Normalized added tokens match after NFC (and decode from their NFC text); raw ones match before it."""
    reference = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    reference.add_tokens(
        [
            AddedToken("e\u0301x", normalized=True),
            AddedToken("ab c", normalized=True),
            AddedToken("<tool_call>", normalized=False),
            AddedToken("\u00c5", normalized=False),
        ]
    )
    reference.add_special_tokens([AddedToken("\u226f", normalized=False)])
    reference.save(str(tmp_path / "tokenizer.json"))
    ours = Qwen2Tokenizer.from_dir(tmp_path)
    texts = [
        "e\u0301x",
        "\u00e9x",
        "A\u030a \u00c5",
        "<|im_end|>\u0338 >\u0338 \u226f",
        "xab cx<tool_call>hi",
        "\u00e9\u0301x",
        "<|im_start|>e\u0301x<|im_end|>",
    ]
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == reference.decode(expected, skip_special_tokens=False), text
    for token_id in range(reference.get_vocab_size(with_added_tokens=True)):
        assert ours.decode([token_id]) == reference.decode([token_id], skip_special_tokens=False)
        token = reference.id_to_token(token_id)
        assert token is not None, token_id
        assert ours.token_to_id(token) == reference.token_to_id(token), token
    assert ours.token_to_id("a b") is None and ours.token_to_id("") is None


def test_merges_of_tokens_outside_the_byte_alphabet_never_fire(tiny_dir, tmp_path):
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["\u2581"], vocab["a\u2581"] = len(vocab) + 10, len(vocab) + 11
    data["model"]["merges"].insert(0, ["a", "\u2581"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ours = Qwen2Tokenizer.from_dir(tmp_path)
    reference = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert ours.encode("a\u2581 a\u2581") == reference.encode("a\u2581 a\u2581", add_special_tokens=False).ids


def test_stream_decoder_flushes_a_cut_character_as_replacement(tiny_dir):
    tokenizer = Qwen2Tokenizer.from_dir(tiny_dir)
    first_byte_of_euro = id_of(tokenizer, "\u00e2")  # byte 0xE2, the start of "€"
    decoder = tokenizer.stream_decoder()
    assert decoder.push(id_of(tokenizer, "a")) == "a"
    assert decoder.push(first_byte_of_euro) == ""
    assert decoder.flush() == "\ufffd"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["added_tokens"][0].update(lstrip=True), "lstrip"),
        (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
        (lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizer"),
        (lambda d: d["model"]["merges"].append(["q", "z"]), "missing from the vocabulary"),
        (lambda d: d["model"].update(type="WordPiece"), "WordPiece"),
    ],
)
def test_tokenizers_we_cannot_match_exactly_are_refused(tiny_dir, tmp_path, change, message):
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    change(data)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(BadCheckpoint, match=message):
        Qwen2Tokenizer.from_dir(tmp_path)


def test_a_token_built_by_two_merges_is_refused(tiny_dir, tmp_path):
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    triple = next(left + right for left, right in merges if len(left) == 2 and len(right) == 1)
    vocab.setdefault(triple[1:], len(vocab) + 10)
    merges += [[triple[1], triple[2]], [triple[0], triple[1:]]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(BadCheckpoint, match="twice"):
        Qwen2Tokenizer.from_dir(tmp_path)
