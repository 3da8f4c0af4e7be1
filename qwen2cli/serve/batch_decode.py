"""One decode step for several sequences at once, each in its own cache at its own position: the weight reads of
every linear layer are shared, attention runs per sequence.

Quantized models on the native CPU kernels take the step in C (qwen2cli.native_decode), where every row's
arithmetic is that of a token decoded alone: the step runs exactly the active rows, and each answer is the one
`qwen2 run` gives. Elsewhere the step runs through torch with a fixed number of rows (padding the unused ones): a
float matmul's rows come out bit for bit the same whatever the other rows hold, but not whatever their number is,
so a fixed row count keeps each answer identical to the one it gets alone in the server."""

from __future__ import annotations

from typing import cast

import torch

from ..kv_cache import KVCache
from ..model import Attention, DecoderLayer, Qwen2ForCausalLM, rotate_half
from ..native_decode import NativeDecoder
from ..quant.linear import QuantLinear


def can_batch(model: Qwen2ForCausalLM) -> bool:
    """Whether decode_step applies: not under dual chunk attention, and no mixture-of-experts layers (whose expert
    matmuls take as many rows as tokens are routed to them, so a batch would change each sequence's numbers)."""
    from ..model import MLP

    return model.dual_chunk is None and all(isinstance(layer.mlp, MLP) for layer in model.model.layers)


# rows of the head at once on the native path (its kernels' per-row arithmetic is fixed below the row count from
# which QuantLinear unpacks the weight for a float GEMM instead)
HEAD_ROWS = 64


def decode_step(model: Qwen2ForCausalLM, tokens: list[int], caches: list[KVCache], *, rows: int) -> torch.Tensor:
    """Run tokens[i] at caches[i].pos for every i (len(tokens) <= rows); return their logits (len(tokens), vocab)."""
    decoder = model.fast_decode
    if isinstance(decoder, NativeDecoder) and decoder.takes(caches):
        return _native_step(model, decoder, tokens, caches)
    count = len(tokens)
    device = model.model.norm.weight.device  # the embedding may be a quantized table without a plain weight
    ids = torch.tensor(tokens + [0] * (rows - count), device=device)[:, None]  # (M, 1)
    x = model.model.embed_tokens(ids).to(model.model.norm.weight.dtype)  # (M, 1, hidden)
    positions = [cache.pos for cache in caches]
    cos, sin = model.rotary.tables(max(positions) + 1, device)
    index = torch.tensor(positions + [0] * (rows - count), device=device)
    cos = cos[index].to(x.dtype)[:, None, None, :]  # (M, 1, 1, head_dim)
    sin = sin[index].to(x.dtype)[:, None, None, :]
    for layer in cast(list[DecoderLayer], list(model.model.layers)):
        attention: Attention = layer.self_attn
        heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        h = layer.input_layernorm(x)
        if attention.fused_qkv is not None:
            q, k, v = attention.fused_qkv(h)
        else:
            q, k, v = attention.q_proj(h), attention.k_proj(h), attention.v_proj(h)
        q = q.view(rows, 1, heads, head_dim).transpose(1, 2)  # (M, H, 1, D)
        k = k.view(rows, 1, kv_heads, head_dim).transpose(1, 2)  # (M, Hkv, 1, D)
        v = v.view(rows, 1, kv_heads, head_dim).transpose(1, 2)  # (M, Hkv, 1, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = torch.zeros(rows, heads, 1, head_dim, dtype=x.dtype, device=device)  # padding rows attend to nothing
        for row, cache in enumerate(caches):
            keys, values = cache.write(attention.layer_index, cache.pos, k[row : row + 1], v[row : row + 1])
            out[row : row + 1] = attention._attend(q[row : row + 1], keys, values, cache.pos)
        x = x + attention.o_proj(out.transpose(1, 2).reshape(rows, 1, heads * head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    for cache in caches:
        cache.pos += 1
    return model.lm_head(model.model.norm(x))[:count, -1].float()  # (count, vocab)


def _native_step(
    model: Qwen2ForCausalLM, decoder: NativeDecoder, tokens: list[int], caches: list[KVCache]
) -> torch.Tensor:
    """decode_step's rows through the C layers, then the final norm and the head as a lone token takes them: the
    norm row by row, the head on all rows where its kernel's rows are independent (the native one), else row by
    row."""
    ids = torch.tensor(tokens, device="cpu")[:, None]  # (count, 1)
    x = model.model.embed_tokens(ids).to(model.model.norm.weight.dtype)  # (count, 1, hidden), as Model.forward
    hidden = decoder.rows(x[:, 0], caches, [cache.pos for cache in caches]).to(x.dtype)
    for cache in caches:
        cache.pos += 1
    normed = torch.cat([model.model.norm(row.view(1, 1, -1)) for row in hidden])  # (count, 1, hidden)
    head = model.lm_head
    step = HEAD_ROWS if isinstance(head, QuantLinear) and head._native is not None else 1
    return torch.cat([head(normed[start : start + step]) for start in range(0, len(tokens), step)])[:, -1].float()
