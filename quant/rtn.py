"""Group-wise scales and zeros and round-to-nearest: the primitive GPTQ, AWQ and RTN share."""

from __future__ import annotations

import torch


def group_params(weight: torch.Tensor, *, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and integer zeros (out, 1) for the rows of `weight` (out, group), GPTQ's convention (range holds 0)."""
    maxq = 2**bits - 1
    low = torch.clamp(weight.min(dim=1, keepdim=True).values, max=0)
    high = torch.clamp(weight.max(dim=1, keepdim=True).values, min=0)
    if sym:
        high = torch.maximum(low.abs(), high)
        low = torch.where(low < 0, -high, low)
    flat = (low == 0) & (high == 0)
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    scale = (high - low) / maxq
    # asymmetric zeros stay >= 1: GPTQ's v1 format stores zero - 1 and cannot hold 0 (readers would see 2^bits)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.clamp(torch.round(-low / scale), 1, maxq)
    return scale, zero


def search_group_params(
    weight: torch.Tensor, *, bits: int, sym: bool, norm: float = 2.4, grid: int = 100, max_shrink: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like group_params, but each row's range is shrunk (1, 0.99, ... down to 1 - max_shrink) to whichever gives
    the least sum |w - q(w)|^norm: clipping a few outliers buys a finer step for the rest (GPTQ's `mse` option)."""
    weight = weight.float()
    best_scale, best_zero = group_params(weight, bits=bits, sym=sym)
    best_error = _rounding_error(weight, best_scale, best_zero, bits=bits, norm=norm)
    for step in range(1, int(max_shrink * grid)):
        shrink = 1 - step / grid
        scale, zero = group_params(weight * shrink, bits=bits, sym=sym)
        error = _rounding_error(weight, scale, zero, bits=bits, norm=norm)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _rounding_error(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int, norm: float
) -> torch.Tensor:
    return (dequantize(quantize(weight, scale, zero, bits=bits), scale, zero) - weight).abs_().pow_(norm).sum(1, True)


def quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1]."""
    return torch.clamp(torch.round(weight / scale) + zero, 0, 2**bits - 1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def quantize_rtn(
    weight: torch.Tensor, *, bits: int, group_size: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group: codes (out, in) int32, scales and zeros (groups, out)."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    weight = weight.float()
    codes = torch.empty_like(weight, dtype=torch.int32)
    scales, zeros = [], []
    for begin in range(0, in_features, size):
        block = weight[:, begin : begin + size]
        scale, zero = group_params(block, bits=bits, sym=sym)
        codes[:, begin : begin + size] = quantize(block, scale, zero, bits=bits).to(torch.int32)
        scales.append(scale[:, 0])
        zeros.append(zero[:, 0])
    return codes, torch.stack(scales), torch.stack(zeros).to(torch.int32)
