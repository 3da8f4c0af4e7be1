"""The decode step of several sequences at once (what `qwen2 serve` runs for its active requests), with the native
kernels' codes of 8 rows interleaved and without, in one run.

  python benchmarks/decode_rows.py [MODEL] [--rows 1 2 4 8] [--rounds 3] [--position 300] [--threads 2]

MODEL: a name `qwen2 run` takes (default: the default model). Each round runs both layouts, each in a process of its
own (QWEN2_NATIVE_INTERLEAVE=0 turns interleaving off), alternating which goes first; a process loads the model
once and times qwen2cli.serve.batch_decode.decode_step at every row count (median of 30 steps, each sequence's
cache at --position). Prints the medians over the rounds in ms per step, tokens/s, and each row count's aggregate
tokens/s over the single sequence's: the most a server's aggregate decode can gain from that many clients.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

LAYOUTS = {"interleaved": "1", "row-major": "0"}


def measure(model: str, rows: list[int], position: int) -> dict[int, float]:
    """ms per decode step at each row count, in this process."""
    import time

    import torch

    from qwen2cli.generate import load_engine
    from qwen2cli.kv_cache import KVCache
    from qwen2cli.registry import resolve_model
    from qwen2cli.serve.batch_decode import decode_step

    engine = load_engine(resolve_model(model))
    model_ = engine.loaded.model
    result = {}
    for count in rows:
        caches = [KVCache(model_.config, position + 64) for _ in range(count)]
        times = []
        with torch.inference_mode():
            for step in range(32):
                for cache in caches:
                    cache.pos = position
                started = time.perf_counter()
                decode_step(model_, [100 + i for i in range(count)], caches, rows=count)
                if step >= 2:  # the first steps warm the caches
                    times.append(time.perf_counter() - started)
        result[count] = 1000 * statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--position", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.model, args.rows, args.position)))
        return
    runs: dict[str, list[dict[int, float]]] = {name: [] for name in LAYOUTS}
    for round_ in range(args.rounds):
        order = list(LAYOUTS) if round_ % 2 == 0 else list(reversed(LAYOUTS))
        for name in order:
            env = {**os.environ, "QWEN2_NATIVE_INTERLEAVE": LAYOUTS[name], "OMP_NUM_THREADS": str(args.threads)}
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rows", *map(str, args.rows)]
            command += ["--position", str(args.position), *([args.model] if args.model else [])]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed: {done.stderr[-2000:]}")
            runs[name].append({int(k): v for k, v in json.loads(done.stdout.splitlines()[-1]).items()})
    print(f"{'layout':<12} {'rows':>4} {'ms/step':>8} {'tok/s':>7} {'x one row':>9}")
    for name, rounds in runs.items():
        single = statistics.median(r[args.rows[0]] for r in rounds) if args.rows[0] == 1 else None
        for count in args.rows:
            ms = statistics.median(r[count] for r in rounds)
            gain = f"{count * single / ms:9.2f}" if single else ""
            print(f"{name:<12} {count:>4} {ms:8.2f} {1000 * count / ms:7.1f} {gain}")


if __name__ == "__main__":
    main()
