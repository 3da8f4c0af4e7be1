"""Exact int32 packing of the GPTQ and AWQ layouts, both directions.

GPTQ (AutoGPTQ v1): qweight int32 [in*bits/32, out], input channels packed low bits first; qzeros int32
[groups, out*bits/32], output channels packed, stored minus one (v2: not offset); scales fp16 [groups, out];
g_idx int32 [in]. AWQ GEMM (4-bit): qweight int32 [in, out/8] and qzeros int32 [groups, out/8], output channels
packed in the order [0, 2, 4, 6, 1, 3, 5, 7]; zeros not offset; scales fp16 [groups, out].
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) small ints -> (rows*bits/32, cols) int32, consecutive rows in rising bit positions."""
    per = 32 // bits
    rows, cols = values.shape
    grouped = values.to(torch.int32).reshape(rows // per, per, cols)
    packed = grouped[:, 0].clone()
    for index in range(1, per):  # int32 shifts wrap into the sign bit, as the format wants (8x faster than int64)
        packed |= grouped[:, index] << (bits * index)
    return packed


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int32, device=packed.device) * bits).view(1, per, 1)
    values = (packed.unsqueeze(1) >> shifts).bitwise_and_(2**bits - 1)  # (rows/per, per, cols)
    return values.reshape(-1, packed.shape[1])


def pack_gptq(
    codes: torch.Tensor, zeros: torch.Tensor, *, bits: int, version: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (out, in) and zeros (groups, out) -> qweight [in*bits/32, out], qzeros [groups, out*bits/32]."""
    qweight = pack_rows(codes.t().contiguous(), bits)
    if version == 1 and bool((zeros < 1).any()):
        raise ValueError("GPTQ v1 cannot store a zero point of 0 (it stores zero - 1); quantize with zeros >= 1")
    stored = zeros.to(torch.int64) - (1 if version == 1 else 0)
    qzeros = pack_rows(stored.t().contiguous(), bits).t().contiguous()
    return qweight, qzeros


def unpack_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, *, bits: int, version: int = 1, input_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """qweight, qzeros -> codes (out, in) int32 (`input_major`: (in, out), as stored, no transpose) and zeros
    (groups, out) int32."""
    codes = unpack_rows(qweight, bits)
    codes = codes if input_major else codes.t().contiguous()
    zeros = unpack_rows(qzeros.t().contiguous(), bits).t().contiguous()
    if version == 1:
        zeros = zeros + 1  # exactly what GPTQ kernels compute: a stored all-ones field reads as 2^bits
    return codes, zeros


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    *,
    bits: int,
    version: int = 1,
) -> torch.Tensor:
    """The float weight (out, in) a GPTQ layer stands for."""
    codes, zeros = unpack_gptq(qweight, qzeros, bits=bits, version=version)
    groups = g_idx.long()
    return scales.float()[groups].t() * (codes - zeros[groups].t()).float()


def _awq_columns(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    rows, cols = values.shape
    return values.reshape(rows, cols // 8, 8)[:, :, list(order)].reshape(rows, cols)


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (out, in), zeros (groups, out) -> qweight [in, out/8], qzeros [groups, out/8] (4-bit)."""

    def pack(values: torch.Tensor) -> torch.Tensor:  # (rows, out) -> (rows, out/8)
        ordered = _awq_columns(values, AWQ_ORDER)
        return pack_rows(ordered.t().contiguous(), 4).t().contiguous()

    return pack(codes.t().contiguous()), pack(zeros)


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, *, input_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """qweight, qzeros -> codes (out, in) (`input_major`: (in, out)) and zeros (groups, out)."""
    # column k of each group of 8 sits in field AWQ_REVERSE_ORDER[k]: shifting by those reads them back in order
    shifts = torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int32, device=qweight.device) * 4

    def unpack(packed: torch.Tensor) -> torch.Tensor:  # (rows, out/8) -> (rows, out)
        return ((packed.unsqueeze(-1) >> shifts) & 15).reshape(packed.shape[0], -1)

    codes = unpack(qweight)
    return (codes if input_major else codes.t().contiguous()), unpack(qzeros)


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group_size: int
) -> torch.Tensor:
    codes, zeros = unpack_awq(qweight, qzeros)  # (out, in), (groups, out)
    groups = torch.arange(codes.shape[1], device=codes.device) // group_size
    return scales.float()[groups].t() * (codes - zeros[groups].t()).float()
