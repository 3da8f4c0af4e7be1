"""Quantization quality table on the real model: perplexity, size on disk and quantization wall time.

  python benchmarks/quality.py [--configs rtn4-g128,gptq4-g128,awq4-g128,...] [--samples 128] [--seq-len 512]
                               [--calib FILE] [--text-chars 40000] [--work DIR]

Each configuration is `METHOD BITS - g GROUP` (rtn4-g128, gptq4-g32, awq4-g128, gptq8, rtn8; GPTQ with the
command's defaults: act-order with static groups, `--shrink auto`) and is made with `qwen2 quantize` from the
float32 copy of the real model, in a subprocess, so its wall time is the command's. Perplexity is
`qwen2cli.perplexity` on the documentation text the tests assemble (devtools.corpus.documentation_text, the
licence texts under /usr/share/common-licenses), windows of 512 tokens, float32 activations. "recovery" is how
much of RTN int4's loss (same group size) a method wins back: (ppl_rtn - ppl_method) / (ppl_rtn - ppl_fp), 1.0
being all of it. Checkpoints are kept under --work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qwen2cli.load_options import LoadOptions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = "rtn4-g128,gptq4-g128,awq4-g128,rtn4-g32,gptq4-g32,awq4-g32,gptq8"


def parse(config: str) -> tuple[str, int, int]:
    method, _, group = config.partition("-g")
    return method[:-1], int(method[-1]), int(group) if group else -1


def quantize(source: Path, out: Path, config: str, args: argparse.Namespace) -> float:
    method, bits, group = parse(config)
    command = [
        sys.executable,
        "-m",
        "qwen2cli",
        "quantize",
        str(source),
        "--method",
        method,
        "--bits",
        str(bits),
        "--group-size",
        str(group),
        "--out",
        str(out),
    ]
    if bits == 4:
        command.append("--asym")
    if method in ("gptq", "awq"):
        command += ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        if args.calib:
            command += ["--calib", args.calib]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"{config}: {done.stderr.strip()[-1000:]}")
    return time.perf_counter() - began


def size_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib", help="calibration file (default: the calibration text shipped with qwen2cli)")
    parser.add_argument("--text-chars", type=int, default=40_000)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qwen2cli-dev" / "quality")
    args = parser.parse_args()

    import torch

    from devtools.corpus import documentation_text
    from devtools.real_model import real_hf_dir
    from qwen2cli.generate import load_engine
    from qwen2cli.perplexity import perplexity

    torch.set_num_threads(2)
    source = real_hf_dir()
    text = documentation_text(args.text_chars)
    rows: dict[str, dict[str, Any]] = {"float32": {"dir": source, "quantize_s": 0.0}}
    for config in args.configs.split(","):
        out = args.work / f"{config}-{args.samples}x{args.seq_len}"
        rows[config] = {"dir": out, "quantize_s": quantize(source, out, config, args)}
    for row in rows.values():
        result = perplexity(load_engine(row["dir"], LoadOptions(device="cpu", dtype="float32")), text, ctx=512)
        row.update(ppl=result.ppl, tokens=result.tokens, size_mb=size_on_disk(row["dir"]) / 1e6)
    fp = rows["float32"]["ppl"]
    for name, row in rows.items():
        if name == "float32":
            continue
        method, bits, group = parse(name)
        baseline = rows.get(f"rtn{bits}-g{group}" if group != -1 else f"rtn{bits}")
        if baseline is not None and baseline["ppl"] > fp and method != "rtn":
            row["recovery"] = (baseline["ppl"] - row["ppl"]) / (baseline["ppl"] - fp)
    print(
        f"calibration: {args.calib or 'default'}, {args.samples} x {args.seq_len} tokens; "
        f"text: {rows['float32']['tokens']} tokens"
    )
    print(f"{'':14}{'ppl':>9}{'x fp':>8}{'recovery':>10}{'size MB':>10}{'quantize s':>12}")
    for name, row in rows.items():
        recovery = f"{row['recovery']:.2f}" if "recovery" in row else ""
        print(
            f"{name:14}{row['ppl']:9.3f}{row['ppl'] / fp:8.3f}{recovery:>10}{row['size_mb']:10.0f}"
            f"{row['quantize_s']:12.0f}"
        )
    print(
        json.dumps(
            {name: {k: (str(v) if isinstance(v, Path) else v) for k, v in row.items()} for name, row in rows.items()}
        )
    )


if __name__ == "__main__":
    main()
