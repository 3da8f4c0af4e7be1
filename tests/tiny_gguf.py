"""Tiny qwen2 GGUF files written with gguf.GGUFWriter, covering the tensor types llama.cpp files use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
LAYER_TYPES = [  # per layer: q, k, v, o, gate, up, down
    ["F16", "BF16", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0"],
    ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "F32", "BF16", "Q4_0"],
    ["Q4_1", "Q5_0", "Q5_1", "Q5_0", "Q5_1", "Q4_1", "Q5_0"],
]
# as llama.cpp's Q4_K_M of Qwen2.5-0.5B (whose 896 inputs are no multiple of 256): Q5_0 where K-quants cannot go,
# v and down alternating, every Linear quantized (so the one-token C decoder runs)
Q4_K_M_LAYER_TYPES = [
    ["Q5_0", "Q5_0", "Q8_0", "Q5_0", "Q5_0", "Q5_0", "Q6_K"],
    ["Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q4_K"],
]
NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def _k_quant_bytes(rows: int, cols: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random but well-formed K-quant blocks (gguf-py cannot quantize K types): sane fp16 scales, random codes."""
    blocks = cols // 256
    raw = rng.integers(0, 256, size=(rows, blocks, BLOCK_BYTES[kind]), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    dmin = np.frombuffer(np.float16(0.001).tobytes(), dtype=np.uint8)
    if kind == "Q6_K":
        raw[:, :, 208:210] = d
    else:
        raw[:, :, 0:2] = d
        raw[:, :, 2:4] = dmin
    return raw.reshape(rows, blocks * BLOCK_BYTES[kind])


def write_tiny_gguf(
    path: Path,
    *,
    architecture: str = "qwen2",
    seed: int = 0,
    layer_types: list[list[str]] = LAYER_TYPES,
    embedding_type: str = "Q5_0",
    head_type: str | None = "Q6_K",
) -> Path:
    """A qwen2 GGUF (hidden 256, a layer per entry of `layer_types`) with a tiny tokenizer; `head_type` None: no
    output.weight (the head tied to the embedding). Returns its path."""
    import gguf
    from tokenizers import Tokenizer

    from devtools.tiny_tokenizer import CHAT_TEMPLATE, write_tiny_tokenizer

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    tokenizer_dir = path.parent / f".{path.stem}-tokenizer"
    vocab_size = write_tiny_tokenizer(tokenizer_dir)
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokens = [""] * vocab_size
    for token, index in data["model"]["vocab"].items():
        tokens[index] = token
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
    types = [3 if any(a["id"] == i for a in data["added_tokens"]) else 1 for i in range(vocab_size)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    hidden, intermediate, heads, kv_heads, layers = 256, 512, 4, 2, len(layer_types)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {a["content"]: a["id"] for a in data["added_tokens"]}
    writer.add_bos_token_id(ids["<|endoftext|>"])
    writer.add_eos_token_id(ids["<|im_end|>"])
    writer.add_pad_token_id(ids["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def add(name: str, shape: tuple[int, ...], kind: str, scale: float = 0.05) -> None:
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        if kind in BLOCK_BYTES:
            writer.add_tensor(
                name, _k_quant_bytes(shape[0], shape[1], kind, rng), raw_dtype=gguf.GGMLQuantizationType[kind]
            )
        elif kind == "F32":
            writer.add_tensor(name, values)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    add("token_embd.weight", (vocab_size, hidden), embedding_type, 0.5)
    add("output_norm.weight", (hidden,), "F32", 1.0)
    if head_type is not None:
        add("output.weight", (vocab_size, hidden), head_type)
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (128, hidden),
        "v_proj": (128, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }
    for layer in range(layers):
        for (module, shape), kind in zip(shapes.items(), layer_types[layer], strict=True):
            add(f"blk.{layer}.{NAMES[module]}.weight", shape, kind)
        for module, size in (("attn_q", hidden), ("attn_k", 128), ("attn_v", 128)):
            add(f"blk.{layer}.{module}.bias", (size,), "F32", 0.1)
        add(f"blk.{layer}.attn_norm.weight", (hidden,), "F32", 1.0)
        add(f"blk.{layer}.ffn_norm.weight", (hidden,), "F32", 1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))  # the fixture's own sanity check
    return path
