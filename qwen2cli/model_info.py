"""Facts about a checkpoint directory for `qwen2 info`, read from its files without loading weights."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .config import load_config
from .errors import BadCheckpoint, BadInput
from .memory import kv_bytes_per_token
from .weights import weight_files


def parameter_count(config) -> int:
    """Parameters implied by the config (dense models; MoE counts every expert)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    attention = hidden * config.num_attention_heads * config.head_dim * 2 + 2 * hidden * kv
    attention += config.num_attention_heads * config.head_dim + 2 * kv
    mlp = 3 * hidden * config.intermediate_size
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return layers * (attention + mlp + 2 * hidden) + hidden + embeddings


DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
DTYPE_BYTES.update({"I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1})
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit


def check_safetensors(path: Path) -> int:
    """The bytes of tensor data a safetensors file holds, after checking that its header is readable and that the
    tensors it describes fill the file exactly; BadCheckpoint ("corrupt or truncated") otherwise."""

    def bad(reason: str) -> BadCheckpoint:
        return BadCheckpoint(f"{path.name} is corrupt or truncated ({reason})")

    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_bytes <= min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"a {size}-byte file cannot hold the header it announces")
        try:
            header = json.loads(handle.read(header_bytes))
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad(f"unreadable header: {exc}") from None
    data_bytes = size - 8 - header_bytes
    spans = []
    try:
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            begin, end = tensor["data_offsets"]
            element = DTYPE_BYTES.get(tensor["dtype"])  # a dtype not listed here: its size is not checked
            expected = end - begin if element is None else math.prod(tensor["shape"]) * element
            if end - begin != expected or not 0 <= begin <= end:
                raise bad(f"{name} spans {end - begin} bytes, its shape and dtype need {expected}")
            if end > data_bytes:
                raise bad(f"{name} ends at byte {end} of data, the file holds {data_bytes}")
            spans.append((begin, end))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise bad(f"malformed header entry: {exc}") from None
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise bad(f"the tensors leave bytes {covered}-{begin} unaccounted for or overlapping")
        covered = end
    if covered != data_bytes:
        raise bad(f"the header describes {covered} bytes of data, the file holds {data_bytes}")
    return data_bytes


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


def _quantization_name(quant: dict[str, Any] | None) -> str:
    """gptq-int4, awq-int4 ...; a GGUF import's block types, most weights first (gguf-blocks Q5_0+Q6_K+...)."""
    if not quant:
        return "none"
    if quant.get("quant_method") == "gguf-blocks":
        sources = [str(m.get("source") or m.get("codes")) for m in (quant.get("modules") or {}).values()]
        return "gguf-blocks " + "+".join(sorted(set(sources), key=lambda s: (-sources.count(s), s)))
    return f"{quant.get('quant_method')}-int{quant.get('bits')}"


def describe(model_dir: Path, *, memory: str | None = None) -> dict[str, Any]:
    """Architecture, size, context, quantization, files, KV bytes per token (and the context a memory budget holds)."""
    config = load_config(model_dir)
    files = weight_files(model_dir)
    for path in files:
        check_safetensors(path)
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
        "quantization": _quantization_name(quant),
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
