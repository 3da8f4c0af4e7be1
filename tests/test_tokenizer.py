"""Our tiktoken-based tokenizer against Hugging Face `tokenizers` loading the same files."""
from __future__ import annotations

import json
import shutil
import unicodedata

import pytest
from tokenizers import Tokenizer

from qwen2cli.errors import BadCheckpoint
from qwen2cli.tokenizer import Qwen2Tokenizer
from tests.corpus import EDGE_CASES, build_corpus, gettext_corpus
from tests.tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(directory)
    return directory


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
    assert any(len(tokenizer.decode([i]).encode()) != len(tokenizer.token_bytes(i)) for i in ids), \
        "the text should contain tokens that are partial UTF-8 characters"
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_vocab_and_merges_files_equal_tokenizer_json(tiny_dir, tmp_path, corpus):
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"added_tokens_decoder": {str(t["id"]): {"content": t["content"], "special": True}
                                       for t in data["added_tokens"]}}
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


@pytest.mark.real
def test_real_tokenizer_matches_tokenizers_and_round_trips(real_model_dir, corpus):
    ours = Qwen2Tokenizer.from_dir(real_model_dir)
    assert_same_ids(ours, Tokenizer.from_file(str(real_model_dir / "tokenizer.json")), corpus)
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
def test_real_padding_rows_are_not_sampleable(real_model_dir):
    tokenizer = Qwen2Tokenizer.from_dir(real_model_dir)
    assert tokenizer.vocab_size == 151936
    assert tokenizer.sampleable_size == 151665
