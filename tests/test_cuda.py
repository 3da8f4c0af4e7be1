"""The accelerator path: our decoder, kernels, quantizer and commands on a CUDA GPU, against transformers and our
reference paths on the same device.

CI has no GPU: there these skip, saying why. Where torch sees a CUDA GPU they run on it. QWEN2_TEST_DEVICE=cpu
runs them on the CPU instead, to check the tests themselves on a machine without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from devtools.tiny_checkpoint import write_tiny_checkpoint
from qwen2cli.checkpoint import load_model
from qwen2cli.kv_cache import Int8KVCache, KVCache
from qwen2cli.load_options import LoadOptions

if TYPE_CHECKING:
    from transformers import Qwen2ForCausalLM

DEVICE = os.environ.get("QWEN2_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")  # "": none here
pytestmark = pytest.mark.skipif(not DEVICE, reason="no CUDA GPU here (QWEN2_TEST_DEVICE=cpu runs these on the CPU)")
ON_CUDA = DEVICE == "cuda"


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 400, (1, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _transformers(directory: Path, dtype: torch.dtype, *, attention: str | None = None) -> Qwen2ForCausalLM:
    """transformers' model of the (Qwen2) checkpoint on DEVICE, in eval mode."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attention)
    # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to): type checkers see `self` unbound
    return model.to(DEVICE).eval()  # type: ignore[arg-type]


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda")
    return {
        "untied": write_tiny_checkpoint(root / "untied"),
        "sliding-tied": write_tiny_checkpoint(root / "sliding", tie=True, sliding_window=8, with_tokenizer=False),
    }


@pytest.mark.parametrize("variant", ["untied", "sliding-tied"])
def test_float32_logits_and_greedy_match_transformers(checkpoints, variant):
    directory = checkpoints[variant]
    reference = _transformers(directory, torch.float32, attention="eager")
    ours = load_model(directory, LoadOptions(device=DEVICE, dtype="float32"))
    assert ours.device.type == DEVICE and ours.model.lm_head.weight.device.type == DEVICE
    ids = _ids(40, seed=1)
    with torch.no_grad():
        expected = reference(ids).logits
        cache = KVCache(ours.config, 128, device=ours.device)
        prefix = ours.model(ids[:, :9], cache, 0)
        steps = [ours.model(ids[:, i : i + 1], cache, i) for i in range(9, ids.shape[1])]
        torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), expected, atol=2e-4, rtol=0)
        start = ids[:, :8]
        greedy = reference.generate(
            start, max_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=0, repetition_penalty=1.0
        )[0, 8:].tolist()  # not generation_config.json's
        cache = KVCache(ours.config, 128, device=ours.device)
        logits = ours.model(start, cache, 0, last_only=True)
        got = []
        for _ in range(48):
            got.append(int(logits[0, -1].argmax()))
            logits = ours.model(torch.tensor([[got[-1]]], device=ours.device), cache, cache.pos)
    assert got == greedy


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_as_close_to_float32_as_transformers(checkpoints, dtype):
    """In 16 bits neither side equals float32; ours must not stray further from it than transformers does."""
    directory = checkpoints["untied"]
    ids = _ids(64, seed=2)
    with torch.no_grad():
        exact = _transformers(directory, torch.float32)(ids).logits
        theirs = _transformers(directory, getattr(torch, dtype))(ids)
        ours = load_model(directory, LoadOptions(device=DEVICE, dtype=dtype))
        assert ours.dtype == getattr(torch, dtype)
        got = ours.model(ids, KVCache(ours.config, 64, dtype=ours.dtype, device=ours.device), 0)
    assert got.dtype == ours.dtype
    assert _relative(got, exact) <= 2 * _relative(theirs.logits, exact) + 1e-3


def test_auto_dtype_on_the_device_follows_the_checkpoint(checkpoints):
    loaded = load_model(checkpoints["untied"], LoadOptions(device=DEVICE))  # a float32 checkpoint
    assert loaded.dtype == torch.float32 and loaded.device.type == DEVICE


