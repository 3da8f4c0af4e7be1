"""Facts about a checkpoint directory for `qwen2 info`, read from its files without loading weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import weight_files
from .config import load_config
from .errors import BadInput
from .memory import kv_bytes_per_token


def parameter_count(config) -> int:
    """Parameters implied by the config (dense models; MoE counts every expert)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    attention = hidden * config.num_attention_heads * config.head_dim * 2 + 2 * hidden * kv
    attention += config.num_attention_heads * config.head_dim + 2 * kv
    mlp = 3 * hidden * config.intermediate_size
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return layers * (attention + mlp + 2 * hidden) + hidden + embeddings


def parse_memory(text: str) -> int:
    """'24GB', '16GiB', '512MB' -> bytes."""
    units = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "g": 2**30, "m": 2**20}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            try:
                return int(float(lowered[: -len(unit)]) * factor)
            except ValueError:
                break
    raise BadInput(f"cannot read memory size {text!r}: use a number with GB, GiB, MB or MiB")


def describe(model_dir: Path, *, memory: str | None = None) -> dict[str, Any]:
    """Architecture, size, context, quantization, files, KV bytes per token (and the context a memory budget holds)."""
    config = load_config(model_dir)
    files = weight_files(model_dir)
    quant = config.quantization_config
    facts = {
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
        "kv_bytes_per_token": {
            kind: kv_bytes_per_token(config, element_bytes=size)
            for kind, size in (("float32", 4), ("bfloat16", 2), ("int8", 1))
        },
        "size_bytes": sum(f.stat().st_size for f in files),
        "files": [f.name for f in files],
    }
    if memory is not None:
        budget = parse_memory(memory) - facts["size_bytes"]
        facts["max_context"] = {
            kind: max(0, budget // per_token) for kind, per_token in facts["kv_bytes_per_token"].items()
        }
    return facts
