"""GGML block formats -> float32 in torch, vectorised over blocks (the `gguf` package's numpy code took ~7 s of a
~25 s import of the 0.5B Q4_K_M file). Layouts as llama.cpp's ggml-quants.c defines them; the tests compare every
one with `gguf.quants.dequantize`. Little-endian hosts only (fp16 fields are read with a dtype view);
others fall back to gguf."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch

VALUES_PER_CHUNK = 1 << 22  # bounds the temporaries (~100 MB) whatever the tensor's size


def half_field(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of every block, as float32 (blocks, 1)."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(blocks, k) bytes -> (blocks, 2k): the low nibbles of all k bytes, then the high ones (ggml's order)."""
    return torch.cat([packed & 0xF, packed >> 4], dim=1)


def _fifth_bits(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """Q5's 32 high bits (a little-endian uint32 at `at`: value j's bit is bit j % 8 of byte j // 8), each shifted
    into place (<< 4), in uint8 throughout."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return (((blocks[:, at : at + 4, None] >> shifts) & 1) << 4).reshape(blocks.shape[0], 32)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:  # d, qs[32] int8
    return half_field(blocks, 0) * blocks[:, 2:34].contiguous().view(torch.int8).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:  # d, qs[16]: (q - 8) d
    d = half_field(blocks, 0)
    return torch.addcmul(-8 * d, d, _nibbles(blocks[:, 2:18]).float())


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:  # d, m, qs[16]: q d + m
    return torch.addcmul(half_field(blocks, 2), half_field(blocks, 0), _nibbles(blocks[:, 4:20]).float())


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:  # d, qh[4], qs[16]: (q - 16) d
    d = half_field(blocks, 0)
    return torch.addcmul(-16 * d, d, (_nibbles(blocks[:, 6:22]) | _fifth_bits(blocks, 2)).float())


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:  # d, m, qh[4], qs[16]: q d + m
    codes = _nibbles(blocks[:, 8:24]) | _fifth_bits(blocks, 4)
    return torch.addcmul(half_field(blocks, 2), half_field(blocks, 0), codes.float())


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """256 values: d, dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32, qs[128] (4 x 32 bytes, each
    the low nibbles of one sub-block and the high nibbles of the next)."""
    n = blocks.shape[0]
    packed = blocks[:, 4:16]
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low & 63, (high & 0xF) | ((low >> 6) << 4)], dim=1).float()  # (n, 8)
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=1).float()
    qs = blocks[:, 16:144].reshape(n, 4, 32)
    values = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(n, 8, 32).float()
    y = (
        half_field(blocks, 0)[:, :, None] * scales[:, :, None] * values
        - half_field(blocks, 2)[:, :, None] * mins[:, :, None]
    )
    return y.reshape(n, 256)


def q6_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K's 256 codes per block (0..63, uint8) in order: ql[128] low nibbles, qh[64] 2-bit highs."""
    n = blocks.shape[0]
    ql, qh = blocks[:, 0:128].reshape(n, 2, 64), blocks[:, 128:192].reshape(n, 2, 32)
    quarters = [
        (ql[:, :, 0:32] & 0xF) | ((qh & 3) << 4),
        (ql[:, :, 32:64] & 0xF) | (((qh >> 2) & 3) << 4),
        (ql[:, :, 0:32] >> 4) | (((qh >> 4) & 3) << 4),
        (ql[:, :, 32:64] >> 4) | (((qh >> 6) & 3) << 4),
    ]
    return torch.stack(quarters, dim=2).reshape(n, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """256 values: the codes, 16 int8 scales (one per 16 values) at 192, d last: d * scale * (q - 32)."""
    values = q6_k_codes(blocks).float() - 32
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float().repeat_interleave(16, dim=1)
    return half_field(blocks, 208) * scales * values


# ggml type name -> (values per block, bytes per block, decoder)
DECODERS: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q4_K": (256, 144, _q4_k),
    "Q6_K": (256, 210, _q6_k),
}


def dequantize(data: np.ndarray, type_name: str) -> torch.Tensor | None:
    """The raw bytes of one tensor decoded to a flat float32 tensor; None for a type not handled here."""
    if type_name not in DECODERS or sys.byteorder != "little":
        return None
    values, size, decode = DECODERS[type_name]
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if raw.size % size:
        raise ValueError(f"{raw.size} bytes are not a whole number of {type_name} blocks")
    count = raw.size // size
    out = torch.empty(count, values, dtype=torch.float32)
    step = max(1, VALUES_PER_CHUNK // values)
    for begin in range(0, count, step):
        end = min(count, begin + step)
        blocks = torch.from_numpy(raw[begin * size : end * size].copy()).reshape(-1, size)  # a writable copy
        out[begin:end] = decode(blocks)
    return out.reshape(-1)
