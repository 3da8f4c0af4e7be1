"""AWQ over a Qwen2 / Qwen2-MoE decoder layer: which Linears share a scaling, the calibration statistics each search
reads, and the layer quantized (quant.awq holds the model-agnostic searches)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..kv_cache import KVCache
from ..quant.gram import Gram
from .layers import forward_precision, linears_to_quantize, run_layer, stand_in


@dataclass(frozen=True)
class ScaleGroup:
    """AWQ: Linears sharing one input-channel scaling and the op before them that absorbs 1/scale (an RMSNorm or
    a Linear). `reads` names the module whose input is theirs."""

    prev: str
    linears: tuple[str, ...]
    reads: str


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """A Qwen2 / Qwen2-MoE decoder layer's AWQ scale groups. v_proj -> o_proj exists only without GQA (with fewer
    KV heads, v_proj's outputs are not o_proj's inputs one to one), so it is skipped then."""
    attention: Any = layer.self_attn
    groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
    if attention.v_proj.out_features == attention.o_proj.in_features:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    mlps = [name for name, module in layer.named_modules() if name.startswith("mlp") and hasattr(module, "up_proj")]
    readers = tuple(
        name
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("mlp") and not name.endswith("down_proj")
    )  # router and gates included
    groups.append(ScaleGroup("post_attention_layernorm", readers, "mlp"))
    groups += [ScaleGroup(f"{mlp}.up_proj", (f"{mlp}.down_proj",), f"{mlp}.down_proj") for mlp in mlps]
    return groups


class InputStats:
    """Per module: the inputs themselves while there are fewer tokens than input channels, then the sum of x x^T
    (cheaper from there on); and the sum of |x|, over every calibration token."""

    def __init__(self) -> None:
        self.gram: dict[str, Gram] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}  # see capture_inputs

    def add(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if name not in self.abs_sum:
            self.rows[name] = []
            self.abs_sum[name] = torch.zeros(flat.shape[1], device=flat.device)
            self.count[name] = 0
        self.abs_sum[name] += flat.abs().sum(0)
        self.count[name] += flat.shape[0]
        if name in self.gram:
            self.gram[name].add(flat)
        else:
            self.rows[name].append(flat)
            if self.count[name] > flat.shape[1]:
                self.gram[name] = Gram(flat.shape[1], device=flat.device)
                self.gram[name].add(torch.cat(self.rows.pop(name)))

    def seen(self, name: str) -> bool:
        return name in self.abs_sum

    def inputs(self, name: str) -> dict[str, torch.Tensor]:
        """What `quant.awq.search_scales` measures output error with: `rows=` or `gram=`."""
        return {"gram": self.gram[name].full()} if name in self.gram else {"rows": torch.cat(self.rows[name])}

    def full_gram(self, name: str) -> torch.Tensor:
        if name in self.gram:
            return self.gram[name].full()
        rows = torch.cat(self.rows[name])
        return rows.t() @ rows

    def mean_abs(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / self.count[name]


def capture_inputs(
    layer: nn.Module,
    names: list[str],
    hidden: torch.Tensor,
    rope,
    config,
    *,
    keep: Collection[str] = (),
    keep_samples: int = 0,
) -> InputStats:
    """Run the layer over every sample, gathering the statistics of the named modules' inputs (MoE experts: only
    the tokens routed to them); the inputs themselves of the modules in `keep`, for the first `keep_samples`
    samples, go to `stats.kept`."""
    stats = InputStats()
    keeping = [False]

    def hook(name: str, x: torch.Tensor) -> None:
        with torch.autocast("cpu", enabled=False):  # statistics in float32, whatever run_layer multiplies in
            stats.add(name, x)
            if keeping[0] and name in keep:
                stats.kept.setdefault(name, []).append(x.detach().float().clone())

    handles = [
        layer.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: hook(n, a[0])) for name in names
    ]
    try:
        for begin in range(0, hidden.shape[0], 8):
            keeping[0] = begin < keep_samples
            run_layer(layer, hidden[begin : begin + 8], rope, config)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def module_error(
    module: nn.Module, linears: list[nn.Linear], inputs: list[torch.Tensor], rope, config
) -> Callable[[list[torch.Tensor]], float]:
    """The relative output error of `module` (an attention block or an MLP) over `inputs` when `linears`, inside
    it, compute with the given weights instead of their own: AWQ's scale-search objective for the Linears that
    feed a larger module. Through attention, q/k errors weigh as much as they move the softmax; summing the
    Linears' own output errors instead lets q_proj's seven times wider output outweigh v_proj's."""
    from ..model import Attention

    def run(x: torch.Tensor) -> torch.Tensor:
        with forward_precision(x.device):
            if isinstance(module, Attention):
                cache = KVCache(config, x.shape[1], batch_size=x.shape[0], dtype=x.dtype, device=x.device)
                return module(x, rope, cache, 0).float()
            return module(x).float()

    references = [run(x) for x in inputs]
    energy = sum(float(r.pow(2).sum()) for r in references) or 1.0

    def error(weights: list[torch.Tensor]) -> float:
        own = [linear.weight for linear in linears]
        try:
            for linear, weight in zip(linears, weights, strict=True):
                linear.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)
            return sum(float((run(x) - r).pow(2).sum()) for x, r in zip(inputs, references, strict=True)) / energy
        finally:
            for linear, weight in zip(linears, own, strict=True):
                linear.weight = weight

    return error


