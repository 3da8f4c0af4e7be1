"""A random-weight checkpoint with a real Qwen2.5 model's shapes, for speed and memory measurements where the real
weights cannot be had (a GPU machine with no network): the time a decoder takes does not depend on its weights.

  python benchmarks/shaped_checkpoint.py {0.5b,1.5b,7b} OUT [--device cuda] [--dtype bfloat16]

Weights are drawn as transformers initialises them (normal, std 0.02) a tensor at a time and written in safetensors
shards of 2 GB (a 7B is never whole in memory: 15 GB in bfloat16), with the test suite's tiny tokenizer (its ids
are all in range; text it decodes is meaningless)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_BYTES = 2 << 30
# Qwen2.5's published config.json values that set the shapes and the work per token (Qwen2Config keywords)
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from devtools.tiny_tokenizer import write_tiny_tokenizer

    config = Qwen2Config(
        **SHAPES[args.size],
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=[2],
    )
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):  # the names and shapes only: a 7B in float32 would not fit a 24 GB machine
        shapes = {
            name: tuple(t.shape)
            for name, t in Qwen2ForCausalLM(config).state_dict().items()
            if not (config.tie_word_embeddings and name == "lm_head.weight")
        }
    args.out.mkdir(parents=True, exist_ok=True)
    config.dtype = args.dtype
    config.save_pretrained(args.out)
    generator = torch.Generator(args.device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    for name, shape in shapes.items():  # transformers' init: normal(0, 0.02) weights, zero biases, unit norms
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        elif name.endswith("bias"):
            tensor = torch.zeros(shape, dtype=dtype)
        else:
            tensor = torch.randn(shape, generator=generator, device=args.device).mul_(0.02).to("cpu", dtype)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > SHARD_BYTES:
            _write_shard(args.out, shard, weight_map)  # written and dropped before the next one fills
            shard = {}
        shard[name] = tensor
    _write_shard(args.out, shard, weight_map)
    (args.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tiny_tokenizer(args.out)
    print(args.out)


def _write_shard(out: Path, tensors: dict, weight_map: dict[str, str]) -> None:
    """The next numbered shard; its tensors' names go into the index's weight_map."""
    from qwen2cli.weights import save_weights  # a tensor at a time: no serialised copy of the shard in memory

    name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
    save_weights(tensors, out / name)
    weight_map.update(dict.fromkeys(tensors, name))


if __name__ == "__main__":
    main()
