"""quant/: exact packing (checked by an independent reader), kernels against the reference path, GPTQ vs RTN,
and quantize -> save -> load -> generate end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import torch

from qwen2cli import quant
from qwen2cli.load_options import LoadOptions
from qwen2cli.model import DecoderLayer, Qwen2ForCausalLM
from qwen2cli.quant.config import QuantConfig
from qwen2cli.quant.convert import quantize_linear
from qwen2cli.quant.gptq import GPTQ, upper_cholesky_of_inverse
from qwen2cli.quant.int4pack import int4pack_cpu_layout_known, int4pack_cpu_tile, unpack_int4pack_cpu
from qwen2cli.quant.linear import DEQUANT_MIN_ROWS, QuantLinear
from qwen2cli.quant.native import native_library
from qwen2cli.quant.packing import pack_awq, pack_gptq, unpack_awq, unpack_gptq
from qwen2cli.quant.rtn import quantize_rtn

# CPU int4/int8: quant/qgemv.c where it builds (test_native_kernel_builds_where_it_can says where that must be)
NATIVE = native_library() is not None


def decoder_layers(model: Qwen2ForCausalLM) -> list[DecoderLayer]:
    """The model's decoder layers, as the DecoderLayers they are."""
    layers = list(model.model.layers)
    assert all(isinstance(layer, DecoderLayer) for layer in layers)
    return cast(list[DecoderLayer], layers)


INT4_CPU_KERNEL = "q4-native-cpu" if NATIVE else "int4pack-cpu"
INT8_CPU_KERNEL = "q8-native-cpu" if NATIVE else "int8pack-cpu"


