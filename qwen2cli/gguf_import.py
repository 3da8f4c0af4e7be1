"""GGUF -> a Hugging Face-layout checkpoint: config.json, generation_config.json, safetensors, tokenizer files. Block
quantized weights keep their codes (qwen2cli/gguf_repack.py, docs/gguf-layout.md), so nothing is rounded."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import BadCheckpoint, BadInput
from .gguf_dequant import dequantize
from .gguf_repack import repack
from .tokenizer import QWEN2_PATTERN
from .weights import save_weights

GPT2_TOKEN_TYPES = {"normal": 1, "control": 3, "user_defined": 4, "unused": 5}
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """llama.cpp's tensor name -> Hugging Face's (qwen2 stores Q/K unpermuted, unlike llama)."""
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.{match.group(3)}"
    base, _, kind = gguf_name.rpartition(".")
    if base in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[base]}.{kind}"
    raise BadCheckpoint(f"unexpected tensor {gguf_name!r} in a qwen2 GGUF")


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise BadInput(f"{path} is not a readable GGUF file ({' '.join(str(exc).split())[:100]})") from exc


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader) -> dict[str, Any]:
    """config.json from the GGUF's metadata; other architectures are refused by name."""
    architecture = _field(reader, "general.architecture")
    if architecture != "qwen2":
        raise BadCheckpoint(f"this GGUF holds a {architecture!r} model; qwen2cli imports qwen2 GGUFs only")
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise BadCheckpoint("GGUF has no token_embd.weight")
    heads = int(_field(reader, "qwen2.attention.head_count"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": shapes["token_embd.weight"][1],
        "hidden_size": int(_field(reader, "qwen2.embedding_length")),
        "intermediate_size": int(_field(reader, "qwen2.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "qwen2.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "qwen2.attention.head_count_kv", heads)),
        "max_position_embeddings": int(_field(reader, "qwen2.context_length", 32768)),
        "rms_norm_eps": float(_field(reader, "qwen2.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, "qwen2.rope.freq_base", 1_000_000.0)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "torch_dtype": "float32",
    }


def build_tokenizer_files(reader) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json rebuilt from the GGUF's vocabulary, merges and token types."""
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise BadCheckpoint("GGUF tokenizer is not byte-level BPE (tokenizer.ggml.model != gpt2)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = _field(reader, "tokenizer.ggml.merges") or []
    added = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == GPT2_TOKEN_TYPES["control"],
        }
        for i, (token, kind) in enumerate(zip(tokens, types, strict=False))
        if kind in (GPT2_TOKEN_TYPES["control"], GPT2_TOKEN_TYPES["user_defined"])
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": [merge.split(" ", 1) for merge in merges],
        },
    }
    ids = {entry["id"]: entry["content"] for entry in added}

    def token(key: str) -> str | None:
        index = _field(reader, key)
        return None if index is None else ids.get(int(index), tokens[int(index)])

    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_prefix_space": False,
        "model_max_length": int(_field(reader, "qwen2.context_length", 32768)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    return tokenizer, config


FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BLOCK_MODULES = ("_proj", "embed_tokens", "lm_head")  # the modules stored as block codes where their type allows
QUANT_METHOD = "gguf-blocks"


def _float_tensor(tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An F32/F16/BF16 tensor as it is stored; any other type dequantized to float32 (ours where vectorised,
    else gguf-py's)."""
    import gguf

    kind = tensor.tensor_type.name
    if kind in FLOAT_TYPES:
        raw = torch.from_numpy(np.ascontiguousarray(tensor.data).copy())
        return raw.view(FLOAT_TYPES[kind]).reshape(shape)
    try:
        values = dequantize(tensor.data, kind)  # the common block types, vectorised
        if values is None:
            values = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32))
    except NotImplementedError as exc:
        raise BadCheckpoint(f"tensor {tensor.name} has type {kind}, which the gguf package cannot dequantize") from exc
    except ValueError as exc:
        raise BadCheckpoint(f"tensor {tensor.name}: {exc}") from exc
    return values.reshape(shape)


def converted_tensors(
    reader, progress: Callable[[int, int], None] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Every tensor under its Hugging Face name, in (out, in) layout: the Linears', embedding's and head's block
    types as quant.blocks' codes and tables (`module.codes`, `.scales`, `.zeros` or `.offsets`), exactly the same
    weights; F32/F16/BF16 as they are; anything else dequantized to float32. Also each block module's format.
    `progress(bytes done, bytes total)` counts the file's tensor bytes."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    total, done = sum(int(t.n_bytes) for t in reader.tensors), 0
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dimension first
        name = hf_tensor_name(tensor.name)
        module, _, kind = name.rpartition(".")
        repacked = None
        if kind == "weight" and len(shape) == 2 and module.endswith(BLOCK_MODULES):
            try:
                repacked = repack(tensor.data, tensor.tensor_type.name, shape[0], shape[1])
            except ValueError as exc:
                raise BadCheckpoint(f"tensor {tensor.name}: {exc}") from exc
        if repacked is None:
            tensors[name] = _float_tensor(tensor, shape)
        else:
            table_names = repacked.fmt.table_names
            tensors[f"{module}.codes"] = repacked.codes
            tensors[f"{module}.{table_names[0]}"] = repacked.scales
            tensors[f"{module}.{table_names[1]}"] = repacked.table
            modules[module] = repacked.fmt.to_json()
        done += int(tensor.n_bytes)
        if progress is not None:
            progress(done, total)
    return tensors, modules


def import_gguf(gguf_path: Path, target: Path, *, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a complete checkpoint directory for `gguf_path` at `target` (built beside it, then renamed), its block
    types kept (docs/gguf-layout.md); `progress(bytes, total)` as tensors are converted."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise BadInput(f"no such GGUF file: {gguf_path}")
    reader = _open(gguf_path)
    config = read_config(reader)
    tokenizer, tokenizer_config = build_tokenizer_files(reader)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tensors, modules = converted_tensors(reader, progress)
        if modules:
            config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": 1, "modules": modules}
        save_weights(tensors, staging / "model.safetensors")
        del tensors
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        (staging / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if modules:  # the kernels it runs on, built into the store's cache now rather than at its first run
        from .quant.native import native_library
        from .quantized_load import use_kernel_cache

        use_kernel_cache()
        native_library()
    return target


def write_float_checkpoint(model_dir: Path, out_dir: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """A GGUF import as a float checkpoint for other tools (transformers, converters): each block module's weight
    dequantized (exactly the GGUF's weights in float32), no quantization_config; written beside `out_dir`, then
    renamed. `out_dir` must not exist."""
    from safetensors import safe_open

    from .quant.blocks import BlockFormat, dequantize_blocks

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    quant = config.pop("quantization_config", None) or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise BadInput(f"{model_dir} is not a GGUF import (its quantization_config is not {QUANT_METHOD})")
    if out_dir.exists():
        raise BadInput(f"{out_dir} exists; name a new directory")
    modules = {name: BlockFormat.from_json(data) for name, data in quant["modules"].items()}
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as stored:
            names = set(stored.keys())
            for name, fmt in modules.items():
                codes, scales, table = (stored.get_tensor(f"{name}.{key}") for key in ("codes", *fmt.table_names))
                tensors[f"{name}.weight"] = dequantize_blocks(codes, scales, table, fmt).to(dtype)
                names -= {f"{name}.{key}" for key in ("codes", *fmt.table_names)}
            for name in sorted(names):
                tensors[name] = stored.get_tensor(name).to(dtype)
        save_weights(tensors, staging / "model.safetensors")
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for item in model_dir.iterdir():
            if item.is_file() and item.name not in ("config.json", "model.safetensors"):
                shutil.copy2(item, staging / item.name)
        staging.replace(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
