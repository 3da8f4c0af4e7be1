"""QuantLinear: packed weights under the checkpoint's own names, a reference path and fast per-device kernels."""

from __future__ import annotations

import ctypes
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from .codes import pack_q4, pack_q8, unpack_q4
from .config import QuantConfig
from .int4pack import cuda_inner_k_tiles, int4pack_cpu_layout_known, int4pack_cpu_tile, unpack_int4pack_cpu
from .native import (
    can_interleave,
    cpu_has_any,
    interleave,
    native_library,
    native_matmul,
    native_unpack,
)
from .packing import dequantize_awq, dequantize_gptq, pack_awq, pack_gptq, unpack_awq, unpack_gptq

INT4_GROUP_SIZES = (32, 64, 128, 256)
# From this many rows (prompt tokens) on, the CPU kernels' per-row cost exceeds unpacking the weight to float32
# once and using an ordinary GEMM (the measurements: docs/performance.md, "Thresholds in the code")
DEQUANT_MIN_ROWS = 128
# Floats of weight unpacked per step of that GEMM (4 MB: a block stays in cache between its unpacking and its GEMM)
UNPACK_BLOCK_FLOATS = 1 << 20


@functools.cache
def long_input_dtype() -> torch.dtype:
    """The dtype of that GEMM: bfloat16 where the CPU multiplies bfloat16 itself (AMX or AVX512_BF16), float32
    elsewhere (AVX2 has no bfloat16 arithmetic). QWEN2_LONG_DTYPE=float32|bfloat16 overrides. The measurements
    behind the choice: docs/cpu-kernels.md."""
    chosen = os.environ.get("QWEN2_LONG_DTYPE")
    if chosen in ("float32", "bfloat16"):
        return getattr(torch, chosen)
    return torch.bfloat16 if cpu_has_any("amx_bf16", "avx512_bf16") else torch.float32


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as GPTQ or AWQ packed integers; `post_load()` picks the kernel once."""

    dequant_min_rows = DEQUANT_MIN_ROWS  # from this many input rows on, unpack the weight for a float GEMM
    fusable = True  # fuse_native may concatenate its tables with its neighbours' (a copy of them)
    _interleaved = False  # the native kernel's codes and tables hold 8 rows interleaved (quant/qgemv_x8.c)
    reads_rows = False  # post_load's `packed`: the stored tensors (views); True: functions reading their rows
    # the buffers (the checkpoint's tensors)
    qweight: torch.Tensor
    qzeros: torch.Tensor
    g_idx: torch.Tensor  # the GPTQ layout only
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        config: QuantConfig,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.group_size = config.group_size_for(in_features)
        groups = in_features // self.group_size
        per = 32 // config.bits

        def zeros(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        if config.layout == "awq":
            if out_features % 8:
                raise ValueError(f"AWQ needs out_features divisible by 8, got {out_features}")
            self.register_buffer("qweight", zeros(in_features, out_features // 8))
            self.register_buffer("qzeros", zeros(groups, out_features // 8))
        else:
            if in_features % per or out_features % per:
                raise ValueError(f"{config.bits}-bit GPTQ needs sizes divisible by {per}")
            self.register_buffer("qweight", zeros(in_features // per, out_features))
            self.register_buffer("qzeros", zeros(groups, out_features // per))
            # made on the CPU: floor division on the meta device imports torch's reference decompositions (1.8 s)
            g_idx = torch.arange(in_features, dtype=torch.int32) // self.group_size
            self.register_buffer("g_idx", g_idx.to(device) if device is not None else g_idx)
        self.register_buffer("scales", zeros(groups, out_features, dtype=dtype))
        self.register_buffer("bias", zeros(out_features, dtype=dtype) if bias else None)
        self.kernel = "reference"
        self._fast: dict[str, torch.Tensor] = {}
        self._native: ctypes.CDLL | None = None  # quant.native's library, for the q4/q5/q8-native-cpu kernels

    def extra_repr(self) -> str:
        """What the layer computes with, so that two differently quantized models never print (or key) alike."""
        config = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {config.method} "
            f"int{config.bits}, group_size={config.group_size}, sym={config.sym}, kernel={self.kernel}"
        )

    # -- decoding the stored layout ------------------------------------------------------------------------------
    @property
    def _gptq_version(self) -> int:
        """The GPTQ packing's version (2: zeros stored as they are, 1: minus one). Not nn.Module's `_version`,
        the state-dict format's."""
        return 2 if self.config.checkpoint_format == "gptq_v2" else 1

    def codes_and_zeros(
        self, packed: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes input-major (in, out), as GPTQ stores them; zeros (groups, out); each input channel's group.
        From `packed` (qweight, qzeros and g_idx when stored, holding the same values) instead of the buffers."""
        qweight, qzeros = (self.qweight, self.qzeros) if packed is None else (packed["qweight"], packed["qzeros"])
        if self.config.layout == "awq":
            codes, zeros = unpack_awq(qweight, qzeros, input_major=True)
            return codes, zeros, torch.arange(self.in_features, device=codes.device) // self.group_size
        codes, zeros = unpack_gptq(qweight, qzeros, bits=self.config.bits, version=self._gptq_version, input_major=True)
        return codes, zeros, (packed or {}).get("g_idx", self.g_idx).long()

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (out, in) this layer stands for."""
        if self.config.layout == "awq":
            return dequantize_awq(self.qweight, self.qzeros, self.scales, group_size=self.group_size)
        return dequantize_gptq(
            self.qweight, self.qzeros, self.scales, self.g_idx, bits=self.config.bits, version=self._gptq_version
        )

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then an ordinary float matmul: what every fast kernel is tested against."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantized_weight(), bias).to(x.dtype)

    # -- fast kernels ------------------------------------------------------------------------------------------
    def stored_for_post_load(self) -> tuple[tuple[str, ...], frozenset[str]]:
        """The stored tensors post_load reads when handed them (`packed`), and those it needs for that."""
        return ("qweight", "qzeros", "g_idx"), frozenset({"qweight", "qzeros"})

    def on_cpu(self) -> bool:
        return self.qweight.device.type == "cpu"

    def post_load(self, packed: dict[str, torch.Tensor] | None = None) -> None:
        """Repack once for the device: act-order is resolved here, never per token. `packed`: the stored tensors
        read elsewhere (so that the buffers' own pages need never be read, see quantized_load)."""
        device = self.qweight.device
        # codes input-major: act-order's permutation is then a gather of whole rows, and the one transpose is the
        # int4 kernel's (a column gather and two transposes made loading 2x slower)
        rows, zeros, groups = self.codes_and_zeros(packed)  # (in, out)
        rows = rows.to(torch.uint8)  # a quarter of int32's bytes through the repacking below: the load's peak
        order = torch.argsort(groups, stable=True)
        contiguous = bool((groups[order] == torch.arange(self.in_features, device=device) // self.group_size).all())
        if not contiguous:  # a group not made of whole consecutive blocks: the reference path handles it
            return
        permuted = not torch.equal(order, torch.arange(self.in_features, device=device))
        sorted_rows = rows[order] if permuted else rows  # (in, out), groups in order
        scales = self.scales.float()  # (groups, out)
        zero_offsets = -scales * zeros.float()  # w = code * scale + zero_offset within a group

        def by_row(table: torch.Tensor) -> torch.Tensor:  # (groups, out) -> (out, groups, 1), as long inputs read it
            return table.t().unsqueeze(-1).contiguous()

        int4_shape_ok = self.group_size in INT4_GROUP_SIZES and self.out_features % 16 == 0
        inner_k_tiles = cuda_inner_k_tiles(self.in_features)
        native = native_library() if device.type == "cpu" else None
        if native is not None and self.group_size % 32 == 0:
            # quant/qgemv.c: int8 activations times the stored codes (8-bit ones stored minus 128, their zeros too);
            # w = (stored - zero) * scale per (row, group), or stored * scale + offset with float32 tables; long
            # inputs unpack the same codes for their GEMM
            kind = "q4" if self.config.bits == 4 else "q8"
            self._fast = {kind: pack_q4(sorted_rows.t()) if kind == "q4" else pack_q8(sorted_rows.t())}
            scales16 = scales.to(torch.float16)
            if torch.equal(scales16.float(), scales) and bool((zeros.abs() < 2**14).all()):
                # GPTQ/AWQ store float16 scales: float16 scales and int16 zeros hold the weights exactly, in 4 bytes
                # a group where float32 scales and offsets took 8 (a tenth of a 4-bit layer's bytes per token)
                stored_zeros = zeros - 128 if kind == "q8" else zeros  # 8-bit codes are stored minus 128
                self._fast["scales16"] = scales16.t().contiguous()
                self._fast["zeros16"] = stored_zeros.to(torch.int16).t().contiguous()
            else:
                offsets = zero_offsets + 128 * scales if kind == "q8" else zero_offsets
                self._fast["scales32"], self._fast["offsets32"] = by_row(scales), by_row(offsets)
            self._native = native
            self.kernel = f"{kind}-native-cpu"
            self._interleave_native()
        elif device.type == "cpu" and self.config.bits == 4 and int4_shape_ok:
            # tinygemm dequantizes (q - 8) * scale + offset; GPTQ/AWQ mean scale * (q - zero)
            offsets = scales * (8 - zeros.float())
            self._fast = {
                "packed": torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    sorted_rows.t().to(torch.int32).contiguous(), 2
                ),
                "scales_and_zeros": torch.stack([scales, offsets], dim=-1).to(torch.bfloat16).contiguous(),
            }
            if int4pack_cpu_layout_known(self.out_features, self.in_features):
                # for long inputs, w = code * scale + (-scale * zero) per (row, group) in float32, the codes read
                # back from the kernel's own packing: no second copy of them is kept
                self._fast["scales32"], self._fast["offsets32"] = by_row(scales), by_row(zero_offsets)
            self.kernel = "int4pack-cpu"
        elif device.type == "cpu" and self.config.bits == 8 and self.config.sym and self.group_size == self.in_features:
            self._fast = {
                "weight": (sorted_rows - zeros[0][None, :]).to(torch.int8).t().contiguous(),
                "scales": scales[0].to(torch.bfloat16),
                "scales32": scales[0],
            }
            self.kernel = "int8pack-cpu"
        elif device.type == "cuda" and self.config.bits == 4 and int4_shape_ok and inner_k_tiles:
            # tinygemm: uint8 (out, in/2), even inputs in the high nibbles, repacked in tiles of inner_k_tiles x 16
            offsets = scales * (8 - zeros.float())
            codes = sorted_rows.t()
            nibbles = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
            self._fast = {
                "packed": torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles),
                "scales_and_zeros": torch.stack([scales, offsets], dim=-1).to(torch.bfloat16).contiguous(),
            }
            self.kernel = "int4pack-cuda"
        else:
            return
        if permuted:
            self._fast["order"] = order

    def _interleave_native(self) -> None:
        """The native kernel's codes and tables with 8 rows interleaved, where the build and the shape allow: a
        vpdpbusd lane per row, so that the float work per block is shared by 8 rows, and rows of activations
        decoded side by side (a server's requests) cost little more than one (docs/cpu-kernels.md)."""
        native = self._native
        if native is None or not can_interleave(native, self.out_features, self.in_features):
            return
        kind, names = self.kernel[:2], self._native_tables()
        tables = interleave(native, kind, self._fast[kind], self._fast[names[0]], self._fast[names[1]], self.group_size)
        self._fast.update(zip((kind, *names), tables, strict=True))
        self._interleaved = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "reference":
            return self.forward_reference(x)
        # a decoded token makes 7 of these calls per layer: dtype checks in Python instead of no-op .to() calls and
        # the bias added in place took a 128x896 layer at one row from 33 to 25 us (its kernel alone: 15)
        fast = self._fast
        flat = x.reshape(-1, self.in_features)
        order = fast.get("order")
        if order is not None:
            flat = flat[:, order]
        if flat.shape[0] >= self.dequant_min_rows and ("scales32" in fast or "scales16" in fast):
            out = self._unpacked_matmul(flat.to(long_input_dtype()))
        else:  # torch's kernels want bfloat16 activations (the native one float32)
            if flat.dtype != torch.bfloat16 and self._native is None:
                flat = flat.to(torch.bfloat16)
            out = self._kernel_matmul(flat)
        bias = self.bias
        if bias is not None:
            out.add_(bias if bias.dtype == out.dtype else bias.to(out.dtype))
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def _unpacked_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """x @ W^T in x's dtype (float32, or bfloat16 where the CPU multiplies it natively) through the weight
        unpacked a block of output rows at a time: each block is made, used by one GEMM into its columns of the
        result and dropped, so a prompt never holds a whole float copy of the weight (gate/up: 17 MB each in float32,
        with the float codes beside it 35 MB more at prefill's peak)."""
        out = torch.empty(flat.shape[0], self.out_features, dtype=flat.dtype, device=flat.device)
        tile = 64 if self.kernel == "int4pack-cpu" else 32  # whole tiles of its packing (32 or 64 rows)
        step = max(tile, UNPACK_BLOCK_FLOATS // self.in_features // tile * tile)
        # the native kernels' codes unpack in C, straight into one reused block in the GEMM's dtype
        native = self._native is not None and flat.dtype in (torch.float32, torch.bfloat16)
        block = (
            torch.empty(min(step, self.out_features), self.in_features, dtype=flat.dtype, device=flat.device)
            if native
            else None
        )
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            if block is not None:  # native
                rows = self._native_rows(start, stop, block[: stop - start])
            else:
                rows = self._float_rows(start, stop).to(flat.dtype)
            torch.mm(flat, rows.t(), out=out[:, start:stop])
        return out

    def _native_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """`_float_rows` of a native-kernel layer, unpacked by quant/qgemv.c into `out` (float32 or bfloat16)."""
        fast, kind, native = self._fast, self.kernel[:2], self._native
        assert native is not None, "a native-kernel layer holds the library"
        scales, offsets = (fast[key][start:stop] for key in self._native_tables())
        return native_unpack(
            native, kind, fast[kind][start:stop], scales, offsets, self.group_size, out, interleaved=self._interleaved
        )

    def _float_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the dequantized weight, float32 (stop - start, in), from the fast kernel's tables."""
        fast = self._fast
        if self._interleaved:  # rows in whole groups of 8 (or up to the last row)
            return self._native_rows(start, stop, torch.empty(stop - start, self.in_features, device="cpu"))
        if self.kernel == "int8pack-cpu":
            return fast["weight"][start:stop].float().mul_(fast["scales32"][start:stop, None])
        if self.kernel == "q4-native-cpu":
            codes = unpack_q4(fast["q4"][start:stop])
        elif self.kernel == "q8-native-cpu":
            codes = fast["q8"][start:stop]
        else:  # int4pack-cpu: start is a multiple of 64, and stop too unless it is the end
            tile = int4pack_cpu_tile()
            assert tile is not None, "post_load keeps float tables only where the packing's layout is known"
            codes = unpack_int4pack_cpu(fast["packed"][start:stop], stop - start, self.in_features, tile)
        codes = codes.view(stop - start, self.in_features // self.group_size, self.group_size)
        if "scales16" in fast:  # (stored - zero) * scale, as the checkpoint's dequantization computes it
            zeros, scales = (fast[key][start:stop].float().unsqueeze(-1) for key in ("zeros16", "scales16"))
            weight = codes.float().sub_(zeros).mul_(scales)
        else:
            weight = torch.addcmul(fast["offsets32"][start:stop], codes.float(), fast["scales32"][start:stop])
        return weight.view(stop - start, self.in_features)

    def _native_tables(self) -> tuple[str, str]:
        """The native kernel's per-group tables: float16 scales and int16 zeros, or float32 scales and offsets."""
        return ("scales16", "zeros16") if "scales16" in self._fast else ("scales32", "offsets32")

    def _kernel_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        if self._native is not None:
            fast, kind = self._fast, self.kernel[:2]
            scales, offsets = (fast[key] for key in self._native_tables())
            return native_matmul(
                self._native,
                kind,
                flat.float().contiguous(),
                fast[kind],
                scales,
                offsets,
                self.group_size,
                interleaved=self._interleaved,
            )
        if self.kernel == "int8pack-cpu":
            return torch.ops.aten._weight_int8pack_mm(flat, self._fast["weight"], self._fast["scales"])
        if self.kernel == "int4pack-cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self._fast["packed"], self.group_size, self._fast["scales_and_zeros"]
            )
        return torch.ops.aten._weight_int4pack_mm(
            flat, self._fast["packed"], self.group_size, self._fast["scales_and_zeros"]
        )

    # -- building -----------------------------------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        bias: torch.Tensor | None,
        config: QuantConfig,
    ) -> QuantLinear:
        """Pack an algorithm's result: codes (out, in), scales/zeros (groups, out), g_idx (in,)."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bias=bias is not None, config=config)
        if config.layout == "awq":
            layer.qweight, layer.qzeros = pack_awq(codes, zeros)
        else:
            layer.qweight, layer.qzeros = pack_gptq(codes, zeros, bits=config.bits, version=layer._gptq_version)
            layer.g_idx = g_idx.to(device=codes.device, dtype=torch.int32)
        layer.scales = scales.to(torch.float16)
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16)
        return layer