def test_moe_matches_transformers(tmp_path):
    from tests.test_moe_parity import write_tiny_moe

    reference = write_tiny_moe(tmp_path / "moe", vocab_size=512, norm_topk_prob=True).to(DEVICE)
    ours = load_model(tmp_path / "moe", LoadOptions(device=DEVICE, dtype="float32"))
    ids = _ids(24, seed=3)
    with torch.no_grad():
        expected = reference(ids).logits
        cache = KVCache(ours.config, 32, device=ours.device)
        got = torch.cat(
            [ours.model(ids[:, :5], cache, 0)] + [ours.model(ids[:, i : i + 1], cache, i) for i in range(5, 24)], dim=1
        )
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)


def test_dual_chunk_attention_and_int8_cache_equal_the_cpu(checkpoints, tmp_path):
    """DCA across chunks and the int8 KV cache compute on the device what they compute on the CPU (which the
    DCA and int8-cache tests check against their references)."""
    dual = tmp_path / "dual"
    dual.mkdir()
    for item in checkpoints["untied"].iterdir():
        (dual / item.name).write_bytes(item.read_bytes())
    config = json.loads((dual / "config.json").read_text())
    config["dual_chunk_attention_config"] = {"chunk_size": 64, "local_size": 8, "original_max_position_embeddings": 64}
    (dual / "config.json").write_text(json.dumps(config))
    ids = _ids(150, seed=5)
    with torch.no_grad():
        for cache_kind in (KVCache, Int8KVCache):
            outputs = []
            for device in ("cpu", DEVICE):
                loaded = load_model(dual, LoadOptions(device=device, dtype="float32"))
                cache = cache_kind(loaded.config, 160, device=loaded.device)
                pieces = [loaded.model(ids[:, :70].to(device), cache, 0)]
                pieces += [loaded.model(ids[:, i : i + 1].to(device), cache, i) for i in range(70, 150)]
                outputs.append(torch.cat(pieces, dim=1).cpu())
            torch.testing.assert_close(outputs[1], outputs[0], atol=2e-4, rtol=0)


INT4_KERNEL = "int4pack-cuda" if ON_CUDA else __import__("tests.test_quant").test_quant.INT4_CPU_KERNEL


@pytest.mark.parametrize(
    "shape,group,method,act_order",
    [
        ((64, 128), 32, "gptq", False),
        ((896, 128), 128, "gptq", True),
        ((256, 96), 64, "awq", False),
        ((4864, 896), 128, "gptq", False),
        ((96, 64), 32, "gptq", False),
    ],
)
def test_int4_kernel_equals_the_reference_path(shape, group, method, act_order):
    from qwen2cli.quant.config import QuantConfig
    from qwen2cli.quant.convert import quantize_linear
    from qwen2cli.quant.gptq import GPTQ
    from qwen2cli.quant.linear import QuantLinear

    torch.manual_seed(0)
    in_features, out_features = shape
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    config = QuantConfig(method=method, bits=4, group_size=group, sym=method != "awq", desc_act=act_order)
    if act_order:
        hessian = GPTQ(in_features)
        hessian.add_batch(torch.randn(512, in_features) * torch.linspace(0.1, 3, in_features))
        result = hessian.quantize(linear.weight, bits=4, group_size=group, sym=True, desc_act=True)
        layer = QuantLinear.from_quantized(result.codes, result.scales, result.zeros, result.g_idx, linear.bias, config)
    else:
        layer = quantize_linear(linear, config)
    layer = layer.to(DEVICE)
    layer.post_load()
    assert layer.kernel == INT4_KERNEL and (("order" in layer._fast) == act_order)
    for rows in (1, 7, 300):
        x = torch.randn(rows, in_features, device=DEVICE)
        reference = layer.forward_reference(x)
        # the kernels take bfloat16 activations, scales and offsets
        torch.testing.assert_close(layer(x), reference, atol=0.02 * reference.abs().max().item(), rtol=0.02)


