"""The byte layouts of quantized codes that quant/qgemv.c's kernels read, and their inverses."""

from __future__ import annotations

import torch


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in), 0..15, in % 32 == 0 -> the kernel's uint8 (out, in/2): per block of 32 inputs, byte j holds
    code j in its low nibble and code j + 16 in its high one."""
    out_features, in_features = codes.shape
    blocks = codes.reshape(out_features, in_features // 32, 2, 16).to(torch.uint8)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out_features, in_features // 2).contiguous()


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """`pack_q4`'s inverse: uint8 (out, in/2) -> codes (out, in) uint8."""
    out_features = packed.shape[0]
    blocks = packed.view(out_features, -1, 16)
    return torch.cat([blocks & 15, blocks >> 4], dim=-1).view(out_features, -1)


KINDS = {"q8": 0, "q4": 1, "q5": 2}  # qgemv.c's KIND_Q8, KIND_Q4, KIND_Q5


def pack_q5(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in), 0..31, in % 32 == 0 -> the kernel's uint8 (out, in/32 * 20): per block of 32 inputs,
    `pack_q4`'s 16 bytes of the low four bits, then a little-endian uint32 whose bit j is code j's fifth bit."""
    out_features, in_features = codes.shape
    codes = codes.to(torch.uint8)
    low = pack_q4(codes & 15).view(out_features, in_features // 32, 16)
    fifth = (codes >> 4).view(out_features, in_features // 32, 4, 8)
    high = (fifth << torch.arange(8, dtype=torch.uint8)).sum(dim=-1, dtype=torch.uint8)  # (out, blocks, 4) bytes
    return torch.cat([low, high], dim=-1).reshape(out_features, in_features // 32 * 20).contiguous()


def unpack_q5(packed: torch.Tensor) -> torch.Tensor:
    """`pack_q5`'s inverse: uint8 (out, in/32 * 20) -> codes (out, in) uint8."""
    out_features = packed.shape[0]
    blocks = packed.view(out_features, -1, 20)
    low = unpack_q4(blocks[:, :, :16].reshape(out_features, -1)).view(out_features, -1, 32)
    fifth = (blocks[:, :, 16:, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (out, blocks, 4, 8)
    return (low | (fifth.reshape(out_features, -1, 32) << 4)).view(out_features, -1)


def pack_q8(codes: torch.Tensor) -> torch.Tensor:
    """8-bit codes (out, in), 0..255 -> the kernel's int8 (out, in): code - 128 (so zeros are stored minus 128 too,
    or float offsets add 128 * scale)."""
    # code ^ 0x80 read as int8 is code - 128: one byte-wide pass (int16 arithmetic took 4x the bytes at load's peak)
    return torch.bitwise_xor(codes.to(torch.uint8).contiguous(), 128).view(torch.int8)
