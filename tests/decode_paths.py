"""Switching a loaded quantized model between its ways of decoding, for tests that compare them."""

from __future__ import annotations

from torch import nn

from qwen2cli.model import MLP, Attention, Qwen2ForCausalLM
from qwen2cli.quant.linear import QuantLinear


def _slot(block: nn.Module) -> str:
    return "fused_qkv" if isinstance(block, Attention) else "fused_gate_up"


class DecodePaths:
    """`use(mode)`: 'native', a decoded token's layers in C (qwen2cli.native_decode); 'python', the Python path
    over the same kernels, fused projections included; 'separate', the Python path with one kernel call per
    layer; 'exact', every layer on its dequantize-then-matmul reference (float math, no int8 activations)."""

    def __init__(self, model: Qwen2ForCausalLM) -> None:
        self.model, self.native = model, model.fast_decode
        self.kernels = {m: m.kernel for m in model.modules() if isinstance(m, QuantLinear)}
        self.fused = {m: getattr(m, _slot(m)) for m in model.modules() if isinstance(m, (Attention, MLP))}

    def use(self, mode: str) -> None:
        assert mode in ("native", "python", "separate", "exact"), mode
        self.model.fast_decode = self.native if mode == "native" else None
        for layer, kernel in self.kernels.items():
            layer.kernel = "reference" if mode == "exact" else kernel
        for block, fused in self.fused.items():
            setattr(block, _slot(block), None if mode in ("separate", "exact") else fused)
