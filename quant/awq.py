"""AWQ (Lin et al., 2023): scale the input channels that carry large activations up before rounding (and the
operation feeding them down by the same factor, so the float function is unchanged), choosing the scales' strength
by grid search on a module's output; then choose each group's clipping range by the layer's output error.

Model-agnostic: the caller says which Linears share a scaling (a scale group) and what op before them absorbs
1/scale, and gives their input statistics. Only torch is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .rtn import dequantize, group_params, quantize


def fake_quantize(weight: torch.Tensor, *, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest per group and back to float: what the quantized weight will compute."""
    out_features, in_features = weight.shape
    grouped = weight.float().reshape(-1, group_size)
    scale, zero = group_params(grouped, bits=bits, sym=sym)
    return dequantize(quantize(grouped, scale, zero, bits=bits), scale, zero).reshape(out_features, in_features)


def candidate_scales(
    x_abs_mean: torch.Tensor, weights: Sequence[torch.Tensor], ratio: float, *, group_size: int
) -> torch.Tensor:
    """AWQ's per-input-channel scales at one grid point: x_mean^r / w_mean^(1-r), normalised around 1.

    w_mean is each input channel's mean magnitude relative to its group's largest, over all output rows.
    """
    stacked = torch.cat([w.float() for w in weights])  # (sum out, in)
    grouped = stacked.abs().reshape(-1, group_size)
    relative = (grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)).reshape(stacked.shape)
    w_mean = relative.mean(0)
    scales = (x_abs_mean.float().pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    scales = scales / (scales.max() * scales.min()).sqrt()
    scales[~torch.isfinite(scales)] = 1.0
    return scales


@dataclass
class ScaleSearch:
    scales: torch.Tensor  # (in,) the chosen scales (all ones when no scaling was best)
    ratio: float | None  # the grid point chosen; None: no scaling
    loss: float  # relative output error at the chosen scales
    unscaled_loss: float  # relative output error with plain round-to-nearest, no scaling


def output_error(
    weight: torch.Tensor,
    approximation: torch.Tensor,
    *,
    gram: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> float:
    """sum over inputs x of |(W' - W) x|^2: from the inputs themselves (`rows`, N x in), or from their Gram matrix
    G = sum x x^T as tr(dW G dW^T), whichever is cheaper (rows when N < in)."""
    delta = approximation.float() - weight.float()
    if rows is not None:
        return float((rows.float() @ delta.t()).pow(2).sum())
    assert gram is not None, "output_error needs the inputs or their Gram matrix"
    return float(((delta @ gram.float()) * delta).sum())


def search_scales(
    x_abs_mean: torch.Tensor,
    weights: Sequence[torch.Tensor],
    *,
    gram: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    measure: Callable[[list[torch.Tensor]], float] | None = None,
    bits: int,
    group_size: int,
    sym: bool,
    grid: int = 20,
) -> ScaleSearch:
    """AWQ's grid search over no scaling and `grid` strengths of the scales. By default the objective is
    |Q(W diag(s)) diag(s)^-1 X - W X|^2 summed over the Linears of a scale group (which share their input X), exact
    over every calibration token through X itself (`rows`) or its Gram matrix (`gram`), relative to |W X|^2.
    `measure`, where the group's Linears feed a larger module (attention, an MLP), replaces it: given the Linears'
    effective weights Q(W diag(s)) diag(s)^-1, the module's relative output error (AutoAWQ's objective)."""
    if measure is None:
        if rows is not None:
            inputs = {"rows": rows.float()}
        else:
            assert gram is not None, "search_scales needs the inputs, their Gram matrix or a measure"
            inputs = {"gram": gram.float()}
        total = sum(output_error(w, torch.zeros_like(w, dtype=torch.float32), **inputs) for w in weights) or 1.0

        def measure(approximations: list[torch.Tensor]) -> float:
            return sum(output_error(w, a, **inputs) for w, a in zip(weights, approximations, strict=True)) / total

    best: ScaleSearch | None = None
    for step in [None, *range(grid)]:
        ratio = None if step is None else step / grid
        if ratio is None:
            scales = torch.ones_like(x_abs_mean, dtype=torch.float32)
        else:
            scales = candidate_scales(x_abs_mean, weights, ratio, group_size=group_size)
        loss = measure(
            [fake_quantize(w.float() * scales, bits=bits, group_size=group_size, sym=sym) / scales for w in weights]
        )
        if best is None:
            best = ScaleSearch(scales=scales, ratio=None, loss=loss, unscaled_loss=loss)
        elif loss < best.loss:
            best = ScaleSearch(scales=scales, ratio=ratio, loss=loss, unscaled_loss=best.unscaled_loss)
    assert best is not None
    return best


def search_clip(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    grid: int = 20,
    max_shrink: float = 0.5,
    rows_per_chunk: int = 256,
) -> torch.Tensor:
    """Per (row, group) clipping bound |w| <= bound that minimises the group's contribution to the output error
    over the layer's inputs; shrinks the largest magnitude by 0, 1/grid, ... max_shrink.

    A group's error over the tokens, sum_n (x_n . (q - w))^2, is d^T G d with d = q - w and G the group's
    (group_size x group_size) diagonal block of `gram`, the inputs' sum of x x^T: exact over every calibration
    token at one small product per weight (AutoAWQ measures it on 512 tokens sampled from them)."""
    out_features, in_features = weight.shape
    groups = in_features // group_size
    blocks = gram.float().reshape(groups, group_size, groups, group_size)
    index = torch.arange(groups, device=gram.device)
    gram = blocks[index, :, index, :]  # (G, g, g): each group's own block
    gram = gram / gram.diagonal(dim1=1, dim2=2).mean().clamp(min=1e-30)  # scale-free: only the argmin matters
    bounds = []
    for begin in range(0, out_features, rows_per_chunk):
        w = weight[begin : begin + rows_per_chunk].float().reshape(-1, groups, group_size)  # (R, G, g)
        largest = w.abs().amax(dim=-1, keepdim=True)  # (R, G, 1)
        best_bound = largest.clone()
        best_error = torch.full_like(largest, float("inf"))
        for step in range(int(max_shrink * grid)):
            bound = largest * (1 - step / grid)
            clipped = torch.maximum(torch.minimum(w, bound), -bound)
            q = fake_quantize(clipped.reshape(-1, in_features), bits=bits, group_size=group_size, sym=sym)
            delta = (q.reshape(w.shape) - w).transpose(0, 1)  # (G, R, g)
            error = ((delta @ gram) * delta).sum(-1).t()[..., None]  # (R, G, 1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_bound = torch.where(better, bound, best_bound)
        bounds.append(best_bound[..., 0])
    return torch.cat(bounds)  # (out, groups)


def apply_clip(weight: torch.Tensor, bounds: torch.Tensor, *, group_size: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    grouped = weight.float().reshape(out_features, -1, group_size)
    limit = bounds[..., None]
    return torch.maximum(torch.minimum(grouped, limit), -limit).reshape(out_features, in_features).to(weight.dtype)
