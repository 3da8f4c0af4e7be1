"""Quantized speed against llama.cpp on the same weights, threads and prompt, in one run.

  python benchmarks/vs_llamacpp.py [-p 512] [-n 128] [--repeats 3] [--threads 2]

The first run builds llama-cpp-python from PyPI into its own virtual environment (~10 minutes; it compiles) under
~/.cache/qwen2cli-dev/llamacpp-venv. llama.cpp keeps its CPU weight repacking; its AMX buffers crash with a
-march=native build on these CPUs, so the build names the AVX-512 features and leaves AMX off.

llama.cpp runs the real model's GGUF (Q4_K_M) and requantizations of it (Q4_0, Q8_0, with --allow-requantize).
qwen2cli runs the same GGUF as `qwen2 download` installs it (its import: the file's Q5_0/Q8_0/Q4_K/Q6_K blocks kept,
docs/gguf-layout.md), and round-to-nearest int4 (group 128) and int8 (per channel) checkpoints of the same model,
made from the float copy of that GGUF with `qwen2 quantize --method rtn` (speed does not depend on how the codes
were chosen). `--systems` picks some of them by name (comma-separated, e.g. "llama.cpp Q4_K_M,qwen2cli GGUF").
Each measurement is a process of its own (so peak RSS is its own: one load, one prompt and answer); the systems
take turns, round after round, and each number is the median over the rounds. Prints tok/s, peak RSS and the
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path.home() / ".cache" / "qwen2cli-dev" / "llamacpp-venv"
LLAMA_CPP_VERSION = "0.3.36"


def cmake_args() -> str:
    """The build's instruction sets from this CPU's flags (an AVX-512 build dies with SIGILL on an AVX2-only
    machine, such as some of the AMD EPYC hosts this runs on); AMX stays off, weight repacking on."""
    try:
        flags = set(
            next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
            .split(":", 1)[1]
            .split()
        )
    except (OSError, StopIteration):
        flags = set()
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    if "avx512f" in flags:
        args.append("-DGGML_AVX512=ON")
        args += [
            f"-DGGML_AVX512_{name}=ON"
            for name, flag in (("VNNI", "avx512_vnni"), ("BF16", "avx512_bf16"))
            if flag in flags
        ]
    args += [
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
        "-DGGML_CPU_REPACK=ON",
        "-DGGML_OPENMP=ON",
    ]
    return " ".join(args)


sys.path.insert(0, str(ROOT))


def ensure_llamacpp() -> Path:
    python = VENV / "bin" / "python"
    marker = VENV / "cmake-args.txt"  # a venv built for another CPU's instruction sets is rebuilt
    build_args = cmake_args()
    if (
        python.exists()
        and marker.exists()
        and marker.read_text() == build_args
        and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    ):
        return python
    print(f"building llama-cpp-python {LLAMA_CPP_VERSION} into {VENV} (about 10 minutes)...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = {**os.environ, "CMAKE_ARGS": build_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--force-reinstall",
            "--no-cache-dir",
            f"llama-cpp-python=={LLAMA_CPP_VERSION}",
        ],
        env=env,
        check=True,
    )
    marker.write_text(build_args)
    return python


def measure_llamacpp(gguf: str, prompt_tokens: int, new_tokens: int, repeats: int, threads: int) -> dict:
    """Runs inside the llama.cpp venv: same filler prompt as `qwen2 bench`, greedy, timings from wall clock."""
    import llama_cpp

    started = time.perf_counter()
    # n_batch covers the whole context: llama-cpp-python keeps last-token logits in an (n_batch, vocab) array
    # indexed by position, so a smaller n_batch overflows once decoding passes it
    n_ctx = prompt_tokens + new_tokens + 8
    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_ctx, verbose=False
    )
    load_s = time.perf_counter() - started
    filler = "The quick brown fox jumps over the lazy dog while the river keeps flowing past the old mill. "
    ids = llm.tokenize((filler * (prompt_tokens // 16 + 2)).encode(), add_bos=False)[:prompt_tokens]

    def run(count: int) -> tuple[float, float]:
        """Seconds of prefill and of decoding `count` - 1 more tokens."""
        llm.reset()  # n_tokens = 0: the next eval overwrites the KV cache from position 0
        began = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - began
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        decode_began = time.perf_counter()
        for _ in range(count - 1):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        return prefill, time.perf_counter() - decode_began

    run(4)
    runs = [run(new_tokens) for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {
        "prefill_tok_s": prompt_tokens / prefill,
        "decode_tok_s": (new_tokens - 1) / decode,
        "load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def requantize(python: Path, source: Path, target: Path, ftype: str) -> Path:
    if target.exists():
        return target
    code = (
        "import llama_cpp, sys\n"
        "params = llama_cpp.llama_model_quantize_default_params()\n"
        f"params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{ftype}\n"
        "params.allow_requantize = True\n"
        "params.nthread = 2\n"
        "assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params) == 0\n"
    )
    partial = target.with_name(target.name + ".partial")
    subprocess.run([python, "-c", code, str(source), str(partial)], check=True, capture_output=True)
    partial.replace(target)
    return target


def measure_ours(model_dir: str, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    from qwen2cli.bench import as_dict, run_bench
    from qwen2cli.load_options import LoadOptions

    runs = [
        as_dict(
            run_bench(Path(model_dir), LoadOptions(device="cpu"), prompt_tokens=prompt_tokens, new_tokens=new_tokens)
        )
        for _ in range(repeats)
    ]
    return {
        key: statistics.median(run[key] for run in runs)
        for key in ("prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_mb")
    }


def our_checkpoint(hf_dir: Path, work: Path, bits: int) -> Path:
    out = work / f"qwen2cli-rtn-int{bits}"
    if not (out / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "qwen2cli",
                "quantize",
                str(hf_dir),
                "--method",
                "rtn",
                "--bits",
                str(bits),
                "--out",
                str(out),
            ],
            check=True,
            capture_output=True,
        )
    return out


def our_gguf_import(gguf: Path, work: Path) -> Path:
    """The GGUF as `qwen2 download` installs it, imported in a process of its own (the children this one starts
    inherit its peak RSS, which an import here would have raised)."""
    out = work / "qwen2cli-gguf-import"
    if not (out / "config.json").exists():
        code = "import sys; from qwen2cli.gguf_import import import_gguf; import_gguf(sys.argv[1], sys.argv[2])"
        subprocess.run([sys.executable, "-c", code, str(gguf), str(out)], check=True, capture_output=True, cwd=ROOT)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", type=int, default=512)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", help="comma-separated names of the systems to run (default: all)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "llamacpp":
        print(json.dumps(measure_llamacpp(args.target, args.p, args.n, args.repeats, args.threads)))
        return
    if args.side == "ours":
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure_ours(args.target, args.p, args.n, args.repeats)))
        return
    from devtools.real_model import real_gguf, real_hf_dir

    python = ensure_llamacpp()
    gguf = real_gguf()
    work = VENV.parent / "vs-llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    makers = {
        "llama.cpp Q4_K_M": lambda: ("llamacpp", gguf),
        "qwen2cli GGUF": lambda: ("ours", our_gguf_import(gguf, work)),
        "llama.cpp Q4_0": lambda: ("llamacpp", requantize(python, gguf, work / "q4_0.gguf", "Q4_0")),
        "llama.cpp Q8_0": lambda: ("llamacpp", requantize(python, gguf, work / "q8_0.gguf", "Q8_0")),
        "qwen2cli int4 g128": lambda: ("ours", our_checkpoint(real_hf_dir(), work, 4)),
        "qwen2cli int8": lambda: ("ours", our_checkpoint(real_hf_dir(), work, 8)),
    }
    chosen = args.systems.split(",") if args.systems else list(makers)
    unknown = [name for name in chosen if name not in makers]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}: choose from {list(makers)}")
    systems = {name: makers[name]() for name in chosen}
    # rounds: every system once per round, each in a fresh process; medians over the rounds. Speeds on this
    # shared 2-core host drift by 20% within minutes: all repeats of one system, then all of the next, put that
    # drift into the ratios
    rounds: dict[str, list[dict]] = {name: [] for name in systems}
    for _ in range(args.repeats):
        for name, (side, target) in systems.items():
            runner = str(python) if side == "llamacpp" else sys.executable
            done = subprocess.run(
                [
                    runner,
                    __file__,
                    "--side",
                    side,
                    "--target",
                    str(target),
                    "-p",
                    str(args.p),
                    "-n",
                    str(args.n),
                    "--repeats",
                    "1",
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            )
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
            rounds[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in rounds.items()
    }
    print(
        f"prompt {args.p}, new {args.n}, {args.threads} threads, median of {args.repeats} rounds "
        "(each system once a round, in its own process)"
    )
    print(f"{'':22}{'prefill tok/s':>14}{'decode tok/s':>14}{'load s':>8}{'peak RSS MiB':>14}  decode range")
    for name, r in results.items():
        low, high = (f(run["decode_tok_s"] for run in rounds[name]) for f in (min, max))
        print(
            f"{name:22}{r['prefill_tok_s']:14.1f}{r['decode_tok_s']:14.1f}{r['load_s']:8.2f}{r['peak_rss_mb']:14.0f}"
            f"  {low:.1f}-{high:.1f}"
        )
    pairs = [  # (ours, theirs, what) where both ran
        ("qwen2cli GGUF", "llama.cpp Q4_K_M", "decode_tok_s"),
        ("qwen2cli GGUF", "llama.cpp Q4_K_M", "prefill_tok_s"),
        ("qwen2cli GGUF", "llama.cpp Q4_K_M", "peak_rss_mb"),
        ("qwen2cli int4 g128", "llama.cpp Q4_0", "decode_tok_s"),
        ("qwen2cli int4 g128", "llama.cpp Q4_K_M", "prefill_tok_s"),
        ("qwen2cli int4 g128", "llama.cpp Q4_K_M", "peak_rss_mb"),
        ("qwen2cli int8", "llama.cpp Q8_0", "decode_tok_s"),
    ]
    ratios = {
        f"{ours} / {theirs} {what.split('_')[0]}": results[ours][what] / results[theirs][what]
        for ours, theirs, what in pairs
        if ours in results and theirs in results
    }
    for name, value in ratios.items():
        print(f"{name:34}{value:6.2f}x")
    print(json.dumps({"results": results, "ratios": ratios, "rounds": rounds}))


if __name__ == "__main__":
    main()
