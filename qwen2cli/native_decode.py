"""One decoded token through every layer in C (quant/qlayer.c), for quantized models on the native CPU kernels.

With q/k/v and gate/up fused, a decoded token still made some 40 torch calls a layer around its 4 kernel calls
(norms, rotary embedding, the cache write, attention, residuals), about as long as the kernels themselves on
Qwen2.5-0.5B. Here a layer is one call, for one sequence or for several decoded side by side (a server's
requests: each weight read then serves them all). The step runs in float32 throughout and writes the callers'
caches (float32 or bfloat16); models or caches it does not cover (MoE, sliding windows, dual chunk attention,
act-order layers, an int8 cache, batched caches) take the Python path, and so does every prompt of more than one
token.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from .kv_cache import KVCache
from .model import MLP, DecoderLayer, Fused, Qwen2ForCausalLM


class _QMatrix(ctypes.Structure):
    _fields_ = [
        ("weights", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("offsets", ctypes.c_void_p),
        ("rows", ctypes.c_int),
        ("cols", ctypes.c_int),
        ("group", ctypes.c_int),
        ("kind", ctypes.c_int),
        ("half", ctypes.c_int),
        ("interleaved", ctypes.c_int),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _QMatrix * 3),
        ("o", _QMatrix),
        ("gate_up", _QMatrix * 2),
        ("down", _QMatrix),
        ("qkv_bias", ctypes.c_void_p),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
    ]


class _Shape(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int),
        ("heads", ctypes.c_int),
        ("kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("intermediate", ctypes.c_int),
        ("max_len", ctypes.c_int),
        ("cache_bf16", ctypes.c_int),
        ("eps", ctypes.c_float),
    ]


def _matrix(layer: nn.Module, kept: list[torch.Tensor]) -> _QMatrix | None:
    """A native-kernel QuantLinear as qlayer.c reads it (its tables appended to `kept`, which the decoder holds
    while it holds their addresses); None for anything else (act-order included)."""
    from .quant.codes import KINDS
    from .quant.linear import QuantLinear

    if not isinstance(layer, QuantLinear) or layer._native is None or "order" in layer._fast:
        return None
    kind, half = layer.kernel[:2], "scales16" in layer._fast
    tables = [layer._fast[kind], *(layer._fast[name] for name in layer._native_tables())]
    kept += tables
    return _QMatrix(
        *(table.data_ptr() for table in tables),
        layer.out_features,
        layer.in_features,
        layer.group_size,
        KINDS[kind],
        int(half),
        int(layer._interleaved),
    )


def _parts(
    fused: Fused | None, layers: list[nn.Module], kept: list[torch.Tensor], slots: int
) -> tuple[ctypes.Array[_QMatrix], int, torch.Tensor | None] | None:
    """A projection as qlayer.c's parts (one fused matrix, or each layer's), their rows, and their bias (float32,
    zeros where a part has none; None when none has one); None where a part is not a native-kernel layer."""
    from .quant.linear import QuantLinear

    projections = [fused.projection] if fused is not None else layers
    if not all(isinstance(layer, QuantLinear) for layer in projections):
        return None
    linears = [layer for layer in projections if isinstance(layer, QuantLinear)]
    matrices = [matrix for matrix in (_matrix(layer, kept) for layer in linears) if matrix is not None]
    if len(matrices) != len(linears):
        return None
    bias = None
    if any(layer.bias is not None for layer in linears):
        biases = [getattr(layer, "bias", None) for layer in linears]
        bias = torch.cat(
            [
                torch.zeros(layer.out_features) if b is None else b.float()
                for layer, b in zip(linears, biases, strict=True)
            ]
        ).contiguous()
        kept.append(bias)
    return (_QMatrix * slots)(*matrices), sum(layer.out_features for layer in linears), bias


class NativeDecoder:
    """`decoder(x, cache, start_pos)`: the hidden state after the last layer for one token's embedding x (1, 1,
    hidden), in x's dtype, or None where the Python path must run (see the module's docstring). `rows` decodes a
    token of several sequences at once, each in its own cache."""

    def __init__(
        self, model: Qwen2ForCausalLM, library: ctypes.CDLL, layers: list[_Layer], kept: list[torch.Tensor]
    ) -> None:
        # the model's parts, not the model: it holds this decoder, and a cycle would keep a dropped model (all its
        # weights) in memory until the garbage collector next runs
        self.config, self.rotary = model.config, model.rotary
        self.library, self.layers, self._kept = library, layers, kept
        self._sized: tuple[tuple[int, bool], _Shape, torch.Tensor] | None = None  # for the last cache size seen

    @classmethod
    def build(cls, model: Qwen2ForCausalLM) -> NativeDecoder | None:
        config = model.config
        if (
            model.dual_chunk is not None
            or config.head_dim % 8
            or config.head_dim > 256
            or config.num_attention_heads // config.num_key_value_heads > 256
        ):  # qlayer.c's fixed arrays
            return None
        layers: list[_Layer] = []
        kept: list[torch.Tensor] = []
        library: ctypes.CDLL | None = None
        for layer in cast(Iterable[DecoderLayer], model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            if not isinstance(mlp, MLP) or attention.sliding_window is not None:
                return None
            qkv = _parts(attention.fused_qkv, [attention.q_proj, attention.k_proj, attention.v_proj], kept, 3)
            gate_up = _parts(mlp.fused_gate_up, [mlp.gate_proj, mlp.up_proj], kept, 2)
            others = [_matrix(m, kept) for m in (attention.o_proj, mlp.down_proj)]
            if qkv is None or gate_up is None or others[0] is None or others[1] is None:
                return None
            attention_size, intermediate = config.num_attention_heads * config.head_dim, config.intermediate_size
            # the shapes qlayer.c assumes from the config (a checkpoint whose layers were padded past it is not)
            if (
                qkv[1] != attention_size + 2 * config.num_key_value_heads * config.head_dim
                or attention.o_proj.in_features != attention_size
                or gate_up[1] != 2 * intermediate
                or gate_up[2] is not None
                or mlp.down_proj.in_features != intermediate
            ):
                return None
            library = getattr(attention.o_proj, "_native", None)  # a QuantLinear's: _matrix took it
            norms = [
                layer.input_layernorm.weight.detach().float().contiguous(),
                layer.post_attention_layernorm.weight.detach().float().contiguous(),
            ]
            bias = qkv[2]
            kept += norms
            layers.append(
                _Layer(
                    qkv[0],
                    others[0],
                    gate_up[0],
                    others[1],
                    None if bias is None else bias.data_ptr(),
                    norms[0].data_ptr(),
                    norms[1].data_ptr(),
                    None,  # each call's caches are passed beside the layer
                    None,
                )
            )
        if library is None:
            return None
        return cls(model, library, layers, kept)

    def takes(self, caches: list[KVCache]) -> bool:
        """Whether `rows` decodes in these caches: plain float32 or bfloat16 CPU caches of one sequence each, all of
        one length and dtype (one Shape serves them)."""
        first = caches[0]
        return all(
            type(cache) is KVCache
            and cache.shape[0] == 1
            and cache.keys[0].device.type == "cpu"
            and cache.dtype in (torch.float32, torch.bfloat16)
            and (cache.max_len, cache.dtype) == (first.max_len, first.dtype)
            for cache in caches
        )

    def _shape(self, cache: KVCache, count: int) -> tuple[_Shape, torch.Tensor]:
        key = (cache.max_len, cache.dtype == torch.bfloat16)
        if self._sized is None or self._sized[0] != key:
            config = self.config
            shape = _Shape(
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
                config.intermediate_size,
                cache.max_len,
                int(key[1]),
                config.rms_norm_eps,
            )
            self._sized = key, shape, torch.empty(0, device="cpu")
        shape, work = self._sized[1], self._sized[2]
        needed = self.library.qlayer_work_floats(ctypes.byref(shape), count)
        if work.numel() < needed:  # grown to the most rows asked for at once
            work = torch.empty(needed, dtype=torch.float32, device="cpu")
            self._sized = key, shape, work
        return shape, work

    def __call__(self, x: torch.Tensor, cache: KVCache, start_pos: int) -> torch.Tensor | None:
        if x.shape[:2] != (1, 1) or x.device.type != "cpu" or not self.takes([cache]):
            return None
        return self.rows(x.reshape(1, -1), [cache], [start_pos]).view(1, 1, -1).to(x.dtype)

    def rows(self, x: torch.Tensor, caches: list[KVCache], positions: list[int]) -> torch.Tensor:
        """The hidden states (count, hidden) float32 after the last layer for one token of each of `count`
        sequences: x (count, hidden), the token of caches[i] at positions[i] (caches that `takes`). Each row comes
        out exactly as it does decoded alone."""
        count = len(caches)
        shape, work = self._shape(caches[0], count)
        hidden = x.to(torch.float32, copy=True).contiguous()  # the residual stream, updated in place by each layer
        cos, sin = self.rotary.tables(max(positions) + 1, x.device)  # float32 (positions, head_dim)
        index = torch.tensor(positions, device=cos.device)
        cos, sin = cos[index].contiguous(), sin[index].contiguous()
        position_array = (ctypes.c_int * count)(*positions)
        decode, shape_ref = self.library.qlayer_decode, ctypes.byref(shape)
        pointers = hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(), work.data_ptr()
        for index_, layer in enumerate(self.layers):
            keys = (ctypes.c_void_p * count)(*(cache.keys[index_].data_ptr() for cache in caches))
            values = (ctypes.c_void_p * count)(*(cache.values[index_].data_ptr() for cache in caches))
            decode(ctypes.byref(layer), shape_ref, count, pointers[0], pointers[1], pointers[2], position_array,
                   keys, values, pointers[3])  # fmt: skip
        return hidden
