"""Tiny random Qwen2 checkpoints saved by transformers (the reference), with a tiny tokenizer.

python -m devtools.tiny_checkpoint DIR    writes one into DIR and prints DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def write_tiny_checkpoint(
    directory: Path,
    *,
    vocab_size: int = 512,
    num_kv_heads: int = 2,
    tie: bool = False,
    rope_scaling: dict | None = None,
    sliding_window: int | None = None,
    max_window_layers: int = 1,
    seed: int = 0,
    with_tokenizer: bool = True,
    max_position_embeddings: int = 2048,
) -> Path:
    """A tiny random Qwen2 checkpoint saved by transformers (the reference), plus a tiny tokenizer."""
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM as HFModel

    torch.manual_seed(seed)
    config = HFConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        if rope_scaling is None
        else {"rope_theta": 10000.0, **rope_scaling},
        tie_word_embeddings=tie,
        use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window,
        max_window_layers=max_window_layers,
        bos_token_id=None,
        eos_token_id=[2],
        rms_norm_eps=1e-6,
    )
    model = HFModel(config).float().eval()
    with torch.no_grad():  # random biases and norms so that every parameter matters
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0, 0.5 if "norm" in name else 0.1).add_(1.0 if "norm" in name else 0.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if with_tokenizer:
        from devtools.tiny_tokenizer import write_tiny_tokenizer

        size = write_tiny_tokenizer(directory)
        assert size <= vocab_size
        eos = json.loads((directory / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in eos["added_tokens"]}
        generation = {
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "repetition_penalty": 1.05,
        }
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


if __name__ == "__main__":
    print(write_tiny_checkpoint(Path(sys.argv[1])))
