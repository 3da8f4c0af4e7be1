"""A static, preallocated key/value cache, one buffer pair per layer at num_key_value_heads, owned by the caller."""

from __future__ import annotations

import torch

from .config import Qwen2Config


class KVCache:
    """Keys and values for positions [0, pos) of one sequence batch; the model writes and advances `pos`."""

    def __init__(
        self,
        config: Qwen2Config,
        max_len: int,
        *,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)  # (B, n_kv_heads, S, D)
        self.dtype = dtype
        self.keys = [self._buffer(device) for _ in range(config.num_hidden_layers)]
        self.values = [self._buffer(device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.pos = 0

    def _buffer(self, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=device)

    def write(
        self, layer_index: int, start_pos: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `keys`/`values` (B, n_kv_heads, T, head_dim) at start_pos; return the cache up to start_pos + T."""
        end = start_pos + keys.shape[2]
        self.keys[layer_index][:, :, start_pos:end] = keys
        self.values[layer_index][:, :, start_pos:end] = values
        return self.keys[layer_index][:, :, :end], self.values[layer_index][:, :, :end]

    def trim(self, length: int) -> None:
        """Forget every position from `length` on (a chat keeps the prefix it shares with an edited history)."""
        if not 0 <= length <= self.pos:
            raise ValueError(f"cannot trim a cache holding {self.pos} positions to {length}")
        self.pos = length

    def reset(self) -> None:
        """Forget everything."""
        self.pos = 0

    @property
    def nbytes(self) -> int:
        """Bytes the cache's buffers occupy."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        return self.keys + self.values

    def bytes_per_token(self) -> int:
        """Cache bytes one position takes across all layers."""
        return self.nbytes // self.max_len


class Int8KVCache(KVCache):
    """Keys and values stored as int8 with one float scale per head and position: about half a bfloat16 cache.

    Qwen2's keys carry a few channels several times larger than the rest (the k_proj bias); dividing keys by a
    per-channel scale taken from the first tokens written (the prompt) before the per-token int8 rounding keeps
    those channels from eating the other channels' precision.
    """

    def __init__(
        self,
        config: Qwen2Config,
        max_len: int,
        *,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(config, max_len, batch_size=batch_size, dtype=dtype, device=device)
        scale_shape = self.shape[:3] + (1,)  # (B, n_kv_heads, S, 1)
        self.key_scales = [torch.ones(scale_shape, dtype=torch.float16, device=device) for _ in self.keys]
        self.value_scales = [torch.ones(scale_shape, dtype=torch.float16, device=device) for _ in self.values]
        self.key_channel_scales: list[torch.Tensor | None] = [None] * len(self.keys)  # (B, n_kv_heads, 1, D)
        self.value_channel_scales: list[torch.Tensor | None] = [None] * len(self.values)

    def _buffer(self, device: torch.device | str) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=torch.int8, device=device)

    def _tensors(self) -> list[torch.Tensor]:
        return self.keys + self.values + self.key_scales + self.value_scales

    def reset(self) -> None:
        super().reset()
        self.key_channel_scales = [None] * len(self.keys)
        self.value_channel_scales = [None] * len(self.values)

    @staticmethod
    def _channel_scale(known: list[torch.Tensor | None], layer_index: int, new: torch.Tensor) -> torch.Tensor:
        scale = known[layer_index]
        if scale is None:
            magnitude = new.float().abs().amax(dim=2, keepdim=True)  # (B, H, 1, D)
            scale = known[layer_index] = (magnitude / magnitude.mean(dim=-1, keepdim=True)).clamp(min=1.0)
        return scale

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (x.float().abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-8).to(torch.float16)  # (B, H, T, 1)
        return torch.round(x.float() / scale.float()).clamp(-127, 127).to(torch.int8), scale

    def write(
        self, layer_index: int, start_pos: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + keys.shape[2]
        key_channel = self._channel_scale(self.key_channel_scales, layer_index, keys)
        value_channel = self._channel_scale(self.value_channel_scales, layer_index, values)
        for store, scales, new in (
            (self.keys, self.key_scales, keys.float() / key_channel),
            (self.values, self.value_scales, values.float() / value_channel),
        ):
            quantized, scale = self._quantize(new)
            store[layer_index][:, :, start_pos:end] = quantized
            scales[layer_index][:, :, start_pos:end] = scale

        def restore(store: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
            return store[layer_index][:, :, :end].to(self.dtype) * scales[layer_index][:, :, :end].to(self.dtype)

        return (
            restore(self.keys, self.key_scales) * key_channel.to(self.dtype),
            restore(self.values, self.value_scales) * value_channel.to(self.dtype),
        )
