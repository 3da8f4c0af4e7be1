"""QuantLinears made from other modules: one standing for several that read the same input (fuse_native), a
float Linear rounded to the nearest (quantize_linear), and empty ones put in a float model's place before its
quantized weights load (replace_linears)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import QuantConfig
from .linear import QuantLinear
from .rtn import quantize_rtn


def fuse_native(layers: list[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear giving `layers`' outputs side by side, for layers that read the same input (q/k/v, gate/up),
    or None unless all run on the same native CPU kernel with the same groups and input order. A decoded token
    then makes one kernel call where it made two or three (each call's fixed cost is about a third of a 128x896
    one's). The layers' own tables become views of the fused ones: no second copy of the codes."""
    first = layers[0]
    if first._native is None or not all(layer.fusable for layer in layers):  # _native: set for the native kernels
        return None
    orders = [layer._fast.get("order") for layer in layers]
    tables = first._native_tables()
    if any(
        layer.kernel != first.kernel
        or layer.group_size != first.group_size
        or layer.in_features != first.in_features
        or layer._native_tables() != tables
        or layer._interleaved != first._interleaved
        for layer in layers
    ):
        return None
    first_order = orders[0]
    if any(
        (order is None) != (first_order is None)
        or (order is not None and first_order is not None and not torch.equal(order, first_order))
        for order in orders
    ):
        return None
    sizes = [layer.out_features for layer in layers]
    # only the kernel's tables: no packed-layout buffers, never read here (and building them on the meta device
    # would import torch's reference decompositions for floor_divide: 1.8 s and 50 MB at load)
    fused = type(first).__new__(type(first))  # a subclass's description (extra_repr) of its layers holds for it
    nn.Module.__init__(fused)
    fused.in_features, fused.out_features, fused.config = first.in_features, sum(sizes), first.config
    fused.group_size = first.group_size
    fused.register_buffer("bias", None)
    fused._fast = {}
    kind = first.kernel[:2]
    if any(layer.bias is not None for layer in layers):
        device = first._fast[kind].device
        fused.bias = torch.cat(
            [
                torch.zeros(layer.out_features, device=device) if layer.bias is None else layer.bias.float()
                for layer in layers
            ]
        )  # float32, as the kernel's output
    for key in (kind, *tables):
        fused._fast[key] = torch.cat([layer._fast[key] for layer in layers])
        for layer, part in zip(layers, fused._fast[key].split(sizes), strict=True):
            layer._fast[key] = part  # rows of a contiguous tensor: contiguous views
    if orders[0] is not None:
        fused._fast["order"] = orders[0]
    fused.kernel, fused._native, fused._interleaved = first.kernel, first._native, first._interleaved
    return fused


def quantize_linear(linear: nn.Linear, config: QuantConfig) -> QuantLinear:
    """Round-to-nearest quantization of a float Linear (what `--load-in 4bit|8bit` does on CPU)."""
    codes, scales, zeros = quantize_rtn(
        linear.weight.detach().float(),
        bits=config.bits,
        group_size=config.group_size_for(linear.in_features),
        sym=config.sym,
    )
    g_idx = torch.arange(linear.in_features, device=codes.device) // config.group_size_for(linear.in_features)
    return QuantLinear.from_quantized(codes, scales, zeros, g_idx, linear.bias, config)


def replace_linears(module: nn.Module, config: QuantConfig, *, dtype: torch.dtype, skip: Callable[[str], bool]) -> None:
    """Swap every nn.Linear whose qualified name `skip` rejects for an empty QuantLinear (on the meta device too)."""
    for name, child in list(module.named_modules()):
        for attribute, sub in list(child.named_children()):
            qualified = f"{name}.{attribute}" if name else attribute
            if isinstance(sub, nn.Linear) and not skip(qualified):
                # made where the Linear is (the meta device at load): zero-filled CPU buffers of a model's size, each
                # freed at once, still left ~150 MB of touched heap behind at a 0.5B load
                setattr(
                    child,
                    attribute,
                    QuantLinear(
                        sub.in_features,
                        sub.out_features,
                        bias=sub.bias is not None,
                        config=config,
                        dtype=dtype,
                        device=sub.weight.device,
                    ),
                )
