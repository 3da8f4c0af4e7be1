"""Dual Chunk Attention (Qwen2.5-1M; vLLM's definition): intra-, successive- and inter-chunk attention.

Keys sit at position `pos % chunk_len`. A query sees keys of its own chunk at its own in-chunk position (intra),
keys of the previous chunk from position `min(pos % chunk_len + chunk_len, chunk_size)` (successive), and keys of
all earlier chunks from the constant position `min(2 * chunk_len - 1, chunk_size)` (inter); one softmax spans all.
Every relative distance therefore stays below chunk_size, the trained range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

QUERY_BLOCK = 256  # queries scored at once: bounds the (group*block, keys) score matrix


@dataclass(frozen=True)
class DualChunkConfig:
    chunk_size: int
    local_size: int

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> DualChunkConfig:
        config = cls(chunk_size=int(raw["chunk_size"]), local_size=int(raw["local_size"]))
        if not 0 <= config.local_size < config.chunk_size:
            raise ValueError(f"dual chunk attention needs 0 <= local_size < chunk_size, got {raw}")
        return config

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions % self.chunk_len

    def successive_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions % self.chunk_len + self.chunk_len).clamp(max=self.chunk_size)

    def inter_position(self) -> int:
        return min(2 * self.chunk_len - 1, self.chunk_size)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding with per-position tables cos/sin (T, D) to x (B, H, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def dual_chunk_attention(
    queries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    start_pos: int,
    config: DualChunkConfig,
) -> torch.Tensor:
    """Attention output (B, Hkv, group, T, D) for queries (intra, successive, inter), each (B, Hkv, group, T, D).

    keys/values (B, Hkv, S, D) hold positions [0, start_pos + T); computed in float32.
    """
    intra, successive, inter = (q.float() for q in queries)
    keys, values = keys.float(), values.float()
    batch, kv_heads, group, length, dim = intra.shape
    chunk_len = config.chunk_len
    scale = 1.0 / math.sqrt(dim)
    out = torch.empty_like(intra)
    begin = 0
    while begin < length:
        absolute = start_pos + begin
        chunk = absolute // chunk_len
        end = min(length, begin + QUERY_BLOCK, (chunk + 1) * chunk_len - start_pos)  # stay inside one chunk
        own_start, previous_start = chunk * chunk_len, max(0, (chunk - 1) * chunk_len)
        parts = []
        for query, key_begin, key_end in (
            (inter, 0, previous_start),
            (successive, previous_start, own_start),
            (intra, own_start, start_pos + end),
        ):
            if key_end > key_begin:
                block = query[:, :, :, begin:end]  # (B, Hkv, group, Tb, D)
                parts.append(torch.einsum("bhgtd,bhsd->bhgts", block, keys[:, :, key_begin:key_end]) * scale)
        scores = torch.cat(parts, dim=-1)  # (B, Hkv, group, Tb, start_pos + end)
        query_pos = torch.arange(start_pos + begin, start_pos + end, device=scores.device)[:, None]
        key_pos = torch.arange(start_pos + end, device=scores.device)[None, :]
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        weights = scores.softmax(dim=-1)
        out[:, :, :, begin:end] = torch.einsum("bhgts,bhsd->bhgtd", weights, values[:, :, : start_pos + end])
        begin = end
    return out
