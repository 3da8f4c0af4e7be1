"""Our prefill/decode speed and peak RSS against transformers' `generate` on the real model, in one run.

  python benchmarks/vs_transformers.py [--dtype float32|bfloat16|float16] [-p 512] [-n 128] [--repeats 3]
                                      [--device cpu|cuda] [--model DIR]

Each measurement runs in its own subprocess (so peak RSS is its own), the sides alternating, same threads, same
512-token prompt; prints tok/s for both and the ratios ours / transformers. transformers uses its default dynamic
cache.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure_transformers(
    model_dir: str, dtype: str, prompt_tokens: int, new_tokens: int, repeats: int, device: str
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from qwen2cli.bench import FILLER
    from qwen2cli.tokenizer import Qwen2Tokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to): type checkers see `self` unbound
    model = model.to(device).eval()  # type: ignore[arg-type]
    if device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    ids = Qwen2Tokenizer.from_dir(Path(model_dir)).encode(FILLER * (prompt_tokens // 20 + 1))[:prompt_tokens]
    input_ids = torch.tensor([ids], device=device)

    def timed(count: int) -> float:
        began = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    timed(2)
    prefill = [timed(1) for _ in range(repeats)]
    full = [timed(new_tokens) for _ in range(repeats)]
    ttft = statistics.median(prefill)
    return {
        "prefill_tok_s": prompt_tokens / ttft,
        "decode_tok_s": (new_tokens - 1) / (statistics.median(full) - ttft),
        "ttft_s": ttft,
        "load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0,
    }


def measure_ours(model_dir: str, dtype: str, prompt_tokens: int, new_tokens: int, repeats: int, device: str) -> dict:
    from qwen2cli.bench import as_dict, run_bench
    from qwen2cli.load_options import LoadOptions

    runs = [
        as_dict(
            run_bench(
                Path(model_dir),
                LoadOptions(device=device, dtype=dtype),
                prompt_tokens=prompt_tokens,
                new_tokens=new_tokens,
            )
        )
        for _ in range(repeats)
    ]
    return {
        key: statistics.median(run[key] or 0.0 for run in runs)
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mb", "peak_gpu_mb")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("-p", type=int, default=512)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="HF-format model directory (default: the real model)")
    parser.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from devtools.real_model import real_hf_dir

        args.model = str(real_hf_dir())
    if args.side:
        measure = measure_ours if args.side == "ours" else measure_transformers
        print(json.dumps(measure(args.model, args.dtype, args.p, args.n, args.repeats, args.device)))
        return
    # the sides take turns, one process per measurement, so that a shared or throttled CPU's drift during the run
    # falls on both alike (run one after the other, the first side measured 14% faster prefill than in this order)
    runs: dict[str, list[dict]] = {"transformers": [], "ours": []}
    for _ in range(args.repeats):
        for side in runs:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--model",
                    args.model,
                    "--dtype",
                    args.dtype,
                    "--device",
                    args.device,
                    "-p",
                    str(args.p),
                    "-n",
                    str(args.n),
                    "--repeats",
                    "1",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {
        side: {key: statistics.median(run[key] for run in measured) for key in measured[0]}
        for side, measured in runs.items()
    }
    print(
        f"{args.device}, dtype {args.dtype}, prompt {args.p}, new {args.n}, median of {args.repeats} alternating runs"
    )
    print(f"{'':14}{'transformers':>14}{'qwen2cli':>12}{'ratio':>8}")
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mb", "peak_gpu_mb"):
        ref, ours = results["transformers"][key], results["ours"][key]
        if ref:
            print(f"{key:14}{ref:14.2f}{ours:12.2f}{ours / ref:8.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
