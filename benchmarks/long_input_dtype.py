"""Prefill matmuls in float32 against bfloat16 on this CPU: the premise of qwen2cli.quant.linear.long_input_dtype.

  python benchmarks/long_input_dtype.py [--rows 512] [--rounds 5] [--threads 2]

Times F.linear at Qwen2.5-0.5B's decoder shapes (q/k/v, o_proj, gate+up, down; 24 layers) for a block of `rows`
prompt tokens, the two dtypes taking turns round after round so that a shared CPU's drift falls on both. Prints
the median tokens/s of each, their ratio, and the dtype long_input_dtype() picks here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS = 24
SHAPES = {"qkv": (896, 1152), "o_proj": (896, 896), "gate_up": (896, 9728), "down": (4864, 896)}  # (in, out)


def matmul_seconds(rows: int, dtype: torch.dtype, *, repeats: int = 5) -> float:
    """Seconds for one block of `rows` tokens through all layers' matmuls in `dtype`."""
    total = 0.0
    for in_features, out_features in SHAPES.values():
        inputs = torch.randn(rows, in_features, dtype=dtype)
        weight = torch.randn(out_features, in_features, dtype=dtype)
        F.linear(inputs, weight)  # warm-up: oneDNN picks and caches its kernel on the first call
        start = time.perf_counter()
        for _ in range(repeats):
            F.linear(inputs, weight)
        total += (time.perf_counter() - start) / repeats
    return LAYERS * total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from qwen2cli.quant.linear import long_input_dtype

    seconds: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    for _ in range(args.rounds):
        for dtype, runs in seconds.items():
            runs.append(matmul_seconds(args.rows, dtype))
    float32, bfloat16 = (statistics.median(runs) for runs in seconds.values())
    print(
        f"{args.rows} rows, {args.threads} threads: float32 {args.rows / float32:.0f} tok/s, "
        f"bfloat16 {args.rows / bfloat16:.0f} tok/s, bfloat16/float32 speed {float32 / bfloat16:.2f}; "
        f"long_input_dtype() picks {str(long_input_dtype()).removeprefix('torch.')} here"
    )


if __name__ == "__main__":
    main()
