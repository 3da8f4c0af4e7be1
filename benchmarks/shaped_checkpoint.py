"""A random-weight checkpoint with a real Qwen2.5 model's shapes, for speed and memory measurements where the real
weights cannot be had (a GPU machine with no network): the time a decoder takes does not depend on its weights.

  python benchmarks/shaped_checkpoint.py {0.5b,1.5b,7b} OUT [--device cuda] [--dtype bfloat16]

Weights are drawn as transformers initialises them (normal, std 0.02), saved by transformers in safetensors, with
the test suite's tiny tokenizer (its ids are all in range; text it decodes is meaningless)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2.5's published config.json values that set the shapes and the work per token
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
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

    from tests.tiny_tokenizer import write_tiny_tokenizer

    config = Qwen2Config(**SHAPES[args.size], max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=[2])
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2ForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    write_tiny_tokenizer(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
