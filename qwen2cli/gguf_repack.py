"""GGML block tensors -> quant.blocks' layout (docs/gguf-layout.md): the same codes, their scales and zeros or offsets
per group as the native kernels read them. Exact: each weight the layout stands for equals llama.cpp's (and gguf-py's)
dequantization of the block. Layouts as llama.cpp's ggml-quants.c defines them; little-endian hosts only."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .gguf_dequant import half_field, q6_k_codes
from .quant.blocks import BlockFormat
from .quant.codes import pack_q4, pack_q5

BLOCKS_PER_CHUNK = 1 << 16  # bounds the temporaries whatever the tensor's size


@dataclass
class Repacked:
    """A (rows, in) weight in quant.blocks' layout."""

    fmt: BlockFormat
    codes: torch.Tensor  # (rows, fmt.row_bytes(in))
    scales: torch.Tensor  # (rows, groups): float16 or float32
    table: torch.Tensor  # (rows, groups): int16 zeros or float32 offsets


# each converter: (blocks, bytes) uint8 of one chunk -> (codes in the kernel's bytes per block, scales, table), all
# (blocks, ...); codes for q4 and q5 already packed per block of 32 (pack_q4 / pack_q5 run on whole blocks)


def _q4_0(blocks: torch.Tensor):  # d, qs[16] (byte j: code j, code j + 16: pack_q4's order): (q - 8) d
    n = blocks.shape[0]
    return blocks[:, 2:18], blocks[:, 0:2].contiguous().view(torch.float16), torch.full((n, 1), 8, dtype=torch.int16)


def _q4_1(blocks: torch.Tensor):  # d, m, qs[16]: q d + m
    return blocks[:, 4:20], half_field(blocks, 0), half_field(blocks, 2)


def _q5_0(blocks: torch.Tensor):  # d, qh[4], qs[16]: (q - 16) d; our q5 block is qs then qh
    n = blocks.shape[0]
    codes = torch.cat([blocks[:, 6:22], blocks[:, 2:6]], dim=1)
    return codes, blocks[:, 0:2].contiguous().view(torch.float16), torch.full((n, 1), 16, dtype=torch.int16)


def _q5_1(blocks: torch.Tensor):  # d, m, qh[4], qs[16]: q d + m
    return torch.cat([blocks[:, 8:24], blocks[:, 4:8]], dim=1), half_field(blocks, 0), half_field(blocks, 2)


def _q8_0(blocks: torch.Tensor):  # d, qs[32] int8: q d
    n = blocks.shape[0]
    codes = blocks[:, 2:34].contiguous().view(torch.int8)
    return codes, blocks[:, 0:2].contiguous().view(torch.float16), torch.zeros(n, 1, dtype=torch.int16)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: d, dmin and 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32 -> float32 scales d * sc and
    offsets -(dmin * m), (n, 8): exact products (11 + 6 significant bits)."""
    packed = blocks[:, 4:16]
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low & 63, (high & 0xF) | ((low >> 6) << 4)], dim=1).float()
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=1).float()
    return half_field(blocks, 0) * scales, -(half_field(blocks, 2) * mins)


def _q4_k(blocks: torch.Tensor):
    """qs[128] at 16: 4 chunks of 32 bytes, each the low nibbles of sub-block 2c and the high ones of 2c + 1."""
    n = blocks.shape[0]
    qs = blocks[:, 16:144].reshape(n, 4, 32)
    codes = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(n * 8, 32)  # sub-blocks in order
    scales, offsets = _k_scales(blocks)
    return pack_q4(codes).reshape(n, 128), scales, offsets


def _q5_k(blocks: torch.Tensor):
    """qh[32] at 16, qs[128] at 48: sub-block i takes nibble i % 2 of qs chunk i // 2 and bit i of qh[l]."""
    n = blocks.shape[0]
    qh, qs = blocks[:, 16:48], blocks[:, 48:176].reshape(n, 4, 32)
    low = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(n, 8, 32)
    fifth = (qh[:, None, :] >> torch.arange(8, dtype=torch.uint8)[None, :, None]) & 1  # (n, 8, 32)
    codes = (low | (fifth << 4)).reshape(n * 8, 32)
    scales, offsets = _k_scales(blocks)
    return pack_q5(codes).reshape(n, 160), scales, offsets


