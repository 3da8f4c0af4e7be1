"""GPTQ over one Qwen2 / Qwen2-MoE decoder layer, true-sequentially: each stage of Linears is quantized on inputs
that the stages before it produce already quantized (quant.gptq holds the model-agnostic algorithm)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import linears_to_quantize, replace_modules, run_layer, stand_in

STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def stages(linears: dict[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    """True-sequential order: attention inputs, attention output, MLP inputs (experts too), MLP output."""
    ordered = [
        {name: linear for name, linear in linears.items() if name.rsplit(".", 1)[-1] in suffixes} for suffixes in STAGES
    ]
    rest = {name: linear for name, linear in linears.items() if not any(name in stage for stage in ordered)}
    return [stage for stage in [*ordered, rest] if stage]


class _Captured(Exception):
    """Raised by a hook once the last input a stage needs has been seen: the rest of the layer need not run."""


def gptq_stage(
    layer: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, rope: Any, config: Any, quant_config: Any
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Collect the Hessians of these Linears over the calibration inputs, then GPTQ each of them. Returns the
    packed QuantLinears, and float Linears holding the same dequantized weights for the later stages to run on."""
    from ..quant.gptq import GPTQ
    from ..quant.linear import QuantLinear

    # Linears under one parent in one stage read the same input (q/k/v; gate/up): one Hessian serves them all
    collectors: dict[str, GPTQ] = {}
    readers: dict[str, str] = {}
    for name, linear in linears.items():
        parent = name.rpartition(".")[0]
        if parent not in readers:
            readers[parent] = name
            collectors[name] = GPTQ(linear.in_features, device=linear.weight.device)
        collectors[name] = collectors[readers[parent]]
    last = list(readers.values())[-1] if len(readers) == 1 else None  # one reader: stop the layer right there

    def collect(name: str, inputs: torch.Tensor) -> None:
        with torch.autocast("cpu", enabled=False):  # the Hessian in float32, whatever run_layer multiplies in
            collectors[name].add_batch(inputs)
        if name == last:
            raise _Captured

    hooks = [
        linears[name].register_forward_pre_hook(lambda m, args, n=name: collect(n, args[0]))
        for name in readers.values()
    ]
    try:
        for begin in range(0, hidden.shape[0], 8):
            try:
                run_layer(layer, hidden[begin : begin + 8], rope, config)
            except _Captured:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    packed: dict[str, nn.Module] = {}
    simulated: dict[str, nn.Module] = {}
    for reader in readers.values():
        # GPTQ treats output rows independently given H: the Linears sharing a Hessian are quantized as one
        # stacked weight, one inverse and one pass over the columns instead of one each
        names = [name for name in linears if collectors[name] is collectors[reader]]
        stacked = torch.cat([linears[name].weight.detach() for name in names])
        result = collectors[reader].quantize(
            stacked,
            bits=quant_config.bits,
            group_size=quant_config.group_size,
            sym=quant_config.sym,
            desc_act=quant_config.desc_act,
            static_groups=quant_config.static_groups,
            damp_percent=quant_config.damp_percent,
            mse=quant_config.mse,
            shrink=quant_config.hessian_shrink,
        )
        begin = 0
        for name in names:
            linear = linears[name]
            end = begin + linear.out_features
            packed[name] = QuantLinear.from_quantized(
                result.codes[begin:end],
                result.scales[:, begin:end],
                result.zeros[:, begin:end],
                result.g_idx.clone(),
                linear.bias,
                quant_config,
            )
            simulated[name] = stand_in(linear, packed[name])
            begin = end
    return packed, simulated


def gptq_layer(
    layer: nn.Module, hidden: torch.Tensor, rope: Any, config: Any, quant_config: Any
) -> dict[str, nn.Module]:
    """GPTQ every quantized Linear of the layer, stage by stage. Leaves float stand-ins in the layer (for running
    the calibration on to the next layer) and returns the packed QuantLinears to put in their place."""
    packed: dict[str, nn.Module] = {}
    for stage in stages(linears_to_quantize(layer)):  # each stage sees the stages before it quantized
        stage_packed, simulated = gptq_stage(layer, stage, hidden, rope, config, quant_config)
        replace_modules(layer, simulated)
        packed.update(stage_packed)
    return packed
