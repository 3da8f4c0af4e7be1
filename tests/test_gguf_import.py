"""GGUF import: weights, config and tokenizer against transformers' own GGUF loader."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from devtools.corpus import build_corpus
from qwen2cli.generate import generate, load_engine
from qwen2cli.gguf_dequant import DECODERS, dequantize
from qwen2cli.gguf_import import import_gguf
from qwen2cli.kv_cache import KVCache
from qwen2cli.load_options import LoadOptions
from qwen2cli.quant.blocks import BlockQuantLinear
from qwen2cli.sampling import SamplingParams
from qwen2cli.tokenizer import Qwen2Tokenizer
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory):
    return import_gguf(tiny_gguf, tmp_path_factory.mktemp("imported") / "model")


@pytest.mark.parametrize("type_name", sorted(DECODERS))
def test_block_decoders_match_the_gguf_package(type_name, monkeypatch):
    """Random blocks (every bit pattern of the codes; finite fp16 fields) decoded by our torch code and by the
    gguf package's numpy reference, across several chunks; empty and ragged inputs."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    values, size, _ = DECODERS[type_name]
    generator = np.random.default_rng(7)
    blocks = generator.integers(0, 256, size=(300, size), dtype=np.uint8)
    halves = {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}.get(type_name, (0,))
    for at in halves:
        blocks[:, at : at + 2] = generator.normal(0, 0.05, size=(300, 1)).astype(np.float16).view(np.uint8)
    expected = quants.dequantize(blocks, GGMLQuantizationType[type_name]).reshape(-1)
    monkeypatch.setattr("qwen2cli.gguf_dequant.VALUES_PER_CHUNK", 7 * values)  # 300 blocks in chunks of 7
    got, empty = dequantize(blocks, type_name), dequantize(blocks[:0], type_name)
    assert got is not None and got.shape == (300 * values,)
    torch.testing.assert_close(got, torch.from_numpy(expected.astype(np.float32)), rtol=0, atol=0)
    assert empty is not None and empty.shape == (0,)
    with pytest.raises(ValueError, match="whole number"):
        dequantize(blocks.reshape(-1)[:-1], type_name)


def test_tiny_gguf_of_every_type_matches_transformers(tiny_gguf, imported, monkeypatch):
    """Through the dequantized weights (the block modules' reference path; test_gguf_blocks.py tests the kernels
    on them): transformers' logits on the same GGUF."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    monkeypatch.setattr("qwen2cli.quant.blocks.native_library", lambda: None)
    engine = load_engine(imported, LoadOptions(device="cpu", dtype="float32"))
    ids = torch.randint(0, 400, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        got = engine.loaded.model(ids, KVCache(engine.config, 32), 0)
    # 3e-4: on AVX-512 CPUs the prompt's attention runs in quant/attention.c (float32, its own summation order):
    # one logit of 12,090 lands 2.65e-4 from transformers' here (within 1e-4 with torch's attention)
    torch.testing.assert_close(got, expected, atol=3e-4, rtol=1e-4)


def test_tiny_tokenizer_matches_transformers_gguf_tokenizer(tiny_gguf, imported):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    ours = Qwen2Tokenizer.from_dir(imported)
    for document in build_corpus()[:60]:
        assert ours.encode(document) == reference(document, add_special_tokens=False).input_ids


def _import_cli(path, tmp_path):
    env = {"QWEN2_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "qwen2cli", "import", str(path)], capture_output=True, text=True, env=env, timeout=300
    )


def test_bad_files_are_one_line_errors(tiny_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 3])
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("this is not a GGUF file\n" * 10)
    llama = write_tiny_gguf(tmp_path / "llama.gguf", architecture="llama")
    for path, fragment in (
        (truncated, "not a readable GGUF"),
        (not_gguf, "not a readable GGUF"),
        (llama, "'llama' model"),
        (tmp_path / "missing.gguf", "no such GGUF"),
    ):
        done = _import_cli(path, tmp_path)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and fragment in done.stderr, done.stderr
    assert not list((tmp_path / "home" / "models").glob("*")) or all(
        p.name.startswith(".") for p in (tmp_path / "home" / "models").iterdir()
    )


def test_import_command_installs_into_the_store(tiny_gguf, tmp_path):
    done = _import_cli(tiny_gguf, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "home" / "models") in __import__("pathlib").Path(done.stdout.strip()).parents


@pytest.mark.real
def test_real_gguf_import_greedy_and_tokenizer_match_transformers(tmp_path, monkeypatch):
    """The tokenizer encodes as transformers' GGUF tokenizer does; through the dequantized weights (the block
    modules' reference path: tests/test_gguf_blocks.py tests the kernels' greedy choices) greedy text is
    transformers' on the float32 copy of the same GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devtools.real_model import real_gguf, real_hf_dir

    gguf_path = real_gguf()
    target = import_gguf(gguf_path, tmp_path / "real")
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = Qwen2Tokenizer.from_dir(target)
    for document in build_corpus():
        assert ours.encode(document) == reference_tokenizer(document, add_special_tokens=False).input_ids
    # the reference model: transformers' own reading of the same GGUF (gguf_file=...), which real_hf_dir() saved
    # once (dequantizing the GGUF again here took minutes of CI's time). Its tokenizer is built from the GGUF
    # above, not read back from that copy: the saved tokenizer.json does not encode every text the same way.
    reference = AutoModelForCausalLM.from_pretrained(real_hf_dir(), dtype=torch.float32).eval()
    monkeypatch.setattr("qwen2cli.quant.blocks.native_library", lambda: None)
    engine = load_engine(target, LoadOptions(device="cpu", dtype="float32"))
    for module in engine.loaded.model.modules():  # each layer's weight dequantized once, not at every call
        if isinstance(module, BlockQuantLinear):
            weight = module.dequantized_weight()
            module.dequantized_weight = lambda weight=weight: weight  # type: ignore[method-assign,misc]
    params = SamplingParams(temperature=0, max_tokens=12, repeat_penalty=1.0)
    for prompt in ["def quicksort(items):", "The capital of Australia is", "用Python写一个快速排序："]:
        ids = ours.encode(prompt)
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([ids]),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=sorted(engine.stop_ids),
                pad_token_id=151643,
            )[0, len(ids) :]
        expected = reference_tokenizer.decode([t for t in out.tolist() if t not in engine.stop_ids])
        got = "".join(c.text for c in generate(engine, ids, params=params, cache=engine.new_cache(len(ids) + 16)))
        assert got == expected