def _q6_k(blocks: torch.Tensor):
    """Codes q - 32 as int8 (6-bit values), scales d * sc per 16 (int8 sc: exact in float32), offsets 0."""
    n = blocks.shape[0]
    codes = (q6_k_codes(blocks).to(torch.int16) - 32).to(torch.int8)
    scales = half_field(blocks, 208) * blocks[:, 192:208].contiguous().view(torch.int8).float()
    return codes, scales, torch.zeros(n, 1)


# ggml type name -> (values per block, bytes per block, format, converter)
CONVERTERS: dict[str, tuple[int, int, BlockFormat, Callable]] = {
    "Q4_0": (32, 18, BlockFormat("q4", 32, "float16-zeros", "Q4_0"), _q4_0),
    "Q4_1": (32, 20, BlockFormat("q4", 32, "float32-offsets", "Q4_1"), _q4_1),
    "Q5_0": (32, 22, BlockFormat("q5", 32, "float16-zeros", "Q5_0"), _q5_0),
    "Q5_1": (32, 24, BlockFormat("q5", 32, "float32-offsets", "Q5_1"), _q5_1),
    "Q8_0": (32, 34, BlockFormat("q8", 32, "float16-zeros", "Q8_0"), _q8_0),
    "Q4_K": (256, 144, BlockFormat("q4", 32, "float32-offsets", "Q4_K"), _q4_k),
    "Q5_K": (256, 176, BlockFormat("q5", 32, "float32-offsets", "Q5_K"), _q5_k),
    "Q6_K": (256, 210, BlockFormat("q8", 16, "float32-offsets", "Q6_K"), _q6_k),
}


def repack(data: np.ndarray, type_name: str, rows: int, cols: int) -> Repacked | None:
    """A GGML tensor's raw bytes (rows of `cols` values) in quant.blocks' layout; None for a type (or a host) this
    does not handle, which then stays float."""
    if type_name not in CONVERTERS or sys.byteorder != "little" or cols % 32:
        return None
    values, size, fmt, convert = CONVERTERS[type_name]
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if raw.size != rows * cols // values * size or cols % values:
        raise ValueError(f"{raw.size} bytes are not {rows} rows of {cols} {type_name} values")
    count = raw.size // size
    groups_per_block = values // fmt.group_size
    code_bytes = fmt.row_bytes(values)
    codes_out = torch.empty(count, code_bytes, dtype=torch.int8 if fmt.codes == "q8" else torch.uint8)
    scales_out = torch.empty(count, groups_per_block, dtype=torch.float16 if fmt.half else torch.float32)
    table_out = torch.empty(count, groups_per_block, dtype=torch.int16 if fmt.half else torch.float32)
    for begin in range(0, count, BLOCKS_PER_CHUNK):
        end = min(count, begin + BLOCKS_PER_CHUNK)
        blocks = torch.from_numpy(raw[begin * size : end * size].copy()).reshape(-1, size)
        codes, scales, table = convert(blocks)
        codes_out[begin:end] = codes.reshape(end - begin, code_bytes)
        scales_out[begin:end] = scales.reshape(end - begin, -1)
        table_out[begin:end] = table.reshape(end - begin, -1).expand(end - begin, groups_per_block)
    groups = cols // fmt.group_size
    return Repacked(
        fmt,
        codes_out.reshape(rows, fmt.row_bytes(cols)),
        scales_out.reshape(rows, groups),
        table_out.reshape(rows, groups),
    )
