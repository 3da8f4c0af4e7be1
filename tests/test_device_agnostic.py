"""No tensor is made on torch's default device where the data's device is meant: such a tensor is on the CPU
beside CUDA tensors on a GPU, and every op mixing them fails there, though the CPU suite passes.

CI has no GPU, so these run the CPU paths with the default device set to meta: a tensor made without an explicit
device then lands on meta and collides with the CPU tensors around it, as it would with CUDA ones. (Before this
test, GPTQ unpacking and the quantizer's statistics made their index and shift tensors that way.)"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from qwen2cli.generate import generate, load_engine
from qwen2cli.load_options import LoadOptions
from qwen2cli.sampling import SamplingParams


@contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _answer(engine, **sampling) -> str:
    ids = engine.tokenizer.encode("hello there")
    params = SamplingParams(**{"temperature": 0, "max_tokens": 6, **sampling})
    return "".join(chunk.text for chunk in generate(engine, ids, params=params, cache=engine.new_cache(64)))


@pytest.mark.parametrize(
    "options,sampling",
    [
        ({}, {}),
        ({}, {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repeat_penalty": 1.1, "seed": 3}),
        ({"kv_cache": "int8"}, {}),
        ({"attention": "dca"}, {}),
        ({"load_in": "4bit"}, {}),
        ({"load_in": "8bit"}, {}),
    ],
)
def test_loading_and_generating_make_no_tensor_on_the_default_device(tiny_model, options, sampling):
    expected = _answer(load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32", **options)), **sampling)
    with default_device_meta():
        got = _answer(load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32", **options)), **sampling)
    assert got == expected


@pytest.mark.parametrize(
    "method,bits,group,desc_act", [("gptq", 4, 32, True), ("awq", 4, 32, False), ("rtn", 8, -1, False)]
)
def test_quantizing_and_loading_make_no_tensor_on_the_default_device(
    tiny_model, tmp_path, method, bits, group, desc_act
):
    from qwen2cli.quantization.pipeline import quantize_model
    from qwen2cli.quantization.settings import QuantizeSettings

    settings = QuantizeSettings(
        method=method,
        bits=bits,
        group_size=group,
        sym=method != "awq",
        desc_act=desc_act,
        static_groups=False,
        samples=8,
        seq_len=64,
    )
    with default_device_meta():
        out = quantize_model(
            load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32")), tmp_path / method, settings=settings
        )
        got = _answer(load_engine(Path(out), LoadOptions(device="cpu", dtype="float32")))
    assert got == _answer(load_engine(Path(out), LoadOptions(device="cpu", dtype="float32")))


def test_moe_forward_makes_no_tensor_on_the_default_device(tmp_path):
    from qwen2cli.checkpoint import load_model
    from qwen2cli.kv_cache import KVCache
    from tests.test_moe_parity import write_tiny_moe

    write_tiny_moe(tmp_path / "moe", norm_topk_prob=True)
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    loaded = load_model(tmp_path / "moe", LoadOptions(device="cpu", dtype="float32"))
    with torch.no_grad():
        expected = loaded.model(ids, KVCache(loaded.config, 16), 0)
        with default_device_meta():
            got = loaded.model(ids, KVCache(loaded.config, 16, device="cpu"), 0)
    torch.testing.assert_close(got, expected)
