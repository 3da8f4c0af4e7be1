"""The output head of a quantized model as int8 rows: half the bytes of bfloat16, read once per decoded token.

Each row of the (vocab, hidden) table is stored as int8 codes with one float32 scale (symmetric, |w| max / 127),
the layout torch's `_weight_int8pack_mm` computes with. When the embedding is tied to the head, the same table
serves the row lookups. Built straight from the checkpoint's rows, a chunk at a time, so no float copy of the
table is ever whole in memory."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .native import native_library, native_matmul

QUANTIZE_ROWS = 4096  # rows quantized at a time: in cache, 3x faster than 16384 (0.35 s for 151936 x 896)
CHUNK_ROWS = 16384  # rows dequantized at a time for long inputs (~58 MB of float32 at 896 columns)
# From this many input rows on, a float32 matmul over dequantized chunks beats the int8 kernel (measured:
# docs/performance.md, "Thresholds in the code")
DEQUANT_MIN_ROWS = 128


class Int8Rows(nn.Module):
    """y = x W^T over an int8 table with per-row scales; `lookup(ids)` gives rows of W. The buffers are not part of
    the state dict: this module is built at load, never saved."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor  # with the native kernel
    scales_bf16: torch.Tensor  # without it

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes, persistent=False)  # int8 (rows, cols)
        self.register_buffer("scales", scales, persistent=False)  # float32 (rows,)
        # our int8 kernel (quant/native.py) where it builds: it streams the table faster than torch's int8 kernel,
        # which takes bfloat16 scales instead of the kernel's zero offsets
        self._native = native_library() if codes.device.type == "cpu" and self.in_features % 32 == 0 else None
        if self._native is not None:
            self.register_buffer("offsets", torch.zeros_like(scales), persistent=False)
        else:
            self.register_buffer("scales_bf16", scales.to(torch.bfloat16), persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows"

    @classmethod
    def from_rows(cls, read: Callable[[int, int], torch.Tensor], rows: int, cols: int) -> Int8Rows:
        """Quantize a (rows, cols) float table read by `read(begin, end)`, QUANTIZE_ROWS rows at a time."""
        codes: torch.Tensor | None = None
        scales: torch.Tensor | None = None
        for begin in range(0, rows, QUANTIZE_ROWS):
            end = min(begin + QUANTIZE_ROWS, rows)
            block = read(begin, end).to(torch.float32, copy=True)  # a copy of its own, scaled in place
            if codes is None or scales is None:  # on the rows' device
                codes = torch.empty(rows, cols, dtype=torch.int8, device=block.device)
                scales = torch.empty(rows, dtype=torch.float32, device=block.device)
            # max |w| per row as max(max, -min): 10x faster here than vector_norm(ord=inf) (0.25 s of a 0.5B load)
            scale = torch.maximum(block.amax(dim=1), block.amin(dim=1).neg_()).clamp_(min=1e-10).div_(127)
            codes[begin:end] = block.div_(scale[:, None]).round_()
            scales[begin:end] = scale
        if codes is None or scales is None:
            raise ValueError("an int8 table needs at least one row")
        return cls(codes, scales)

    def dequantized(self, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows begin..end of the float32 table this stands for."""
        return self.codes[begin:end].float() * self.scales[begin:end, None]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the table in float32, shaped ids.shape + (cols,)."""
        return self.codes[ids].float() * self.scales[ids].unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] >= DEQUANT_MIN_ROWS:  # float32 throughout, the table dequantized a chunk at a time
            flat = flat.float()
            out = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32, device=flat.device)
            for begin in range(0, self.out_features, CHUNK_ROWS):
                end = min(begin + CHUNK_ROWS, self.out_features)
                out[:, begin:end] = F.linear(flat, self.dequantized(begin, end))
        elif self._native is not None:  # symmetric: w = code * scale, offsets 0
            out = native_matmul(
                self._native, "q8", flat.float().contiguous(), self.codes, self.scales, self.offsets, self.in_features
            )
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.codes, self.scales_bf16)
        if flat.shape[0] >= DEQUANT_MIN_ROWS:  # whole-prompt logits (perplexity) in the model's dtype, for memory
            out = out.to(x.dtype)
        # a few rows (decoding) keep the float32 our kernel computes: no bfloat16 rounding (1/8 at a logit of 20)
        # of what sampling reads, nor two conversions of a vocab-sized row per token
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8Lookup(nn.Module):
    """An embedding reading its rows from a head's Int8Rows (tied weights): one table for both."""

    def __init__(self, table: Int8Rows) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.lookup(ids)
