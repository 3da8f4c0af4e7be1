"""The Qwen2 / Qwen2-MoE decoder in PyTorch, with Hugging Face parameter names; knows nothing of quantization or
files (a prompt chunk's attention on CPU may run in quant/attention.c, a plain C kernel)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import Qwen2Config
from .dca import DualChunkConfig, dual_chunk_attention, rotate
from .kv_cache import KVCache
from .quant.native import prefill_attention


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Qwen2 was trained."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def yarn_inverse_frequencies(config: Qwen2Config, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN's blended inverse frequencies and attention factor (the paper's ramp between interpolation and
    extrapolation)."""
    scaling = config.rope_scaling or {}
    base = config.rope_theta
    factor = float(
        scaling.get("factor") or config.max_position_embeddings / scaling["original_max_position_embeddings"]
    )
    original = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(scale: float, multiplier: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * multiplier * math.log(scale) + 1.0

        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    position_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolation_weight = 1 - ramp
    inverse = (1.0 / (factor * position_freqs)) * (1 - extrapolation_weight) + (
        1.0 / position_freqs
    ) * extrapolation_weight
    return inverse, float(attention_factor)


class RotaryEmbedding:
    """cos/sin tables for rotary position embedding, grown on demand; plain RoPE or YaRN."""

    def __init__(self, config: Qwen2Config) -> None:
        dim = config.head_dim
        with torch.device("cpu"):  # the model may be built on the meta device; these tables are computed, not loaded
            self._init_frequencies(config, dim)
        self.cos = self.sin = torch.empty(0)

    def _init_frequencies(self, config: Qwen2Config, dim: int) -> None:
        if config.rope_scaling and config.rope_scaling.get("type") == "yarn":
            self.inverse_frequencies, self.attention_scaling = yarn_inverse_frequencies(config, dim)
        else:
            exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            self.inverse_frequencies = 1.0 / (config.rope_theta**exponents)
            self.attention_scaling = 1.0

    def tables(self, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (positions, head_dim) in float32 for positions [0, end) at least."""
        if self.cos.shape[0] < end or self.cos.device != device:
            size = max(end, 2 * self.cos.shape[0], 256)
            positions = torch.arange(size, dtype=torch.float32, device=device)
            freqs = torch.outer(positions, self.inverse_frequencies.to(device))  # (P, head_dim/2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (P, head_dim)
            self.cos = angles.cos() * self.attention_scaling
            self.sin = angles.sin() * self.attention_scaling
        return self.cos, self.sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Fused:
    """Several Linears of one block that read the same input, computed by one call (quant.convert.fuse_native) and
    split, for inputs of up to `max_rows` rows; longer ones go through the layers one by one. Not a submodule:
    parameter names, state dicts and the separate layers stay as the checkpoint has them."""

    def __init__(
        self,
        projection: Callable[[torch.Tensor], torch.Tensor],
        layers: list[nn.Module],
        sizes: list[int],
        max_rows: int,
    ) -> None:
        self.projection, self.layers, self.sizes, self.max_rows = projection, layers, sizes, max_rows

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.numel() > self.max_rows * x.shape[-1]:
            return tuple(layer(x) for layer in self.layers)
        return self.projection(x).split(self.sizes, dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with q/k/v bias; scores in float32; K/V never repeated in memory."""

    def __init__(self, config: Qwen2Config, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window_for(layer_index)
        dca = config.dual_chunk_attention_config
        self.dual_chunk = DualChunkConfig.from_hf(dca) if dca else None
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.fused_qkv: Fused | None = None  # set by quantized loading where one kernel call can do all three

    def forward(self, x: torch.Tensor, rope: RopeTables, cache: KVCache, start_pos: int) -> torch.Tensor:
        batch, length, _ = x.shape
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.dual_chunk is not None:
            return self._dual_chunk_forward(q, k, v, rope, cache, start_pos)
        cos, sin = rope[0], rope[1]  # (T, D), in x's dtype (cast once per forward by Qwen2ForCausalLM)
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = cache.write(self.layer_index, start_pos, k, v)  # (B, Hkv, S, D) each
        out = self._attend(q, keys, values, start_pos)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Causal (and windowed) GQA attention; K/V are never repeated (SDPA's enable_gqa or a folded query).

        Scores are float32: torch's fused CPU/CUDA kernels accumulate bfloat16 in float32; float16, whose math
        fallback would not, is upcast here (Qwen2 overflows float16 scores).
        """
        batch, _, length, _ = q.shape
        dtype = q.dtype
        if dtype == torch.float16:
            q, keys, values = q.float(), keys.float(), values.float()
        key_length = keys.shape[2]
        if (
            length > 1
            and batch == 1
            and q.device.type == "cpu"
            and (self.sliding_window is None or key_length <= self.sliding_window)
        ):
            # a prompt chunk on CPU: quant/attention.c where it builds (AVX-512), 2-3x torch's flash attention there
            out = prefill_attention(q[0], keys[0], values[0], start_pos)
            if out is not None:
                return out.to(dtype).unsqueeze(0)
        if length == 1 and (self.sliding_window is None or key_length <= self.sliding_window):
            group = self.num_heads // self.num_kv_heads
            folded = q.reshape(batch, self.num_kv_heads, group, self.head_dim)  # (B, Hkv, group, D)
            out = F.scaled_dot_product_attention(folded, keys, values)
        elif start_pos == 0 and self.sliding_window is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
        else:
            mask = self._mask(length, start_pos, key_length, q.device)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return out.to(dtype).reshape(batch, self.num_heads, length, self.head_dim)

    def _dual_chunk_forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeTables, cache: KVCache, start_pos: int
    ) -> torch.Tensor:
        dual_chunk = self.dual_chunk
        assert dual_chunk is not None, "called only under dual chunk attention"
        batch, _, length, _ = q.shape
        key_cos, key_sin, succ_cos, succ_sin, inter_cos, inter_sin = rope
        keys, values = cache.write(self.layer_index, start_pos, rotate(k, key_cos, key_sin), v)
        group = self.num_heads // self.num_kv_heads
        grouped = q.view(batch, self.num_kv_heads, group, length, self.head_dim)  # (B, Hkv, group, T, D)
        queries = (
            rotate(grouped, key_cos, key_sin),
            rotate(grouped, succ_cos, succ_sin),
            rotate(grouped, inter_cos, inter_sin),
        )
        out = None
        if batch == 1 and q.device.type == "cpu":  # quant/attention.c where it builds (AVX-512, chunks of 64 keys)
            intra, successive, inter = (query[0].reshape(self.num_heads, length, self.head_dim) for query in queries)
            out = prefill_attention(
                intra, keys[0], values[0], start_pos, dual_chunk=(successive, inter, dual_chunk.chunk_len)
            )
        if out is None:
            out = dual_chunk_attention(queries, keys, values, start_pos=start_pos, config=dual_chunk)
        out = out.to(q.dtype).reshape(batch, self.num_heads, length, self.head_dim)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    def _mask(self, length: int, start_pos: int, key_length: int, device: torch.device) -> torch.Tensor:
        """Boolean (T, S) mask: causal, and within the sliding window when this layer has one."""
        query_pos = torch.arange(start_pos, start_pos + length, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(key_length, device=device)[None, :]  # (1, S)
        allowed = key_pos <= query_pos
        if self.sliding_window is not None:
            allowed &= key_pos > query_pos - self.sliding_window
        return allowed


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.fused_gate_up: Fused | None = None  # as Attention.fused_qkv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(x)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """Routes each token to `num_experts_per_tok` of `num_experts` SwiGLU experts, plus the shared expert."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices (N, k) and their weights (N, k) in the activations' dtype."""
        probs = F.softmax(self.gate(tokens), dim=-1, dtype=torch.float32)  # (N, E)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return indices, weights.to(tokens.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        tokens = x.reshape(-1, hidden)  # (N, hidden)
        indices, weights = self.route(tokens)
        # group the (token, slot) pairs by expert: one matmul per expert that received tokens, none for the rest
        flat_experts = indices.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=len(self.experts)).tolist()
        token_of_pair = order // self.top_k  # (N*k,) token index of each sorted pair
        pair_weights = weights.reshape(-1)[order]  # (N*k,)
        routed = torch.zeros_like(tokens)
        begin = 0
        for expert_index, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of_pair[begin : begin + count]
            out = self.experts[expert_index](tokens[rows]) * pair_weights[begin : begin + count, None]
            routed.index_add_(0, rows, out)
            begin += count
        shared = torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return (routed + shared).reshape(batch, length, hidden)


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_index):
            self.mlp: nn.Module = SparseMoeBlock(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rope: RopeTables, cache: KVCache, start_pos: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        # an explicit weight skips the random init (on the meta device, torch's normal_ would import dynamo: 1.5 s)
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


RopeTables = tuple[torch.Tensor, ...]  # (cos, sin) per position; dual chunk: key, successive and inter pairs


class Qwen2ForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and head; forward(input_ids, cache, start_pos) -> logits."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        dca = config.dual_chunk_attention_config
        self.dual_chunk = DualChunkConfig.from_hf(dca) if dca else None
        # one token's pass through every layer at once, or None where it does not apply (set by quantized loading:
        # qwen2cli.native_decode); not a submodule
        self.fast_decode: Callable[[torch.Tensor, KVCache, int], torch.Tensor | None] | None = None

    def _rope_tables(self, start_pos: int, length: int, device: torch.device) -> RopeTables:
        """cos/sin rows for positions start_pos..start_pos+length (three pairs under dual chunk attention)."""
        if self.dual_chunk is None:
            cos, sin = self.rotary.tables(start_pos + length, device)
            return cos[start_pos : start_pos + length], sin[start_pos : start_pos + length]
        cos, sin = self.rotary.tables(self.dual_chunk.chunk_size + 1, device)
        positions = torch.arange(start_pos, start_pos + length, device=device)
        key_pos, succ_pos = self.dual_chunk.key_positions(positions), self.dual_chunk.successive_positions(positions)
        inter_pos = torch.full_like(positions, self.dual_chunk.inter_position())
        return cos[key_pos], sin[key_pos], cos[succ_pos], sin[succ_pos], cos[inter_pos], sin[inter_pos]

    def forward(
        self, input_ids: torch.Tensor, cache: KVCache, start_pos: int, *, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for `input_ids` (B, T) at positions start_pos.. (only the last one if last_only)."""
        length = input_ids.shape[1]
        if start_pos + length > cache.max_len:
            raise ValueError(f"positions up to {start_pos + length} exceed the cache's {cache.max_len}")
        # (B, T, hidden); the table may be kept in its stored dtype on CPU (checkpoint.load_model)
        x = self.model.embed_tokens(input_ids).to(self.model.norm.weight.dtype)
        decoded = self.fast_decode(x, cache, start_pos) if self.fast_decode is not None and length == 1 else None
        if decoded is not None:
            x = decoded
        else:
            rope = tuple(table.to(x.dtype) for table in self._rope_tables(start_pos, length, input_ids.device))
            for layer in self.model.layers:
                x = layer(x, rope, cache, start_pos)
        cache.pos = start_pos + length
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))
