"""What the GPTQ, AWQ and RTN passes share over one decoder layer: which Linears are quantized, running the layer
over the calibration samples, and swapping modules in."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kv_cache import KVCache
from ..quantized_load import keeps_float


def linears_to_quantize(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's Linears by qualified name, but the ones that stay float (routers and gates)."""
    return {
        name: module
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and not keeps_float(name)
    }


def forward_precision(device: torch.device) -> torch.autocast:
    """bfloat16 autocast for calibration forwards on CPUs that multiply bfloat16 natively (see run_layer)."""
    from ..quant.linear import long_input_dtype

    fast = device.type == "cpu" and long_input_dtype() == torch.bfloat16
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast)


def run_layer(layer: nn.Module, hidden: torch.Tensor, rope: Any, config: Any, *, batch: int = 8) -> torch.Tensor:
    """One decoder layer over every calibration sample, a few samples at a time. On CPUs that multiply bfloat16
    natively (quant.linear.long_input_dtype) its products run in bfloat16 under autocast, the residual stream and
    the Hessians staying float32, as GPU GPTQ runs its calibration in the model's 16-bit dtype: in float32 these
    forwards were most of a small model's quantization time."""
    outputs = []
    with forward_precision(hidden.device):
        for begin in range(0, hidden.shape[0], batch):
            piece = hidden[begin : begin + batch]
            cache = KVCache(config, piece.shape[1], batch_size=piece.shape[0], dtype=piece.dtype, device=piece.device)
            outputs.append(layer(piece, rope, cache, 0).float())
    return torch.cat(outputs)


def replace_modules(layer: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Put each module at its qualified name inside `layer`."""
    for name, replacement in replacements.items():
        parent, _, attribute = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attribute, replacement)


def stand_in(linear: nn.Linear, packed: Any) -> nn.Linear:
    """A float Linear computing what `packed` (a QuantLinear) computes, for running calibration data through the
    layer without unpacking on every call."""
    float_linear = torch.nn.utils.skip_init(
        nn.Linear, linear.in_features, linear.out_features, bias=linear.bias is not None
    )  # no random init of a weight replaced next
    float_linear.weight = nn.Parameter(packed.dequantized_weight(), requires_grad=False)
    if linear.bias is not None:
        float_linear.bias = nn.Parameter(packed.bias.float(), requires_grad=False)
    return float_linear