def read_gptq_independently(qweight, qzeros, scales, g_idx, bits, *, v2=False):
    """Decode the GPTQ layout from its published description, bit by bit (no code shared with quant/)."""
    per, mask = 32 // bits, (1 << bits) - 1
    qweight, qzeros = qweight.tolist(), qzeros.tolist()
    in_features, out_features = len(qweight) * per, len(qweight[0])
    weight = torch.zeros(out_features, in_features)
    for i in range(in_features):
        group = int(g_idx[i])
        for o in range(out_features):
            code = ((qweight[i // per][o] & 0xFFFFFFFF) >> (bits * (i % per))) & mask
            zero = ((qzeros[group][o // per] & 0xFFFFFFFF) >> (bits * (o % per))) & mask
            weight[o, i] = float(scales[group, o]) * (code - (zero if v2 else zero + 1))
    return weight


def read_awq_independently(qweight, qzeros, scales, group_size):
    """AWQ GEMM: eight 4-bit values per int32 along the output, in the order [0, 2, 4, 6, 1, 3, 5, 7]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight, qzeros = qweight.tolist(), qzeros.tolist()
    in_features, out_features = len(qweight), len(qweight[0]) * 8
    weight = torch.zeros(out_features, in_features)
    for i in range(in_features):
        for o in range(out_features):
            slot = order.index(o % 8)
            code = ((qweight[i][o // 8] & 0xFFFFFFFF) >> (4 * slot)) & 0xF
            zero = ((qzeros[i // group_size][o // 8] & 0xFFFFFFFF) >> (4 * slot)) & 0xF
            weight[o, i] = float(scales[i // group_size, o]) * (code - zero)
    return weight


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (4, -1), (8, 32), (8, 128), (8, -1)])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_pack_round_trip_and_independent_reader(bits, group, sym):
    torch.manual_seed(bits * 100 + group)
    weight = torch.randn(16, 128)
    codes, scales, zeros = quantize_rtn(weight, bits=bits, group_size=group, sym=sym)
    qweight, qzeros = pack_gptq(codes, zeros, bits=bits)
    assert qweight.shape == (128 * bits // 32, 16) and qzeros.shape == (scales.shape[0], 16 * bits // 32)
    back_codes, back_zeros = unpack_gptq(qweight, qzeros, bits=bits)
    assert torch.equal(back_codes, codes) and torch.equal(back_zeros, zeros)
    size = 128 if group == -1 else group
    layer = QuantLinear.from_quantized(
        codes, scales, zeros, torch.arange(128) // size, None, QuantConfig(bits=bits, group_size=group, sym=sym)
    )
    independent = read_gptq_independently(layer.qweight, layer.qzeros, layer.scales.float(), layer.g_idx, bits)
    assert torch.equal(independent, layer.dequantized_weight())


@pytest.mark.parametrize("group", [32, 128])
def test_awq_pack_round_trip_and_independent_reader(group):
    torch.manual_seed(group)
    weight = torch.randn(16, 128)
    codes, scales, zeros = quantize_rtn(weight, bits=4, group_size=group, sym=False)
    qweight, qzeros = pack_awq(codes, zeros)
    assert qweight.shape == (128, 2) and qzeros.shape == (128 // group, 2)
    assert all(torch.equal(a, b) for a, b in zip(unpack_awq(qweight, qzeros), (codes, zeros), strict=True))
    layer = QuantLinear.from_quantized(
        codes,
        scales,
        zeros,
        torch.arange(128) // group,
        None,
        QuantConfig(method="awq", bits=4, group_size=group, sym=False),
    )
    assert torch.equal(
        read_awq_independently(layer.qweight, layer.qzeros, layer.scales.float(), group), layer.dequantized_weight()
    )


def test_autogptq_symmetric_zeros_read_as_eight():
    """AutoGPTQ writes symmetric 4-bit qzeros as 0x77777777 (7 stored for a zero of 8)."""
    config = QuantConfig(bits=4, group_size=32, sym=True)
    layer = QuantLinear(64, 16, bias=False, config=config)
    layer.qzeros = torch.full((2, 2), 0x77777777, dtype=torch.int32)
    layer.qweight = torch.full((8, 16), 0x76543210 - 2**32 if 0x76543210 >= 2**31 else 0x76543210, dtype=torch.int32)
    layer.scales = torch.ones(2, 16, dtype=torch.float16)
    weight = layer.dequantized_weight()
    assert torch.equal(weight[0, :8], torch.arange(8).float() - 8)


def test_gptq_v2_zeros_are_not_offset():
    codes = torch.randint(0, 16, (16, 64), dtype=torch.int32)
    zeros = torch.randint(0, 16, (2, 16), dtype=torch.int32)
    qweight, qzeros = pack_gptq(codes, zeros, bits=4, version=2)
    config = QuantConfig(bits=4, group_size=32, checkpoint_format="gptq_v2")
    layer = QuantLinear(64, 16, bias=False, config=config)
    layer.qweight, layer.qzeros, layer.scales = qweight, qzeros, torch.ones(2, 16, dtype=torch.float16)
    independent = read_gptq_independently(qweight, qzeros, layer.scales.float(), layer.g_idx, 4, v2=True)
    assert torch.equal(layer.dequantized_weight(), independent)


@pytest.mark.parametrize(
    "shape,bits,group,method,act_order",
    [
        ((96, 64), 4, 32, "gptq", False),
        ((256, 48), 4, 128, "gptq", True),
        ((192, 40), 4, 64, "awq", False),
        ((160, 24), 8, -1, "gptq", False),
        ((128, 32), 8, 32, "gptq", False),
        ((96, 16), 4, 32, "gptq", True),
        ((128, 96), 4, 32, "gptq", True),
        ((64, 160), 4, 64, "awq", False),
        ((64, 80), 8, -1, "gptq", False),
    ],
)
def test_fast_kernels_equal_reference(shape, bits, group, method, act_order, monkeypatch):
    torch.manual_seed(0)
    in_features, out_features = shape
    # long inputs unpack the weight 32 rows at a time here: several blocks, the last one short where out % 32
    monkeypatch.setattr(quant.linear, "UNPACK_BLOCK_FLOATS", 32 * in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    config = QuantConfig(method=method, bits=bits, group_size=group, sym=method != "awq", desc_act=act_order)
    if act_order:
        hessian = GPTQ(in_features)
        hessian.add_batch(torch.randn(256, in_features) * torch.linspace(0.1, 3, in_features))
        result = hessian.quantize(linear.weight, bits=bits, group_size=group, sym=True, desc_act=True)
        layer = QuantLinear.from_quantized(result.codes, result.scales, result.zeros, result.g_idx, linear.bias, config)
        assert not torch.equal(result.g_idx, torch.arange(in_features, dtype=torch.int32) // group)
    else:
        layer = quantize_linear(linear, config)
    x = torch.randn(7, in_features)
    reference = layer.forward_reference(x)
    long_x = torch.randn(DEQUANT_MIN_ROWS + 3, in_features)  # long inputs take the unpack-then-GEMM path
    long_reference = layer.forward_reference(long_x)
    layer.post_load()
    fast = INT8_CPU_KERNEL if bits == 8 else INT4_CPU_KERNEL
    # no fast kernel for these shapes (torch's: int8 per channel only, int4 outputs in multiples of 16)
    slow = not NATIVE and ((bits == 8 and group != -1) or (bits == 4 and out_features % 16))
    expected_kernel = "reference" if slow else fast
    assert layer.kernel == expected_kernel
    torch.testing.assert_close(layer(x), reference, atol=0.05 * reference.abs().max().item(), rtol=0.02)
    if bits == 8 or NATIVE or int4pack_cpu_layout_known(out_features, in_features):
        # the unpack-then-GEMM path
        # float32 throughout, no bfloat16 activations: as close as the order of summation allows (float32 chosen
        # here: CPUs with bfloat16 arithmetic take bfloat16 by default)
        monkeypatch.setattr(quant.linear, "long_input_dtype", lambda: torch.float32)
        torch.testing.assert_close(
            layer(long_x), long_reference, atol=1e-4 * long_reference.abs().max().item(), rtol=1e-4
        )
        # in bfloat16, as on CPUs that multiply it natively: activations and unpacked weights rounded to 8 bits
        monkeypatch.setattr(quant.linear, "long_input_dtype", lambda: torch.bfloat16)
        torch.testing.assert_close(
            layer(long_x), long_reference, atol=0.02 * long_reference.abs().max().item(), rtol=0.02
        )
    else:  # rows not in whole tiles of 32: the kernel for long inputs too
        torch.testing.assert_close(
            layer(long_x), long_reference, atol=0.05 * long_reference.abs().max().item(), rtol=0.02
        )


@pytest.mark.skipif(
    not NATIVE, reason="the native kernel cannot build here (test_native_kernel_builds_where_it_can says why)"
)
@pytest.mark.parametrize("bits", [4, 8])
def test_native_kernel_keeps_float32_scales_that_float16_cannot_hold(bits, monkeypatch):
    """Checkpoints' float16 scales go to the kernel as float16 with int16 zeros (exact); scales float16 cannot hold
    (a float32 checkpoint's) keep float32 scales and offsets, and both compute the layer."""
    torch.manual_seed(0)
    monkeypatch.setattr(quant.linear, "long_input_dtype", lambda: torch.float32)  # the float32 bound below
    linear = torch.nn.Linear(256, 96, bias=True)
    for widen in (False, True):
        layer = quantize_linear(linear, QuantConfig(method="gptq", bits=bits, group_size=64, sym=False))
        if widen:
            layer.scales = layer.scales.float() * (1 + 1e-4)  # between float16's steps
        x, long_x = torch.randn(5, 256), torch.randn(DEQUANT_MIN_ROWS + 1, 256)
        reference, long_reference = layer.forward_reference(x), layer.forward_reference(long_x)
        layer.post_load()
        assert ("scales32" in layer._fast) == widen and ("scales16" in layer._fast) != widen
        torch.testing.assert_close(layer(x), reference, atol=0.05 * reference.abs().max().item(), rtol=0.02)
        torch.testing.assert_close(
            layer(long_x), long_reference, atol=1e-4 * long_reference.abs().max().item(), rtol=1e-4
        )


@pytest.mark.skipif(
    not NATIVE, reason="the native kernel cannot build here (test_native_kernel_builds_where_it_can says why)"
)
@pytest.mark.parametrize("bits", [4, 8])
def test_native_unpacking_gives_the_layers_weights(bits):
    """Long inputs' weight rows unpacked in C (quant/qgemv.c q_unpack) are the layer's dequantized weights: exactly,
    in float32 and rounded to bfloat16 as torch rounds, from float16 scales and int16 zeros; within float32
    rounding from float32 tables."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 72, bias=False)
    for widen in (False, True):
        layer = quantize_linear(linear, QuantConfig(method="gptq", bits=bits, group_size=64, sym=False))
        if widen:
            layer.scales = layer.scales.float() * (1 + 1e-4)  # between float16's steps: float32 tables
        weight = layer.dequantized_weight()
        layer.post_load()
        assert layer._native is not None and ("scales32" in layer._fast) == widen
        for dtype in (torch.float32, torch.bfloat16):
            rows = layer._native_rows(8, 40, torch.empty(32, 192, dtype=dtype))
            if widen:  # stored * scale + offset: a float32 rounding apart (bfloat16: a rounding step at most)
                torch.testing.assert_close(
                    rows, weight[8:40].to(dtype), atol=1e-6, rtol=2**-8 if dtype == torch.bfloat16 else 0
                )
            else:
                assert torch.equal(rows, weight[8:40].to(dtype))


@pytest.mark.parametrize("out_features,in_features", [(32, 64), (128, 896), (896, 896), (4864, 896), (896, 4864)])
def test_int4pack_cpu_layout_read_back(out_features, in_features):
    """The codes come back out of torch's CPU int4 packing (Qwen2-0.5B's shapes among them; tiles of 32 rows in
    torch's AVX2 builds, 64 in its AVX-512 ones), so long inputs can use the one packed copy instead of keeping a
    second."""
    tile = int4pack_cpu_tile()
    assert tile is not None, "torch's CPU int4 packing has neither known tile layout here"
    assert int4pack_cpu_layout_known(out_features, in_features) == (out_features % tile == 0)
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    if out_features % tile == 0:
        assert torch.equal(unpack_int4pack_cpu(packed, out_features, in_features, tile).int(), codes)


@pytest.mark.parametrize("size", [300, 2100])  # LAPACK's three calls below 2048, the recursion from there
def test_upper_cholesky_of_inverse(size):
    torch.manual_seed(0)
    x = torch.randn(2 * size, size, dtype=torch.float64)
    hessian = x.t() @ x / size
    upper = upper_cholesky_of_inverse(hessian)
    assert torch.equal(upper, torch.triu(upper)) and bool((torch.diagonal(upper) > 0).all())
    torch.testing.assert_close(upper.t() @ upper @ hessian, torch.eye(size, dtype=torch.float64), atol=1e-8, rtol=0)
    with pytest.raises(RuntimeError):
        upper_cholesky_of_inverse(-hessian)


@pytest.mark.parametrize("width", [96, 1100])  # one block; three, the last partial
def test_gram_sums_x_xt_over_every_batch(width):
    """Gram keeps only the upper triangle, in blocks of columns, under "medium" float32 products: its full() is
    still the sum of x x^T over every row added, to float32 accuracy, and torch's precision setting is restored."""
    from qwen2cli.quant.gram import Gram

    torch.manual_seed(0)
    batches = [torch.randn(rows, width) * torch.linspace(0.1, 3, width) for rows in (40, 700, 3)]
    gram = Gram(width)
    before = torch.get_float32_matmul_precision()
    for batch in batches:
        gram.add(batch.reshape(1, *batch.shape))
    x = torch.cat(batches).double()
    exact = x.t() @ x
    assert gram.count == x.shape[0] and torch.get_float32_matmul_precision() == before
    full = gram.full()
    assert torch.equal(full, full.t())
    torch.testing.assert_close(full.double(), exact, rtol=0, atol=2e-6 * exact.abs().max().item())
    off = ~torch.eye(width, dtype=torch.bool)  # the small cross terms too, not just the large diagonal
    assert ((full.double() - exact)[off].norm() / exact[off].norm()).item() < 1e-5


def test_gptq_beats_rtn_on_correlated_inputs():
    torch.manual_seed(1)
    inputs = torch.randn(3000, 12) @ torch.randn(12, 128) + 0.05 * torch.randn(3000, 128)
    weight = torch.randn(64, 128) * 0.1
    hessian = GPTQ(128)
    hessian.add_batch(inputs[:2000])
    result = hessian.quantize(weight, bits=4, group_size=32, sym=True)
    config = QuantConfig(bits=4, group_size=32)
    gptq = QuantLinear.from_quantized(result.codes, result.scales, result.zeros, result.g_idx, None, config)
    codes, scales, zeros = quantize_rtn(weight, bits=4, group_size=32, sym=True)
    rtn = QuantLinear.from_quantized(codes, scales, zeros, torch.arange(128) // 32, None, config)
    held_out = inputs[2000:]
    target = held_out @ weight.t()
    gptq_error = (gptq.forward_reference(held_out) - target).pow(2).mean()
    rtn_error = (rtn.forward_reference(held_out) - target).pow(2).mean()
    assert gptq_error < 0.5 * rtn_error


def test_static_groups_keep_contiguous_groups_under_act_order():
    """--desc-act --static-groups: columns are quantized in act-order, but each group is the contiguous one and its
    scale and zero come from the weights before any GPTQ update (so g_idx needs no reordering at load); on inputs
    whose channels differ in scale, it beats round-to-nearest on held-out inputs."""
    from qwen2cli.quant.rtn import group_params

    torch.manual_seed(3)
    inputs = (torch.randn(3000, 12) @ torch.randn(12, 128) + 0.05 * torch.randn(3000, 128)) * torch.rand(128) * 3
    weight = torch.randn(64, 128) * 0.1
    hessian = GPTQ(128)
    hessian.add_batch(inputs[:2000])
    result = hessian.quantize(weight, bits=4, group_size=32, sym=False, desc_act=True, static_groups=True)
    assert torch.equal(result.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    for group in range(4):
        scale, zero = group_params(weight[:, group * 32 : (group + 1) * 32], bits=4, sym=False)
        assert torch.equal(result.scales[group], scale[:, 0]) and torch.equal(result.zeros[group], zero[:, 0].int())
    plain_order = hessian.quantize(weight, bits=4, group_size=32, sym=False, static_groups=True)
    assert not torch.equal(result.codes, plain_order.codes)  # act-order changed the order of the updates
    held_out = inputs[2000:]

    def error(codes, scales, zeros, g_idx):
        dequantized = (codes - zeros[g_idx.long()].t()) * scales[g_idx.long()].t()
        return float((held_out @ (dequantized - weight).t()).pow(2).mean())

    rtn = error(*quantize_rtn(weight, bits=4, group_size=32, sym=False), torch.arange(128) // 32)
    assert error(result.codes, result.scales, result.zeros, result.g_idx) < 0.5 * rtn


def test_hessian_shrinkage_keeps_gptq_from_overfitting_few_tokens():
    """With fewer calibration tokens than input channels, plain GPTQ does worse than round-to-nearest on other
    inputs from the same distribution (it pushes errors into directions the calibration never saw); the default
    shrinkage toward the Hessian's diagonal beats both. Errors measured on held-out inputs."""
    torch.manual_seed(0)
    width = 256
    mix = torch.randn(width, width) / width**0.5 + torch.eye(width)  # correlated channels, full rank
    inputs = (torch.randn(4000, width) * torch.linspace(0.2, 2, width)) @ mix
    weight = torch.randn(64, width) * 0.1
    held_out = inputs[1000:]
    hessian = GPTQ(width)
    hessian.add_batch(inputs[:128])

    def error(codes, scales, zeros, g_idx):
        dequantized = (codes - zeros[g_idx.long()].t()) * scales[g_idx.long()].t()
        return float((held_out @ (dequantized - weight).t()).pow(2).mean())

    plain = hessian.quantize(weight, bits=4, group_size=32, sym=False, shrink=0.0)
    shrunk = hessian.quantize(weight, bits=4, group_size=32, sym=False, shrink=None)
    rtn = error(*quantize_rtn(weight, bits=4, group_size=32, sym=False), torch.arange(width) // 32)
    assert error(shrunk.codes, shrunk.scales, shrunk.zeros, shrunk.g_idx) < 0.95 * rtn
    assert rtn < 0.8 * error(plain.codes, plain.scales, plain.zeros, plain.g_idx)
    # full shrinkage leaves only the diagonal: no error is pushed onto other columns, round-to-nearest exactly
    diagonal = hessian.quantize(weight, bits=4, group_size=32, sym=False, shrink=1.0)
    assert torch.equal(diagonal.codes, quantize_rtn(weight, bits=4, group_size=32, sym=False)[0])


def test_gptq_clip_search_never_rounds_worse_than_min_max():
    from qwen2cli.quant.rtn import dequantize, group_params, quantize, search_group_params

    torch.manual_seed(2)
    weight = torch.randn(64, 128)
    weight[::7, 3] *= 8  # a few outliers, where clipping pays
    plain = group_params(weight, bits=4, sym=False)
    searched = search_group_params(weight, bits=4, sym=False)
    error = [
        (dequantize(quantize(weight, s, z, bits=4), s, z) - weight).abs().pow(2.4).sum(1) for s, z in (plain, searched)
    ]
    assert (error[1] <= error[0] + 1e-6).all() and error[1].sum() < 0.95 * error[0].sum()


def _outlier_inputs(tokens: int = 2048, channels: int = 128) -> torch.Tensor:
    """Activations whose few channels are far larger than the rest, as in trained LLMs."""
    x = torch.randn(tokens, channels)
    x[:, :4] *= 30
    return x


def test_awq_scales_beat_rtn_with_activation_outliers_and_never_lose():
    from qwen2cli.quant.awq import fake_quantize, search_scales

    torch.manual_seed(3)
    x, held_out = _outlier_inputs(), _outlier_inputs()
    weight = torch.randn(96, 128) * 0.1
    searched = search_scales(x.abs().mean(0), [weight], gram=x.t() @ x, bits=4, group_size=32, sym=False)
    assert searched.loss <= searched.unscaled_loss and searched.ratio is not None

    def error(scales):  # the scaled layer, quantized, measured directly on inputs the search never saw
        quantized = fake_quantize(weight * scales, bits=4, group_size=32, sym=False)
        return ((held_out / scales) @ quantized.t() - held_out @ weight.t()).pow(2).mean().item()

    assert error(searched.scales) < 0.8 * error(torch.ones(128))
    # the search's Gram-matrix objective is the same number as running the inputs through the layer
    quantized = fake_quantize(weight * searched.scales, bits=4, group_size=32, sym=False) / searched.scales
    direct = (x @ quantized.t() - x @ weight.t()).pow(2).sum() / (x @ weight.t()).pow(2).sum()
    assert abs(direct.item() - searched.loss) < 1e-3 * searched.loss
    # measured from the inputs themselves (what few calibration tokens use), the search picks the same scales
    from_rows = search_scales(x.abs().mean(0), [weight], rows=x, bits=4, group_size=32, sym=False)
    assert from_rows.ratio == searched.ratio and abs(from_rows.loss - searched.loss) < 1e-3 * searched.loss


def test_awq_keeps_no_scaling_when_activations_are_flat():
    from qwen2cli.quant.awq import search_scales

    torch.manual_seed(4)
    x = torch.randn(1024, 64)
    weights = [torch.randn(32, 64), torch.randn(16, 64)]
    searched = search_scales(x.abs().mean(0), weights, rows=x, bits=4, group_size=32, sym=True)
    assert searched.loss <= searched.unscaled_loss


def test_awq_clip_search_lowers_output_error():
    from qwen2cli.quant.awq import apply_clip, fake_quantize, search_clip

    torch.manual_seed(5)
    x = torch.randn(4096, 128)
    weight = torch.randn(48, 128)
    weight[:, ::16] *= 6  # heavy tails: a tighter range helps the many small weights
    bounds = search_clip(weight, x[:2048].t() @ x[:2048], bits=4, group_size=32, sym=False)
    assert bounds.shape == (48, 4) and (bounds <= weight.abs().reshape(48, 4, 32).amax(-1) + 1e-6).all()
    held_out = x[2048:]
    clipped = fake_quantize(apply_clip(weight, bounds, group_size=32), bits=4, group_size=32, sym=False)
    plain = fake_quantize(weight, bits=4, group_size=32, sym=False)
    target = held_out @ weight.t()
    assert (held_out @ clipped.t() - target).pow(2).mean() < (held_out @ plain.t() - target).pow(2).mean()


def test_awq_clips_each_linear_on_its_inputs_after_scaling(tiny_model, monkeypatch):
    """The clipping search reads every calibration token through each Linear's input Gram matrix, derived from
    the statistics taken before scaling (D G D, D = diag(1/scales)): it must equal the Gram matrix of the inputs
    the scaled layer actually feeds that Linear, measured here by hooks on the Linears themselves."""
    from qwen2cli.generate import load_engine
    from qwen2cli.quantization.awq_layer import awq_layer
    from qwen2cli.quantization.layers import linears_to_quantize, run_layer
    from qwen2cli.quantization.settings import QuantizeSettings

    engine = load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32"))
    model, config = engine.loaded.model, engine.config
    layer = model.model.layers[0]
    quant_config = QuantizeSettings(method="awq", bits=4, group_size=32, sym=False).quant_config
    hidden = torch.randn(4, 16, config.hidden_size, generator=torch.Generator().manual_seed(2)) * 3
    rope = model._rope_tables(0, 16, hidden.device)
    monkeypatch.setattr(quant.linear, "long_input_dtype", lambda: torch.float32)
    grams, search_clip = {}, quant.awq.search_clip

    def spy(weight, gram, **kwargs):
        grams[weight.data_ptr()] = gram.clone()
        return search_clip(weight, gram, **kwargs)

    monkeypatch.setattr(quant.awq, "search_clip", spy)
    with torch.no_grad():
        before = run_layer(layer, hidden, rope, config)
        awq_layer(layer, hidden, rope, config, quant_config, clip=True)
        linears = linears_to_quantize(layer)
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
        handles = [
            linear.register_forward_pre_hook(
                lambda module, args, n=name: seen[n].append(args[0].reshape(-1, args[0].shape[-1]).clone())
            )
            for name, linear in linears.items()
        ]
        try:
            after = run_layer(layer, hidden, rope, config)  # the scaled float layer, not yet quantized
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # scaling keeps the float function
    calls = len(grams)
    with torch.no_grad():  # by default (no --clip) no Linear is clipped
        awq_layer(engine.loaded.model.model.layers[1], hidden, rope, config, quant_config)
    assert len(grams) == calls
    clipped = {name for name, linear in linears.items() if linear.weight.data_ptr() in grams}
    assert clipped == {name for name in linears if not name.endswith(("q_proj", "k_proj"))}
    for name in clipped:
        x = torch.cat(seen[name])
        expected = x.t() @ x
        torch.testing.assert_close(
            grams[linears[name].weight.data_ptr()], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
        )


def test_awq_scores_attention_scales_on_the_attention_output(tiny_model):
    """The q/k/v scale search's objective is the attention block's relative output error: zero with the Linears'
    own weights; with v_proj's weight zeroed every value is v_proj's bias, so every output is o_proj of it, whatever
    the attention weights; a partial error for a change to q; the Linears keep their own weights afterwards."""
    from qwen2cli.generate import load_engine
    from qwen2cli.kv_cache import KVCache
    from qwen2cli.quantization.awq_layer import module_error

    engine = load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32"))
    model, config = engine.loaded.model, engine.config
    attention = decoder_layers(model)[0].self_attn
    linears = [attention.q_proj, attention.k_proj, attention.v_proj]
    own = [linear.weight.detach().clone() for linear in linears]
    inputs = [torch.randn(2, 16, config.hidden_size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rope = model._rope_tables(0, 16, inputs[0].device)
    with torch.no_grad():
        error = module_error(attention, linears, inputs, rope, config)
        assert error(own) == 0
        references = [
            attention(x, rope, KVCache(config, 16, batch_size=2, dtype=x.dtype, device=x.device), 0) for x in inputs
        ]
        group = attention.num_heads // attention.num_kv_heads
        values = attention.v_proj.bias.view(attention.num_kv_heads, -1).repeat_interleave(group, 0).reshape(-1)
        constant = attention.o_proj(values)  # every token's output when each value is the bias
        expected = sum((r - constant).pow(2).sum() for r in references) / sum(r.pow(2).sum() for r in references)
        assert error([own[0], own[1], torch.zeros_like(own[2])]) == pytest.approx(expected.item(), rel=1e-2)
        q_error = error([own[0] * 1.5, own[1], own[2]])  # sharper attention: a real, partial change
        assert 0 < q_error < 1
        assert error([own[0] * 1.5, own[1], own[2]]) == q_error
    for linear, weight in zip(linears, own, strict=True):
        assert torch.equal(linear.weight, weight)


def test_awq_scale_groups_follow_the_layer_shapes(tmp_path):
    """v_proj -> o_proj is a scale group only when v_proj's outputs are o_proj's inputs (no GQA)."""
    from devtools.tiny_checkpoint import write_tiny_checkpoint
    from qwen2cli.checkpoint import load_model
    from qwen2cli.quantization.awq_layer import scale_groups

    for kv_heads, expected in ((2, False), (4, True)):
        directory = write_tiny_checkpoint(tmp_path / f"kv{kv_heads}", num_kv_heads=kv_heads)
        layer = load_model(directory, LoadOptions(device="cpu", dtype="float32")).model.model.layers[0]
        groups = scale_groups(layer)
        assert any(g.prev == "self_attn.v_proj" for g in groups) is expected
        assert [g.prev for g in groups][-1] == "mlp.up_proj"


def test_layer_without_calibration_falls_back_and_says_so():
    result = GPTQ(64).quantize(torch.randn(8, 64), bits=4, group_size=32, sym=True)
    assert result.fallback and "no calibration" in result.fallback


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "awq", "bits": 8}, "4-bit only"),
        ({"bits": 3}, "3-bit"),
        ({"method": "hqq"}, "unknown quantization method"),
        ({"group_size": 48}, "group size 48"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_config_round_trips_through_hf_json():
    for config in (QuantConfig(bits=8, group_size=-1, desc_act=True), QuantConfig(method="awq", sym=False)):
        assert QuantConfig.from_hf(json.loads(json.dumps(config.to_hf()))).to_hf() == config.to_hf()


def _qwen2(*args: str, home) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen2cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={"QWEN2_HOME": str(home), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
    )


def _rtn_quantized(model: Path, out: Path, *, home) -> subprocess.CompletedProcess:
    """`qwen2 quantize --method rtn --group-size 32`: the quickest quantized checkpoint of `model`."""
    return _qwen2("quantize", str(model), "--method", "rtn", "--group-size", "32", "--out", str(out), home=home)


@pytest.mark.parametrize("method,bits,group", [("gptq", 4, "32"), ("awq", 4, "32"), ("rtn", 8, "-1")])
def test_tiny_quantize_store_load_generate(tiny_model, tmp_path, method, bits, group, monkeypatch):
    from qwen2cli.generate import load_engine
    from qwen2cli.kv_cache import KVCache

    damp = ["--damp", "0.05"] if method == "gptq" else []
    done = _qwen2(
        "quantize",
        str(tiny_model),
        "--method",
        method,
        "--bits",
        str(bits),
        "--group-size",
        group,
        "--samples",
        "8",
        "--seq-len",
        "64",
        *damp,
        home=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    assert path.endswith(f":{method}-int{bits}")
    config = json.loads(open(f"{path}/config.json").read())
    assert config["quantization_config"]["bits"] == bits
    if damp:
        assert config["quantization_config"]["damp_percent"] == 0.05
        assert config["quantization_config"]["hessian_shrink"] == "auto"
    assert config["quantization_config"]["quant_method"] == ("awq" if method == "awq" else "gptq")
    answer = _qwen2("run", path, "hello", "--max-tokens", "4", "--temperature", "0", home=tmp_path)
    assert answer.returncode == 0, answer.stderr
    original = load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32"))
    quantized = load_engine(__import__("pathlib").Path(path), LoadOptions(device="cpu", dtype="float32"))
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original.loaded.model(ids, KVCache(original.config, 32), 0)
        got = quantized.loaded.model(ids, KVCache(quantized.config, 32), 0)
    # stated bound, relative RMS error of the logits: int8 per channel < 2%; int4 in groups of 32 < 25% (random
    # tiny weights quantize far worse than trained ones: 16 levels for each group's whole range, over 3 layers)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < (0.02 if bits == 8 else 0.25), relative
    # every layer's kernel, built from the packed tensors as loading reads them (through mappings of their own),
    # computes what the reference path computes from the layer's own buffers
    layers = [m for m in quantized.loaded.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.kernel == (INT8_CPU_KERNEL if bits == 8 else INT4_CPU_KERNEL) for m in layers)
    monkeypatch.setattr(quant.linear, "long_input_dtype", lambda: torch.float32)  # the float32 bound below
    for layer in layers:
        for rows in (3, DEQUANT_MIN_ROWS + 5):
            x = torch.randn(rows, layer.in_features)
            reference = layer.forward_reference(x)
            # long inputs unpack to float32 where the layer keeps float tables for it (torch's int4 kernel with
            # bfloat16 activations otherwise: int4pack-cpu's layout read back for whole tiles only)
            unpacked = rows > DEQUANT_MIN_ROWS and ("scales32" in layer._fast or "scales16" in layer._fast)
            tolerance = 1e-4 if unpacked else 0.05
            torch.testing.assert_close(
                layer(x), reference, rtol=tolerance, atol=tolerance * reference.abs().max().item()
            )


def test_awq_clip_through_the_command(tiny_model, tmp_path):
    """`qwen2 quantize --method awq --clip` searches clipping ranges: its checkpoint differs from the default's,
    both load and answer."""
    from safetensors.torch import load_file

    tensors = {}
    for extra in ([], ["--clip"]):
        out = tmp_path / ("clip" if extra else "plain")
        done = _qwen2(
            "quantize",
            str(tiny_model),
            "--method",
            "awq",
            "--group-size",
            "32",
            "--samples",
            "8",
            "--seq-len",
            "64",
            *extra,
            "--out",
            str(out),
            home=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        tensors[bool(extra)] = load_file(out / "model.safetensors")
        answer = _qwen2("run", str(out), "hello", "--max-tokens", "4", "--temperature", "0", home=tmp_path)
        assert answer.returncode == 0, answer.stderr
    assert any(
        not torch.equal(tensors[True][name], tensors[False][name])
        for name in tensors[False]
        if name.endswith("qweight")
    )


def test_static_groups_through_the_command(tiny_model, tmp_path):
    """GPTQ's default, act-order with static groups, is written to quantization_config, every g_idx on disk is the
    contiguous one (nothing to reorder at load), and the checkpoint answers; --no-desc-act turns both off."""
    from safetensors.torch import load_file

    plain = _qwen2(
        "quantize",
        str(tiny_model),
        "--no-desc-act",
        "--group-size",
        "32",
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--out",
        str(tmp_path / "plain"),
        home=tmp_path,
    )
    assert plain.returncode == 0, plain.stderr
    config = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert config["desc_act"] is False and config["static_groups"] is False
    done = _qwen2(
        "quantize",
        str(tiny_model),
        "--group-size",
        "32",
        "--asym",
        "--samples",
        "8",
        "--seq-len",
        "64",
        "--out",
        str(tmp_path / "q"),
        home=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["desc_act"] is True and config["static_groups"] is True
    g_idx = {name: t for name, t in load_file(tmp_path / "q" / "model.safetensors").items() if name.endswith("g_idx")}
    assert g_idx and all(torch.equal(t, torch.arange(len(t), dtype=torch.int32) // 32) for t in g_idx.values())
    answer = _qwen2("run", str(tmp_path / "q"), "hello", "--max-tokens", "4", "--temperature", "0", home=tmp_path)
    assert answer.returncode == 0, answer.stderr


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_quantizing_a_bfloat16_checkpoint_holds_one_float32_layer_at_a_time(tiny_model, tmp_path, method):
    """`qwen2 quantize` loads a bfloat16 checkpoint as bfloat16 and makes each layer float32 only in its turn (a 7B
    in float32 is 30 GB): when a layer is done the layers after it are still bfloat16, and the checkpoint written
    is the one quantizing its float32 copy writes, tensor for tensor."""
    from safetensors.torch import load_file, save_file

    from qwen2cli.generate import load_engine
    from qwen2cli.quantization.pipeline import quantize_model
    from qwen2cli.quantization.settings import QuantizeSettings

    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_model, bf16)
    weights = load_file(bf16 / "model.safetensors")
    save_file(
        {k: v.to(torch.bfloat16) for k, v in weights.items()}, bf16 / "model.safetensors", metadata={"format": "pt"}
    )
    config = json.loads((bf16 / "config.json").read_text())
    config.pop("dtype", None)
    (bf16 / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    settings = QuantizeSettings(method=method, bits=4, group_size=32, sym=False, desc_act=False, samples=4, seq_len=32)
    later_dtypes: list[torch.dtype] = []
    engine = load_engine(bf16, LoadOptions(device="cpu", dtype="bfloat16"))
    layers = engine.loaded.model.model.layers

    def progress(_, done, total):
        later_dtypes.extend(p.dtype for layer in layers[done:] for p in layer.parameters())

    quantize_model(engine, tmp_path / "from-bf16", settings=settings, progress=progress)
    quantize_model(
        load_engine(bf16, LoadOptions(device="cpu", dtype="float32")), tmp_path / "from-f32", settings=settings
    )
    assert later_dtypes and set(later_dtypes) == {torch.bfloat16}
    done = _qwen2(
        "quantize",
        str(bf16),
        "--method",
        method,
        "--bits",
        "4",
        "--group-size",
        "32",
        "--asym",
        "--no-desc-act",
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--out",
        str(tmp_path / "cli"),
        home=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    reference = load_file(tmp_path / "from-f32" / "model.safetensors")
    for made in ("from-bf16", "cli"):
        ours = load_file(tmp_path / made / "model.safetensors")
        assert ours.keys() == reference.keys()
        for name in ours:
            assert torch.equal(ours[name], reference[name]), (made, name)


@pytest.mark.parametrize("float_dtype", [None, torch.float16])
def test_save_weights_writes_what_safetensors_writes(tmp_path, float_dtype):
    """Our tensor-at-a-time safetensors writer and safetensors' own save_file give files that safetensors reads
    back to the same tensors, dtypes, shapes and metadata (every dtype a checkpoint holds, a non-contiguous view,
    a scalar and an empty tensor); floating tensors are cast on the way when asked."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwen2cli.weights import save_weights

    generator = torch.Generator().manual_seed(0)
    state = {
        "w.f32": torch.randn(5, 7, generator=generator),
        "w.bf16": torch.randn(3, 8).bfloat16(),
        "w.f16": torch.randn(9).half(),
        "q.i32": torch.randint(-(2**31), 2**31 - 1, (4, 6), dtype=torch.int32),
        "q.i8": torch.randint(-128, 127, (11,), dtype=torch.int8),
        "mask": torch.rand(6) > 0.5,
        "view": torch.randn(6, 4).t(),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(5),
    }

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(float_dtype) if float_dtype is not None and tensor.is_floating_point() else tensor

    save_weights(state, tmp_path / "ours.safetensors", float_dtype=float_dtype)
    save_file(
        {k: cast(v).contiguous() for k, v in state.items()}, tmp_path / "theirs.safetensors", metadata={"format": "pt"}
    )
    with (
        safe_open(tmp_path / "ours.safetensors", "pt") as ours,
        safe_open(tmp_path / "theirs.safetensors", "pt") as theirs,
    ):
        assert sorted(ours.keys()) == sorted(theirs.keys()) == sorted(state)
        assert ours.metadata() == theirs.metadata()
        for name in state:
            mine, reference = ours.get_tensor(name), theirs.get_tensor(name)
            assert mine.dtype == reference.dtype == cast(state[name]).dtype and torch.equal(mine, reference), name
    assert not (tmp_path / "ours.safetensors.partial").exists()


def test_quantize_bad_input(tiny_model, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Only a few words of calibration text.\n")
    cases = [
        (["--method", "hqq"], "unknown --method"),
        (["--method", "awq", "--bits", "8"], "4-bit only"),
        (["--group-size", "256"], "does not divide"),
        (["--calib", str(small), "--group-size", "32"], "calibration text is"),
        (["--damp", "0"], "--damp must be"),
        (["--shrink", "1.5"], "shrinkage must be in [0, 1]"),
        (["--shrink", "x"], "--shrink must be"),
        (["--method", "awq", "--static-groups"], "AWQ has no act-order or static groups"),
        (["--clip"], "--clip is an AWQ option"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--seq-len", "0"], "--seq-len must be at least 1"),
        (["--calib", str(tmp_path / "missing.txt")], "cannot read calibration file"),
    ]
    for extra, message in cases:
        done = _qwen2("quantize", str(tiny_model), *extra, "--out", str(tmp_path / "q"), home=tmp_path)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    first = _rtn_quantized(tiny_model, tmp_path / "q1", home=tmp_path)
    assert first.returncode == 0, first.stderr
    again = _qwen2("quantize", str(tmp_path / "q1"), "--out", str(tmp_path / "q2"), home=tmp_path)
    assert again.returncode == 1 and "already quantized" in again.stderr


def test_quantize_settings_are_refused_before_torch_loads(tiny_model, tmp_path):
    """Options that cannot work are refused from the command line and config.json alone: with an importable torch
    that fails when imported, the refusal is still the one-line message, not the trap's."""
    trap = tmp_path / "trap" / "torch"
    trap.mkdir(parents=True)
    (trap / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    for extra, message in [
        (["--samples", "0"], "--samples must be at least 1"),
        (["--group-size", "256"], "does not divide"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "qwen2cli", "quantize", str(tiny_model), *extra, "--out", str(tmp_path / "q")],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "QWEN2_HOME": str(tmp_path), "PYTHONPATH": str(trap.parent)},
            stdin=subprocess.DEVNULL,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and message in lines[0], done.stderr


@pytest.mark.parametrize("load_in,bound,kernel", [("8bit", 0.02, INT8_CPU_KERNEL), ("4bit", 0.25, INT4_CPU_KERNEL)])
def test_load_in_quantizes_at_load(tiny_model, load_in, bound, kernel):
    """`--load-in` on CPU: every decoder Linear becomes a QuantLinear on a packed kernel; logits stay within the
    same bounds as a quantized checkpoint of the same kind; the head becomes int8 rows, the (untied) embedding
    stays float."""
    from qwen2cli.checkpoint import load_model
    from qwen2cli.kv_cache import KVCache
    from qwen2cli.quant.head import Int8Rows

    original = load_model(tiny_model, LoadOptions(device="cpu", dtype="float32"))
    quantized = load_model(tiny_model, LoadOptions(device="cpu", dtype="float32", load_in=load_in))
    layers = [m for m in quantized.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 * quantized.config.num_hidden_layers and {m.kernel for m in layers} == {kernel}
    assert isinstance(quantized.model.lm_head, Int8Rows)
    assert isinstance(quantized.model.model.embed_tokens, torch.nn.Embedding)
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original.model(ids, KVCache(original.config, 32), 0)
        got = quantized.model(ids, KVCache(quantized.config, 32), 0)
    assert ((got - expected).norm() / expected.norm()).item() < bound


@pytest.mark.parametrize("load_in", ["8bit", "4bit"])
def test_fused_projections_compute_what_the_separate_layers_do(tiny_model, load_in):
    """Where q/k/v and gate/up share one native kernel call, every decoding step gives the logits the separate
    layers give (the same rows, the same arithmetic), and a prompt of 128+ tokens goes through the separate layers."""
    from qwen2cli.checkpoint import load_model
    from qwen2cli.kv_cache import KVCache
    from tests.decode_paths import DecodePaths

    if not NATIVE:
        pytest.skip("the native kernel cannot build here (test_native_kernel_builds_where_it_can says why)")
    loaded = load_model(tiny_model, LoadOptions(device="cpu", dtype="bfloat16", load_in=load_in))
    paths = DecodePaths(loaded.model)
    assert len(paths.fused) == 2 * loaded.config.num_hidden_layers and None not in paths.fused.values()

    def decode(use_fused: bool) -> torch.Tensor:
        paths.use("python" if use_fused else "separate")  # the Python path: the C layers would read the fused tables
        cache = KVCache(loaded.config, 160, dtype=torch.bfloat16)
        ids = torch.randint(0, 400, (1, 140), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = [loaded.model(ids[:, :130], cache, 0)[0]]  # 130 rows: the separate layers' long path
            for position in range(130, 140):
                logits.append(loaded.model(ids[:, position : position + 1], cache, position)[0])
        return torch.cat(logits)

    torch.testing.assert_close(decode(True), decode(False), rtol=0, atol=0)


@pytest.mark.parametrize("load_in,dtype", [("8bit", "float32"), ("4bit", "float32"), ("4bit", "bfloat16")])
def test_native_decoder_layers_match_the_python_path(tiny_model, load_in, dtype):
    """One token through every layer in C (qwen2cli.native_decode, quant/qlayer.c) against the Python path over
    the same kernels, and both against exact float math (every layer on its dequantize-then-matmul reference):
    the activations' int8 rounding makes the two paths differ by flips of a rounding step, so the C path must be
    as close to exact as the Python path is (a wrong rotary, bias, norm, cache slot or attention would not be).
    The keys and values it writes serve a later prompt as the Python path's do."""
    from qwen2cli.checkpoint import load_model
    from qwen2cli.kv_cache import KVCache
    from qwen2cli.native_decode import NativeDecoder
    from qwen2cli.quantized_load import fuse_projections, quantize_at_load
    from tests.decode_paths import DecodePaths

    if not NATIVE:
        pytest.skip("the native kernel cannot build here (test_native_kernel_builds_where_it_can says why)")
    loaded = load_model(tiny_model, LoadOptions(device="cpu", dtype=dtype))
    model = loaded.model
    for block in decoder_layers(model):  # sharper attention than random weights give: positions must matter
        for projection in (block.self_attn.q_proj, block.self_attn.k_proj):
            projection.weight = torch.nn.Parameter(projection.weight * 3, requires_grad=False)
    quantize_at_load(model, load_in, device=torch.device("cpu"))
    fuse_projections(model)
    model.fast_decode = native = NativeDecoder.build(model)
    assert native is not None and len(native.layers) == loaded.config.num_hidden_layers

    paths = DecodePaths(model)
    ids = torch.randint(0, 400, (1, 48), generator=torch.Generator().manual_seed(2))
    torch_dtype = getattr(torch, dtype)

    def run(mode: str) -> torch.Tensor:
        """Logits of 12 prompt tokens, 24 decoded one by one, then 12 more as a prompt chunk."""
        paths.use(mode)
        cache = KVCache(loaded.config, 64, dtype=torch_dtype)
        with torch.no_grad():
            logits = [model(ids[:, :12], cache, 0)[0]]
            for position in range(12, 36):
                logits.append(model(ids[:, position : position + 1], cache, position)[0])
            logits.append(model(ids[:, 36:48], cache, 36)[0])
        first_layer[mode] = (cache.keys[0][:, :, :48].float(), cache.values[0][:, :, :48].float())
        return torch.cat(logits).float()

    first_layer: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    exact, python, native_logits = run("exact"), run("python"), run("native")
    # the first layer's keys and values (rotated, biased, in their slots) are the same whatever the path: its
    # inputs are the embeddings; bfloat16 caches round both alike
    for ours, theirs in zip(first_layer["native"], first_layer["python"], strict=True):
        tolerance = 2e-2 if dtype == "bfloat16" else 1e-5  # bfloat16: the Python path rounds after each op
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * theirs.abs().max().item())

    def error(logits: torch.Tensor) -> float:
        return ((logits - exact).norm() / exact.norm()).item()

    print(f"relative error to exact: native {error(native_logits):.5f}, python {error(python):.5f}")
    assert error(native_logits) < 1.5 * error(python) + 1e-3, (error(native_logits), error(python))
    assert ((native_logits - python).norm() / python.norm()).item() < (0.05 if load_in == "4bit" else 0.02)


@pytest.mark.parametrize("load_in,dtype", [("8bit", "float32"), ("4bit", "bfloat16")])
def test_sequences_decoded_together_get_what_each_gets_alone(tiny_model, load_in, dtype):
    """Several sequences' tokens through the C layers in one call (a server's batched step) give every sequence
    exactly the logits, and write exactly the cache, that decoding it alone gives: the weight reads are shared,
    each row's arithmetic is not. One to five rows (the kernel takes rows four at a time, then the rest)."""
    from qwen2cli.checkpoint import load_model
    from qwen2cli.kv_cache import KVCache
    from qwen2cli.serve.batch_decode import decode_step

    if not NATIVE:
        pytest.skip("the native kernel cannot build here (test_native_kernel_builds_where_it_can says why)")
    loaded = load_model(tiny_model, LoadOptions(device="cpu", dtype=dtype, load_in=load_in))
    model = loaded.model
    assert model.fast_decode is not None
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 400, (1, length), generator=generator) for length in (5, 17, 9, 30, 2)]
    steps = torch.randint(0, 400, (len(prompts), 6), generator=generator)

    def prefilled(count: int) -> list[KVCache]:
        caches = [KVCache(loaded.config, 48, dtype=torch_dtype) for _ in range(count)]
        with torch.no_grad():
            for cache, prompt in zip(caches, prompts, strict=False):
                model(prompt, cache, 0)
        return caches

    alone = []
    for row, cache in enumerate(prefilled(len(prompts))):
        with torch.no_grad():
            alone.append(
                [model(steps[row : row + 1, step : step + 1], cache, cache.pos)[0, -1].float() for step in range(6)]
            )
    for count in range(1, len(prompts) + 1):
        caches = prefilled(count)
        for step in range(6):
            with torch.no_grad():
                logits = decode_step(model, steps[:count, step].tolist(), caches, rows=count)
            for row in range(count):
                assert torch.equal(logits[row], alone[row][step]), (count, step, row)
        assert [cache.pos for cache in caches] == [len(prompt[0]) + 6 for prompt in prompts[:count]]


def test_a_dropped_quantized_model_is_freed_at_once(tiny_model):
    """No reference cycle through the native decoder: a dropped model's memory is returned when the last reference
    goes, not at some later garbage collection (a benchmark loading three times held three models)."""
    import gc
    import weakref

    from qwen2cli.checkpoint import load_model

    loaded = load_model(tiny_model, LoadOptions(device="cpu", dtype="float32", load_in="4bit"))
    assert loaded.model.fast_decode is not None or not NATIVE
    model = weakref.ref(loaded.model)
    gc.disable()
    try:
        del loaded
        assert model() is None
    finally:
        gc.enable()


def test_load_in_bad_input(tiny_model, tmp_path):
    bad = _qwen2("run", str(tiny_model), "hi", "--load-in", "2bit", home=tmp_path)
    assert bad.returncode == 1 and "unknown --load-in '2bit'" in bad.stderr and "Traceback" not in bad.stderr
    quantized = _rtn_quantized(tiny_model, tmp_path / "q", home=tmp_path)
    assert quantized.returncode == 0, quantized.stderr
    again = _qwen2("run", str(tmp_path / "q"), "hi", "--load-in", "8bit", home=tmp_path)
    assert again.returncode == 1 and "already quantized" in again.stderr


def test_int8_rows_quantize_in_chunks_and_compute_what_they_stand_for():
    """The int8 head: per row, codes * scale within half a step of the float row, scale = |row| max / 127 (the
    symmetric layout torch's int8 kernel computes); lookups are rows of the same table; short inputs (the int8
    kernel, bfloat16 activations) and long ones (float32 over dequantized chunks) compute x W^T."""
    from qwen2cli.quant.head import QUANTIZE_ROWS, Int8Rows

    generator = torch.Generator().manual_seed(0)
    rows, cols = QUANTIZE_ROWS + 904, 64  # two chunks, the second partial
    table = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 0, rows)[:, None]
    table[7] = 0  # an all-zero row quantizes to zeros, not NaN
    reads = []

    def read(begin: int, end: int) -> torch.Tensor:
        reads.append((begin, end))
        return table[begin:end].half()

    head = Int8Rows.from_rows(read, rows, cols)
    assert reads == [(0, QUANTIZE_ROWS), (QUANTIZE_ROWS, rows)]
    stored = table.half().float()
    torch.testing.assert_close(head.scales, stored.abs().amax(dim=1).clamp(min=1e-10) / 127)
    assert head.codes.dtype == torch.int8 and int(head.codes.abs().max()) == 127
    assert bool(((head.dequantized() - stored).abs() <= head.scales[:, None] / 2 + 1e-7).all())
    assert not bool(head.dequantized()[7].any())
    ids = torch.tensor([[0, 7, rows - 1], [QUANTIZE_ROWS, 5, 5]])
    assert torch.equal(head.lookup(ids), head.dequantized()[ids])
    for count, tolerance in ((3, 0.02), (200, 1e-5)):
        x = torch.randn(count, cols, generator=generator)
        expected = x @ head.dequantized().t()
        torch.testing.assert_close(head(x), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    # decoding's few rows keep the native kernel's float32 logits (no bfloat16 rounding before sampling); a whole
    # prompt's logits come back in the activations' dtype
    few, many = (torch.randn(count, cols, generator=generator).bfloat16() for count in (2, 200))
    assert head(few).dtype == (torch.float32 if head._native is not None else torch.bfloat16)
    assert head(many).dtype == torch.bfloat16


@pytest.mark.skipif(
    not NATIVE, reason="the native kernel cannot build here (test_native_kernel_builds_where_it_can says why)"
)
def test_a_quantized_load_builds_the_kernels_into_the_store_once(tmp_path):
    """Loading a quantized checkpoint compiles the native kernels into QWEN2_HOME's cache, where the next process
    finds them: the int8 head asked for them before the cache was set, and every load compiled them afresh into a
    private directory (1.8 s of a 3.8 s load)."""
    from devtools.tiny_checkpoint import write_tiny_checkpoint

    source = write_tiny_checkpoint(tmp_path / "float")
    done = _qwen2(
        "quantize", str(source), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "q"), home=tmp_path
    )
    assert done.returncode == 0, done.stderr
    kernels = tmp_path / "cache" / "kernels"
    shutil.rmtree(kernels, ignore_errors=True)
    done = _qwen2("run", str(tmp_path / "q"), "hello", "--max-tokens", "2", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(list(kernels.glob("qgemv-*.so"))) == 1


@pytest.mark.parametrize("tie", [False, True])
def test_quantized_checkpoint_loads_with_an_int8_head(tmp_path, tie):
    """A quantized checkpoint on CPU runs its head as int8 rows quantized from the file (a tied embedding looks up
    the same table): its logits stay within 4% of the same checkpoint with the float head (random tiny weights:
    a tied table's rounded rows move every layer's int8-rounded activations too; 0.9% with torch's kernels)."""
    from devtools.tiny_checkpoint import write_tiny_checkpoint
    from qwen2cli.checkpoint import load_model
    from qwen2cli.kv_cache import KVCache
    from qwen2cli.quant.head import Int8Lookup, Int8Rows

    source = write_tiny_checkpoint(tmp_path / "float", tie=tie)
    done = _qwen2(
        "quantize", str(source), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "q"), home=tmp_path
    )
    assert done.returncode == 0, done.stderr
    int8 = load_model(tmp_path / "q", LoadOptions(device="cpu", dtype="float32"))
    full = load_model(tmp_path / "q", LoadOptions(device="cpu", dtype="float32", float_head=True))
    assert isinstance(int8.model.lm_head, Int8Rows) and isinstance(full.model.lm_head, torch.nn.Linear)
    embedding = int8.model.model.embed_tokens
    assert isinstance(embedding, Int8Lookup) if tie else isinstance(embedding, torch.nn.Embedding)
    assert not isinstance(
        load_model(source, LoadOptions(device="cpu")).model.lm_head, Int8Rows
    )  # float models keep theirs
    ids = torch.randint(0, 400, (1, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for length in (4, 160):  # the int8 kernel and the long-input path
            expected = full.model(ids[:, :length], KVCache(full.config, 160), 0)
            got = int8.model(ids[:, :length], KVCache(int8.config, 160), 0)
            assert ((got - expected).norm() / expected.norm()).item() < 0.04
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n" * 8)
    scores = []
    for extra in ([], ["--float-head"]):  # the command line's way to keep the float head
        done = _qwen2(
            "perplexity", str(tmp_path / "q"), "--file", str(text), "--ctx", "64", "--json", *extra, home=tmp_path
        )
        assert done.returncode == 0, done.stderr
        scores.append(json.loads(done.stdout)["ppl"])
    assert scores[0] != scores[1] and abs(scores[0] - scores[1]) < 0.02 * scores[1]


def test_native_kernel_builds_where_it_can():
    """Where there is a C compiler and an x86-64 CPU with AVX2 and FMA, the native int4 kernel must build and load
    (so that CI cannot quietly fall back to torch's slower kernel)."""
    import platform
    import shutil
    from pathlib import Path

    flags = (
        next(
            (
                line.split(":", 1)[1].split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            [],
        )
        if Path("/proc/cpuinfo").exists()
        else []
    )
    can = (
        platform.machine() == "x86_64"
        and shutil.which("gcc") is not None
        and {"avx2", "fma"} <= set(flags)
        and os.environ.get("QWEN2_NATIVE") != "0"
    )
    if not can:
        pytest.skip("no gcc, or not an x86-64 CPU with AVX2 and FMA: torch's int4 kernel is used")
    assert native_library() is not None


@pytest.mark.skipif(
    not NATIVE, reason="the native kernel cannot build here (test_native_kernel_builds_where_it_can says why)"
)
def test_native_exp_is_within_two_ulp_of_exp():
    """The C layer's SiLU and softmax use their own 8-wide exp: against float64 exp over the range where float32's
    exp is finite and normal, within 2 ulp; clamped outside it (tiny stays tiny, overflow stays huge)."""
    library = native_library()
    assert library is not None
    x = torch.cat(
        [torch.linspace(-87.3, 88.37, 200_000), torch.tensor([-1e4, -200.0, -88.0, 89.0, 200.0, 1e4, 0.0, 1.0])]
    )
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    library.qlayer_exp(x.data_ptr(), out.data_ptr(), x.numel())
    inside = (x >= -87.3) & (x <= 88.37)
    exact = x[inside].double().exp()
    ulp = (exact.float().nextafter(torch.tensor(float("inf"))) - exact.float()).double()
    assert ((out[inside].double() - exact).abs() / ulp).max() <= 2.0
    assert (out[x < -87.3] < 1.3e-38).all() and (out[x > 88.37] > 2e38).all() and torch.isfinite(out).all()


def _native_builds() -> list:
    """The kernel builds this CPU can run: AVX2 always, and the AVX-512 VNNI one where native_flags() adds it."""
    from qwen2cli.quant.native import FLAGS, native_flags

    return [pytest.param(tuple(FLAGS), id="avx2")] + (
        [pytest.param(native_flags(), id="avx512-vnni")] if native_flags() != tuple(FLAGS) else []
    )


@pytest.mark.parametrize("flags", _native_builds())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "rows,in_features,out_features,group",
    [(1, 96, 40, 32), (3, 384, 24, 128), (127, 256, 8, 64), (2, 512, 16, 256), (5, 224, 8, 224)],
)
def test_native_kernel_within_its_activation_rounding(flags, bits, rows, in_features, out_features, group):
    """qgemv.c rounds the activations to int8 in blocks of 32 (scale: the block's |x| max / 127): its result may
    differ from x W^T by at most sum_i |w_i| * (that scale / 2), a bound computed here from x alone. Each build
    this CPU runs (the AVX-512 one takes two blocks at a time where a group holds an even number of them: not
    group 32, nor 224's 7), with float32 tables and with float16 scales and int16 zeros."""
    from qwen2cli.quant.codes import pack_q4, pack_q8, unpack_q4
    from qwen2cli.quant.native import build_library, native_matmul

    library = build_library(flags)
    if library is None:
        pytest.skip("the native kernel cannot build here (test_native_kernel_builds_where_it_can says why)")
    generator = torch.Generator().manual_seed(rows)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=generator)
    groups = in_features // group
    scales = torch.rand(out_features, groups, 1, generator=generator) * 0.1
    zeros = torch.randint(0, 2**bits, (out_features, groups, 1), generator=generator)
    weight = (scales * (codes.view(out_features, groups, group) - zeros)).view(out_features, in_features)
    if bits == 4:
        assert torch.equal(unpack_q4(pack_q4(codes)).long(), codes)
        packed, offsets = pack_q4(codes), -scales * zeros
    else:
        packed, offsets = pack_q8(codes), scales * (128 - zeros)
        assert torch.equal(packed.long() + 128, codes)
    x = torch.randn(rows, in_features, generator=generator) * torch.logspace(-2, 1, in_features)
    expected = x.double() @ weight.double().t()
    step = x.view(rows, -1, 32).abs().amax(dim=-1).repeat_interleave(32, dim=-1) / 127  # (rows, in)
    bound = (step.double() / 2) @ weight.abs().double().t() + 1e-4 * expected.abs().max()
    got = native_matmul(library, f"q{bits}", x.contiguous(), packed, scales.contiguous(), offsets.contiguous(), group)
    assert bool(((got.double() - expected).abs() <= bound).all())
    scales16 = scales.squeeze(-1).half()  # the checkpoints' layout: (stored - zero) * scale
    weight16 = (scales16.double().unsqueeze(-1) * (codes.view(out_features, groups, group) - zeros)).view_as(weight)
    expected16 = x.double() @ weight16.t()
    bound16 = (step.double() / 2) @ weight16.abs().t() + 1e-4 * expected16.abs().max()
    stored_zeros = (zeros.squeeze(-1) - (128 if bits == 8 else 0)).to(torch.int16)
    got16 = native_matmul(library, f"q{bits}", x.contiguous(), packed, scales16.contiguous(), stored_zeros, group)
    assert bool(((got16.double() - expected16).abs() <= bound16).all())


def test_truncated_quantized_checkpoint_is_a_one_line_error(tiny_model, tmp_path):
    """A quantized checkpoint's files are read before the weights (for the int8 head and repacking): a truncated
    one is the same one-line "corrupt or truncated" error as a float checkpoint's."""
    done = _rtn_quantized(tiny_model, tmp_path / "q", home=tmp_path)
    assert done.returncode == 0, done.stderr
    weights = tmp_path / "q" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    broken = _qwen2("run", str(tmp_path / "q"), "hi", "--max-tokens", "2", home=tmp_path)
    assert broken.returncode == 1 and "corrupt or truncated" in broken.stderr and "Traceback" not in broken.stderr


@pytest.mark.parametrize(
    "heads,kv_heads,length,start,head_dim,dtype",
    [
        (14, 2, 131, 0, 64, torch.float32),
        (4, 2, 37, 5, 16, torch.float32),
        (8, 1, 130, 70, 128, torch.bfloat16),
        (2, 2, 3, 200, 32, torch.bfloat16),
        (6, 3, 64, 64, 48, torch.float32),
    ],
)
def test_prefill_attention_kernel_equals_causal_attention(heads, kv_heads, length, start, head_dim, dtype):
    """quant/attention.c (AVX-512 builds) against causal attention written out in float64: chunks at an offset into
    the cache, row counts not a multiple of its 4-row tiles, keys across several 64-key blocks, bfloat16 caches,
    head sizes of 16 to 128, a query laid out (length, heads, d) as the projection gives it."""
    from qwen2cli.quant.native import _cpu_has_all, native_library, prefill_attention

    library = native_library()
    if library is None or not library.attention_supported():
        assert not _cpu_has_all("avx512f", "avx512bw", "avx512vl", "avx512_vnni") or library is None
        pytest.skip("no AVX-512 build of the native kernels here: torch's attention is used")
    generator = torch.Generator().manual_seed(length)
    keys_total = start + length
    q = torch.randn(length, heads, head_dim, generator=generator).transpose(0, 1)
    keys = torch.randn(kv_heads, keys_total + 5, head_dim, generator=generator).to(dtype)  # a longer cache
    values = torch.randn(kv_heads, keys_total + 5, head_dim, generator=generator).to(dtype)
    got = prefill_attention(q, keys, values, start)
    assert got is not None
    group = heads // kv_heads
    k, v = (t[:, :keys_total].double().repeat_interleave(group, dim=0) for t in (keys, values))
    scores = q.double() @ k.transpose(1, 2) / head_dim**0.5  # (heads, length, keys)
    allowed = torch.arange(keys_total)[None, :] <= start + torch.arange(length)[:, None]
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


def test_bfloat16_calibration_forwards_keep_float32_hessians(tiny_model, monkeypatch):
    """Where the CPU multiplies bfloat16 natively, calibration forwards run under bfloat16 autocast; the Hessians
    the hooks gather inside them stay float32 sums of the inputs seen (autocast would make x^T x bfloat16, three
    significant digits), and the layer's output keeps float32 within bfloat16's rounding of the products."""
    from qwen2cli.generate import load_engine
    from qwen2cli.quantization.awq_layer import capture_inputs
    from qwen2cli.quantization.gptq_layer import gptq_stage
    from qwen2cli.quantization.layers import linears_to_quantize, run_layer
    from qwen2cli.quantization.settings import QuantizeSettings

    engine = load_engine(tiny_model, LoadOptions(device="cpu", dtype="float32"))
    model, config = engine.loaded.model, engine.config
    layer = model.model.layers[0]
    quant_config = QuantizeSettings(method="gptq", bits=4, group_size=32, desc_act=False).quant_config
    hidden = torch.randn(3, 16, config.hidden_size, generator=torch.Generator().manual_seed(0))
    rope = model._rope_tables(0, 16, hidden.device)
    monkeypatch.setattr(quant.linear, "long_input_dtype", lambda: torch.float32)
    with torch.no_grad():
        exact = run_layer(layer, hidden, rope, config)
    monkeypatch.setattr(quant.linear, "long_input_dtype", lambda: torch.bfloat16)
    seen, collectors = [], []
    add_batch = GPTQ.add_batch

    def spy(self, inputs):
        seen.append(inputs.detach().reshape(-1, inputs.shape[-1]).float().clone())
        collectors.append(self)
        add_batch(self, inputs)

    monkeypatch.setattr(GPTQ, "add_batch", spy)
    with torch.no_grad():
        fast = run_layer(layer, hidden, rope, config)
        stage = {
            name: linear
            for name, linear in linears_to_quantize(layer).items()
            if name.endswith(("gate_proj", "up_proj"))
        }
        gptq_stage(layer, stage, hidden, rope, config, quant_config)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)  # the products did run in bfloat16
    torch.testing.assert_close(fast, exact, atol=0.05 * exact.abs().max().item(), rtol=0.02)
    x = torch.cat(seen)
    assert collectors and collectors[-1].gram.full().dtype == torch.float32
    torch.testing.assert_close(
        collectors[-1].gram.full(), x.t() @ x, rtol=1e-5, atol=1e-5 * (x.t() @ x).abs().max().item()
    )
    # AWQ's statistics: the Gram matrix of down_proj's inputs (more tokens than its 128 inputs: a Gram, not rows)
    name = next(name for name in linears_to_quantize(layer) if name.endswith("down_proj"))
    inputs = []
    handle = layer.get_submodule(name).register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().clone())
    )
    more = torch.randn(12, 16, config.hidden_size, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            stats = capture_inputs(layer, [name], more, rope, config)
    finally:
        handle.remove()
    x = torch.cat(inputs)
    assert x.shape[0] > x.shape[1] and stats.gram[name].full().dtype == torch.float32
    torch.testing.assert_close(
        stats.gram[name].full(), x.t() @ x, rtol=1e-5, atol=1e-5 * (x.t() @ x).abs().max().item()
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_quantize_keeps_freed_memory_for_reuse():
    """After keep_freed_memory(), allocating and freeing a 64 MB tensor 20 times reuses its pages (glibc here
    faults them in for the first 5 and then never again); by default each is a fresh mmap faulted in anew."""
    script = """
import resource, sys, torch
from qwen2cli.weights import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 << 20)
before = faults()
for _ in range(20):
    torch.ones(16 << 20)
print(faults() - before)
"""
    pages = 64 << 20 >> 12
    counts = {}
    for mode in ("keep", "default"):
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        counts[mode] = int(done.stdout.split()[-1])
    assert counts["default"] > 15 * pages and counts["keep"] < counts["default"] // 2, counts


def test_mo_catalogues_read_as_gettext_reads_them():
    """Our .mo reader (the calibration's multilingual part) gives the translated strings the standard library's
    gettext reader gives, header excluded, for catalogues of several languages on this machine."""
    import gettext

    from qwen2cli.quantization.calibration import CALIBRATION_LANGUAGES, LOCALE_DIR, mo_translations

    catalogues = [
        sorted((LOCALE_DIR / language / "LC_MESSAGES").glob("*.mo"))[:3] for language in ("zh_CN", "ar", "de")
    ]
    assert all(catalogues), f"no gettext catalogues under {LOCALE_DIR}: install a system with locales"
    for path in sum(catalogues, []):
        with path.open("rb") as handle:
            # the catalogue has no public accessor: its private dict is the reference
            reference = gettext.GNUTranslations(handle)._catalog  # type: ignore[attr-defined]
        expected = sorted(v for k, v in reference.items() if (k[0] if isinstance(k, tuple) else k) and v)
        assert sorted(mo_translations(path)) == expected, path
    assert len(CALIBRATION_LANGUAGES) >= 10
    assert mo_translations(LOCALE_DIR / "no-such.mo") == [] and mo_translations(Path(__file__)) == []


def test_default_calibration_is_multilingual_and_the_same_on_every_run(tmp_path):
    """The default calibration text carries each calibration language's translations, is the same text whatever
    the hash seed (sets must not order it), and is the English and code parts alone where the system has no
    catalogues."""
    import hashlib

    from qwen2cli.quantization.calibration import CALIBRATION_LANGUAGES, default_calibration_text, translations

    parts = translations()
    assert len(parts) == len(CALIBRATION_LANGUAGES), "gettext catalogues missing for some calibration languages"
    text = default_calibration_text()
    assert all(part in text for part in parts)
    assert any("\u4e00" <= c <= "\u9fff" for c in parts[0]) and any("\u0600" <= c <= "\u06ff" for c in parts[9])
    assert translations(locale_dir=tmp_path) == []
    digests = set()
    for seed in ("1", "2"):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from qwen2cli.quantization.calibration import default_calibration_text as t;"
                "import hashlib; print(hashlib.sha256(t().encode()).hexdigest())",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        )
        digests.add(done.stdout.strip())
    assert digests == {hashlib.sha256(text.encode()).hexdigest()}
