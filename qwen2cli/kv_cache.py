"""A static, preallocated key/value cache, one buffer pair per layer at num_key_value_heads, owned by the caller."""
from __future__ import annotations

import torch

from .config import Qwen2Config


class KVCache:
    """Keys and values for positions [0, pos) of one sequence batch; the model writes, the caller moves `pos`."""

    def __init__(self, config: Qwen2Config, max_len: int, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.pos = 0

    def write(self, layer_index: int, start_pos: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def bytes_per_token(self) -> int:
        """Cache bytes one position takes across all layers."""
        return self.nbytes // self.max_len
