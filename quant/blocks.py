"""Block-quantized Linears and embeddings stored in the native kernels' own layout (docs/gguf-layout.md): codes of 4,
5 or 8 bits with one scale and one zero or offset per group of 16 or 32k inputs, read by quant/qgemv.c as they lie
on disk. What a GGUF's Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q5_K/Q6_K/Q8_0 tensors hold maps onto this exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .codes import unpack_q4, unpack_q5
from .linear import QuantLinear
from .native import can_interleave, interleave_rows, native_library

CODE_KINDS = ("q4", "q5", "q8")
TABLES = ("float16-zeros", "float32-offsets")


@dataclass(frozen=True)
class BlockFormat:
    """One module's layout: `codes` q4 | q5 | q8; `tables` float16-zeros (w = (code - zero) * scale, float16
    scales, int16 zeros) or float32-offsets (w = code * scale + offset); `source` what it was made from (e.g. Q4_K)."""

    codes: str
    group_size: int
    tables: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.codes not in CODE_KINDS:
            raise ValueError(f"unknown codes {self.codes!r}: use q4, q5 or q8")
        if self.tables not in TABLES:
            raise ValueError(f"unknown tables {self.tables!r}: use float16-zeros or float32-offsets")
        if self.group_size != 16 and (self.group_size <= 0 or self.group_size % 32):
            raise ValueError(f"group size {self.group_size} is not supported: use 16 or a multiple of 32")

    @property
    def half(self) -> bool:
        return self.tables == "float16-zeros"

    @property
    def table_names(self) -> tuple[str, str]:
        """The stored names of the two per-group tables."""
        return ("scales", "zeros") if self.half else ("scales", "offsets")

    def row_bytes(self, in_features: int) -> int:
        """Bytes of codes per output row."""
        return {"q4": in_features // 2, "q5": in_features // 32 * 20, "q8": in_features}[self.codes]

    def check(self, in_features: int) -> None:
        if in_features % 32 or in_features % self.group_size:
            raise ValueError(f"{self.codes} codes in groups of {self.group_size} need inputs divisible by 32")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BlockFormat:
        return cls(str(data["codes"]), int(data["group_size"]), str(data["tables"]), str(data.get("source", "")))

    def to_json(self) -> dict[str, Any]:
        return {"codes": self.codes, "group_size": self.group_size, "tables": self.tables, "source": self.source}


def _register_tables(module: nn.Module, fmt: BlockFormat, rows: int, cols: int, device: Any) -> None:
    fmt.check(cols)
    groups = cols // fmt.group_size
    code_dtype = torch.int8 if fmt.codes == "q8" else torch.uint8
    module.register_buffer("codes", torch.zeros(rows, fmt.row_bytes(cols), dtype=code_dtype, device=device))
    scale_dtype, table_dtype = (torch.float16, torch.int16) if fmt.half else (torch.float32, torch.float32)
    module.register_buffer("scales", torch.zeros(rows, groups, dtype=scale_dtype, device=device))
    module.register_buffer(fmt.table_names[1], torch.zeros(rows, groups, dtype=table_dtype, device=device))


def unpack_codes(codes: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """Stored codes (rows, row_bytes) -> integer codes (rows, in) as the tables apply to them (int16)."""
    if fmt.codes == "q4":
        return unpack_q4(codes).to(torch.int16)
    if fmt.codes == "q5":
        return unpack_q5(codes).to(torch.int16)
    return codes.view(torch.int8).to(torch.int16)


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """The float32 weight rows (rows, in) these stand for: (code - zero) * scale, or code * scale + offset."""
    values = unpack_codes(codes, fmt)
    rows, cols = values.shape
    values = values.view(rows, cols // fmt.group_size, fmt.group_size)
    scale = scales.float().unsqueeze(-1)
    if fmt.half:
        weight = (values - table.to(torch.int16).unsqueeze(-1)).float() * scale
    else:
        weight = values.float() * scale + table.float().unsqueeze(-1)
    return weight.view(rows, cols)


class BlockQuantLinear(QuantLinear):
    """y = x W^T + b with W as block codes and tables (BlockFormat) on the native kernels; the reference path
    dequantizes where they cannot run."""

    # groups of 16 or 32 cost the kernel more per row than larger groups: the float GEMM wins from fewer rows
    # (docs/gguf-layout.md); never fused, since fusing copies the tables, which are otherwise read in place from
    # the file (the C decoder takes q/k/v and gate/up as parts instead)
    dequant_min_rows = 20
    fusable = False
    reads_rows = True
    config: BlockFormat  # type: ignore[assignment]  # QuantLinear's QuantConfig: the layout's description here
    codes: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        fmt: BlockFormat,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.config = in_features, out_features, fmt
        self.group_size = fmt.group_size
        _register_tables(self, fmt, out_features, in_features, device)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.kernel = "reference"
        self._fast: dict[str, torch.Tensor] = {}
        self._native = None

    def extra_repr(self) -> str:
        fmt = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {fmt.source or 'block'} "
            f"{fmt.codes}, group_size={fmt.group_size}, {fmt.tables}, kernel={self.kernel}"
        )

    def _table(self) -> torch.Tensor:
        table: torch.Tensor = getattr(self, self.config.table_names[1])
        return table

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_blocks(self.codes, self.scales, self._table(), self.config)

    def stored_for_post_load(self) -> tuple[tuple[str, ...], frozenset[str]]:
        names = ("codes", *self.config.table_names)
        return names, frozenset(names)

    def on_cpu(self) -> bool:
        return self.codes.device.type == "cpu"

    def post_load(self, packed: dict[str, Any] | None = None) -> None:
        """The kernels read the stored tensors as they are (memory-mapped views), or, where the CPU multiplies 8
        rows interleaved (quant/qgemv_x8.c), a copy in that order. `packed`: for each stored name, a function
        giving its rows start:stop (the loader's, which maps the file for each block of rows, so that neither the
        views' pages nor a whole tensor's are ever in memory beside the copy); else the copy is made from the
        views."""
        fmt = self.config
        library = native_library()
        if self.codes.device.type != "cpu" or library is None:
            return
        names = ("scales16", "zeros16") if fmt.half else ("scales32", "offsets32")

        def kernel_tables(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor) -> list[torch.Tensor]:
            if fmt.half and scales.dtype != torch.float16:  # a loader that converted them: float16 holds them exactly
                scales = scales.to(torch.float16)
            if not fmt.half and scales.dtype != torch.float32:
                scales, table = scales.float(), table.float()
            return [codes.contiguous(), scales.contiguous(), table.contiguous()]

        if can_interleave(library, self.out_features, self.in_features):
            stored = ("codes", *fmt.table_names)
            own = (self.codes, self.scales, self._table())

            def read(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                parts = [packed[key](start, stop) for key in stored] if packed else [t[start:stop] for t in own]
                codes, scales, table = kernel_tables(*parts)
                return codes, scales, table

            tables = list(interleave_rows(library, fmt.codes, self.out_features, fmt.group_size, read))
            self._interleaved = True
        else:
            tables = kernel_tables(self.codes, self.scales, self._table())
        self._fast = dict(zip((fmt.codes, *names), tables, strict=True))
        if self.bias is not None and self.bias.dtype != torch.float32:
            self.bias = self.bias.float()
        self._native = library
        self.kernel = f"{fmt.codes}-native-cpu"

    def _float_rows(self, start: int, stop: int) -> torch.Tensor:
        return dequantize_blocks(
            self.codes[start:stop], self.scales[start:stop], self._table()[start:stop], self.config
        )


class BlockEmbedding(nn.Module):
    """An embedding table as block codes and tables: each looked-up row is dequantized (float32) when asked for."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, rows: int, cols: int, *, fmt: BlockFormat, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.config = rows, cols, fmt
        _register_tables(self, fmt, rows, cols, device)

    def extra_repr(self) -> str:
        fmt = self.config
        return f"{self.num_embeddings}, {self.embedding_dim}, {fmt.source or 'block'} {fmt.codes}, {fmt.tables}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        table: torch.Tensor = getattr(self, self.config.table_names[1])
        rows = dequantize_blocks(self.codes[flat], self.scales[flat], table[flat], self.config)
        return rows.view(*ids.shape, self.embedding_dim)