def awq_layer(
    layer: nn.Module, hidden: torch.Tensor, rope, config, quant_config, *, module_samples: int = 16, clip: bool = False
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Scale each group; with `clip`, clip each Linear (but q/k, whose errors softmax amplifies); round to nearest.
    Returns the packed QuantLinears and float stand-ins with the same dequantized weights.

    One pass over the calibration data serves both searches: a scale group's Linears read its reader's input
    divided by the group's scales, so their inputs' Gram matrix after scaling is D G D with D = diag(1/scales), and
    the clipping search runs on every calibration token instead of a sample of them."""
    from ..quant.awq import apply_clip, search_clip, search_scales
    from ..quant.linear import QuantLinear
    from ..quant.rtn import quantize_rtn

    bits, group_size, sym = quant_config.bits, quant_config.group_size, quant_config.sym
    quantizable = linears_to_quantize(layer)
    groups = scale_groups(layer)
    # whose input is each Linear's own: its scale group's reader when that is the Linear or its parent (q/k/v under
    # self_attn, gate/up under a dense mlp), else the Linear itself (o_proj under GQA, MoE experts' routed tokens)
    source = {
        name: next((g.reads for g in groups if name in g.linears and g.reads in (name, name.rpartition(".")[0])), name)
        for name in quantizable
    }
    # groups feeding a module (attention, MLP) are scored on its output, over the first `module_samples` samples
    modules = {g.reads for g in groups if not isinstance(layer.get_submodule(g.reads), nn.Linear)}
    # the clipping search reads each Linear's own input: those statistics are gathered only when it runs
    read = {g.reads for g in groups} | (set(source.values()) if clip else set())
    stats = capture_inputs(layer, sorted(read), hidden, rope, config, keep=modules, keep_samples=module_samples)
    input_scales: dict[str, torch.Tensor] = {}
    for group in groups:
        if not stats.seen(group.reads):  # an expert no calibration token reached: leave it unscaled
            continue
        names = [n for n in group.linears if n in quantizable]
        weights = [quantizable[n].weight for n in names]
        if group.reads in stats.kept:
            measure = module_error(
                layer.get_submodule(group.reads),
                [quantizable[n] for n in names],
                stats.kept.pop(group.reads),
                rope,
                config,
            )
            search = search_scales(
                stats.mean_abs(group.reads), weights, measure=measure, bits=bits, group_size=group_size, sym=sym
            )
        else:
            inputs = stats.inputs(group.reads)
            search = search_scales(
                stats.mean_abs(group.reads),
                weights,
                gram=inputs.get("gram"),
                rows=inputs.get("rows"),
                bits=bits,
                group_size=group_size,
                sym=sym,
            )
        scales = search.scales
        prev: Any = layer.get_submodule(group.prev)
        if isinstance(prev, nn.Linear):
            prev.weight.data.div_(scales[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.data.div_(scales.to(prev.bias.dtype))
        else:  # an RMSNorm
            prev.weight.data.div_(scales.to(prev.weight.dtype))
        for name in group.linears:
            scaled: Any = layer.get_submodule(name)
            scaled.weight.data.mul_(scales[None, :].to(scaled.weight.dtype))
            input_scales[name] = scales
    packed: dict[str, nn.Module] = {}
    simulated: dict[str, nn.Module] = {}
    for name, linear in quantizable.items():
        weight = linear.weight.detach().float()
        if clip and stats.seen(source[name]) and name.rsplit(".", 1)[-1] not in ("q_proj", "k_proj"):
            gram = stats.full_gram(source[name])
            if name in input_scales:
                inverse = 1 / input_scales[name].to(gram.device)
                gram = gram * inverse[:, None] * inverse[None, :]
            bounds = search_clip(weight, gram, bits=bits, group_size=group_size, sym=sym)
            weight = apply_clip(weight, bounds, group_size=group_size)
        codes, scales, zeros = quantize_rtn(weight, bits=bits, group_size=group_size, sym=sym)
        g_idx = torch.arange(linear.in_features, device=codes.device) // group_size
        packed[name] = QuantLinear.from_quantized(codes, scales, zeros, g_idx, linear.bias, quant_config)
        simulated[name] = stand_in(linear, packed[name])
    return packed, simulated
