"""Facts about a checkpoint directory for `qwen2 info`, read from its files without loading weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import weight_files
from .config import load_config


def parameter_count(config) -> int:
    """Parameters implied by the config (dense models; MoE counts every expert)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    attention = hidden * config.num_attention_heads * config.head_dim * 2 + 2 * hidden * kv
    attention += config.num_attention_heads * config.head_dim + 2 * kv
    mlp = 3 * hidden * config.intermediate_size
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return layers * (attention + mlp + 2 * hidden) + hidden + embeddings


def describe(model_dir: Path) -> dict[str, Any]:
    """Architecture, size, context, quantization, files and KV bytes per token."""
    config = load_config(model_dir)
    files = weight_files(model_dir)
    quant = config.quantization_config
    return {
        "path": str(model_dir),
        "architecture": config.model_type,
        "parameters": parameter_count(config),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "rope_scaling": (config.rope_scaling or {}).get("type", "none"),
        "tie_word_embeddings": config.tie_word_embeddings,
        "dtype": config.torch_dtype,
        "quantization": f"{quant.get('quant_method')}-int{quant.get('bits')}" if quant else "none",
        "kv_bytes_per_token_fp32": 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4,
        "size_bytes": sum(f.stat().st_size for f in files),
        "files": [f.name for f in files],
    }