def _qwen2(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "QWEN2_HOME": str(home)}
    env.pop("QWEN2_TEST_DEVICE", None)
    return subprocess.run(
        [sys.executable, "-m", "qwen2cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("method,bits,group", [("gptq", 4, 32), ("awq", 4, 32), ("rtn", 8, -1)])
def test_quantize_on_the_device_then_load_anywhere(checkpoints, tmp_path, method, bits, group):
    """`qwen2 quantize --device`: the checkpoint made on the device loads on the CPU and on the device, both
    computing the same logits, within the CPU suite's bounds of the float model."""
    from qwen2cli.quant.linear import QuantLinear

    done = _qwen2(
        "quantize",
        str(checkpoints["untied"]),
        "--method",
        method,
        "--bits",
        str(bits),
        "--group-size",
        str(group),
        "--samples",
        "8",
        "--seq-len",
        "64",
        "--device",
        DEVICE,
        "--out",
        str(tmp_path / "q"),
        home=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    ids = _ids(24, seed=6)
    float_model = load_model(checkpoints["untied"], LoadOptions(device="cpu", dtype="float32"))
    with torch.no_grad():
        expected = float_model.model(ids.cpu(), KVCache(float_model.config, 32), 0)
        logits = {}
        for device in ("cpu", DEVICE):
            loaded = load_model(tmp_path / "q", LoadOptions(device=device, dtype="float32"))
            layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
            assert len(layers) == 7 * loaded.config.num_hidden_layers
            if device != "cpu" and bits == 4:
                assert {m.kernel for m in layers} == {INT4_KERNEL}
            logits[device] = loaded.model(ids.to(device), KVCache(loaded.config, 32, device=loaded.device), 0).cpu()
    assert _relative(logits[DEVICE], logits["cpu"]) < 0.01
    assert _relative(logits[DEVICE], expected) < (0.02 if bits == 8 else 0.25)


@pytest.mark.parametrize("load_in,bound", [("8bit", 0.05), ("4bit", 0.25)])
def test_load_in_quantizes_on_the_device(checkpoints, load_in, bound):
    """`--load-in` on CUDA is bitsandbytes (LLM.int8, NF4); on the CPU, our round-to-nearest kernels."""
    from qwen2cli.quant.linear import QuantLinear

    directory = checkpoints["untied"]
    original = load_model(directory, LoadOptions(device=DEVICE, dtype="bfloat16"))
    quantized = load_model(directory, LoadOptions(device=DEVICE, dtype="bfloat16", load_in=load_in))
    if ON_CUDA:
        import bitsandbytes as bnb

        kind = bnb.nn.Linear8bitLt if load_in == "8bit" else bnb.nn.Linear4bit
    else:
        kind = QuantLinear
    layers = [m for m in quantized.model.modules() if isinstance(m, kind)]
    assert len(layers) == 7 * quantized.config.num_hidden_layers
    assert all(p.device.type == DEVICE for p in quantized.model.parameters())
    ids = _ids(24, seed=7)
    with torch.no_grad():
        expected = original.model(ids, KVCache(original.config, 32, dtype=original.dtype, device=original.device), 0)
        got = quantized.model(ids, KVCache(quantized.config, 32, dtype=quantized.dtype, device=quantized.device), 0)
    assert _relative(got, expected) < bound


def test_run_and_bench_commands_on_the_device(checkpoints, tmp_path):
    """The pipe command's greedy answer on the device is the CPU's (float32 both); bench reports the device."""
    model = str(checkpoints["untied"])
    answers = [
        _qwen2(
            "run",
            model,
            "hello there",
            "--max-tokens",
            "24",
            "--temperature",
            "0",
            "--dtype",
            "float32",
            "--device",
            device,
            home=tmp_path,
        )
        for device in ("cpu", DEVICE)
    ]
    for answer in answers:
        assert answer.returncode == 0, answer.stderr
    assert answers[1].stdout == answers[0].stdout and answers[0].stdout.strip()
    bench = _qwen2("bench", model, "-p", "64", "-n", "8", "--device", DEVICE, "--json", home=tmp_path)
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert result["device"].startswith(DEVICE) and result["decode_tok_s"] > 0
