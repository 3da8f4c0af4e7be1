"""Our Qwen2-MoE block against transformers' Qwen2MoeForCausalLM on tiny random checkpoints."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from qwen2cli.checkpoint import load_model
from qwen2cli.kv_cache import KVCache
from qwen2cli.load_options import LoadOptions

VARIANTS: dict[str, dict[str, Any]] = {  # Qwen2MoeConfig keyword arguments
    "norm-topk": {"norm_topk_prob": True},
    "no-norm-topk": {"norm_topk_prob": False},
    "sparse-step-2-mlp-only": {"decoder_sparse_step": 2, "mlp_only_layers": [3]},
}


def write_tiny_moe(directory, vocab_size: int = 256, **overrides):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **overrides,
    )
    model = Qwen2MoeForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0, 0.1).add_(1.0 if "norm" in name else 0.0)
            elif "gate.weight" in name:
                param.normal_(0, 0.5)  # a router with opinions, so top-k choices are not near ties
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = write_tiny_moe(directory, **VARIANTS[request.param])
    return reference, load_model(directory, LoadOptions(device="cpu", dtype="float32"))


def test_layers_are_sparse_where_configured(pair):
    from qwen2cli.model import SparseMoeBlock

    reference, ours = pair
    for ref_layer, our_layer in zip(reference.model.layers, ours.model.model.layers, strict=True):
        assert isinstance(our_layer.mlp, SparseMoeBlock) == (type(ref_layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock")


def test_quantizable_input_sizes_from_the_config(pair):
    """What `qwen2 quantize` checks group sizes against before loading: the input sizes of the Linears the
    quantizer will meet in the built model (transformers fuses its experts into 3-D tensors, so not its modules)."""
    from qwen2cli.quantized_load import keeps_float

    _, ours = pair
    sizes = {
        module.in_features
        for name, module in ours.model.model.layers.named_modules()
        if isinstance(module, torch.nn.Linear) and not keeps_float(name)
    }
    assert 32 in sizes  # the experts' down projections
    assert ours.config.linear_input_sizes() == sizes


def test_full_forward_and_cached_decoding_match(pair):
    reference, ours = pair
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        full = ours.model(ids, KVCache(ours.config, 32), 0)
        cache = KVCache(ours.config, 32)
        steps = [ours.model(ids[:, :5], cache, 0)] + [ours.model(ids[:, i : i + 1], cache, i) for i in range(5, 24)]
    torch.testing.assert_close(full, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)


def test_greedy_64_tokens_identical(pair):
    reference, ours = pair
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=0)[0, 6:].tolist()
        cache = KVCache(ours.config, 80)
        logits = ours.model(ids, cache, 0, last_only=True)
        got = []
        for _ in range(64):
            got.append(int(logits[0, -1].argmax()))
            logits = ours.model(torch.tensor([[got[-1]]]), cache, cache.pos)
    assert got == expected


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_tiny_moe_loads_and_runs(tmp_path, method):
    """GPTQ over every expert (experts few tokens reach fall back to an identity Hessian), saved, loaded, run; AWQ
    likewise (its gate/up scales scored on the whole MoE block's output; no clipping, AWQ's default)."""
    from devtools.tiny_tokenizer import write_tiny_tokenizer
    from qwen2cli.generate import load_engine
    from qwen2cli.model import SparseMoeBlock
    from qwen2cli.quant.linear import QuantLinear
    from qwen2cli.quantization.pipeline import quantize_model
    from qwen2cli.quantization.settings import QuantizeSettings

    source = tmp_path / "moe"
    write_tiny_moe(source, vocab_size=512, norm_topk_prob=True)
    write_tiny_tokenizer(source)
    reference = load_engine(source, LoadOptions(device="cpu", dtype="float32"))
    engine = load_engine(
        source, LoadOptions(device="cpu", dtype="float32")
    )  # quantize_model swaps its Linears in place
    settings = QuantizeSettings(
        method=method, bits=4, group_size=32, sym=method == "gptq", desc_act=False, samples=8, seq_len=32
    )
    out = quantize_model(engine, tmp_path / f"moe-{method}", settings=settings)
    quantized = load_engine(out, LoadOptions(device="cpu", dtype="float32"))
    moe = quantized.loaded.model.model.layers[0].mlp
    assert isinstance(moe, SparseMoeBlock)
    assert all(isinstance(expert.gate_proj, QuantLinear) for expert in moe.experts)
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference.loaded.model(ids, KVCache(reference.config, 16), 0)
        got = quantized.loaded.model(ids, KVCache(quantized.config, 16), 0)
    assert ((got - expected).norm() / expected.norm()).item() < 0.25
