"""Store and REPL timings on the real model: GGUF import, hub download against curl, `run` cold start, chat TTFT.

  python benchmarks/store_and_chat.py [--skip-import] [--skip-download] [--skip-run] [--skip-chat]
                                      [--model import|download] [--turns 10] [--max-tokens 16] [--tmp DIR]

1. import: wall time of `qwen2 import <real GGUF> --name bench-import` into a fresh QWEN2_HOME.
2. download: the float32 Hugging Face copy of the real model (model.safetensors ~2.5 GB) served as `bench/qwen-real`
   by devtools/hub_server.py on 127.0.0.1; wall time of `qwen2 download bench/qwen-real` (HF_ENDPOINT at the server,
   fresh QWEN2_HOME; the CLI also checks each file's sha256) against `curl -s -o /dev/null` of model.safetensors.
   MB/s are 10^6 bytes per second of wall time. The test server hashes every file on each listing request, so
   the listing's own wall time (curl of /api/models/...) is shown apart: it is inside the download's time.
3. run: `qwen2 run MODEL --temperature 0 --max-tokens 1 "Hi"` in a new process, once to write its caches, then 5
   times: time from spawn to the first byte of the answer on stdout (the first token) and to exit; then --json,
   whose usage.ttft_s is the time to first token inside the process. "Cold" means a new process; the weights were just
   written, so they are in the page cache.
4. chat: `qwen2 chat MODEL --max-tokens 16` in a pseudo-terminal (pexpect): time from spawn to the first `>>> `
   prompt, then `/set temperature 0` and a conversation of --turns turns; the TTFT of each turn is read from the
   REPL's stats line ("... TTFT x.xx s ...", two decimals).

MODEL (steps 3 and 4) is the store model from step 1 (`bench-import`), or from step 2 (`bench/qwen-real`) with
--model download or when the import is skipped, or the Hugging Face directory itself when both are skipped.
Prints a table and, last, one JSON line. Temporary stores are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMPORT_NAME = "bench-import"
HUB_REPO = "bench/qwen-real"
PROMPT = ">>> "
STATS = re.compile(r"(\d+) prompt tokens \((\d+) new\)[^\n]*?TTFT ([\d.]+) s[^\n]*?([\d.]+) tok/s")
QUESTIONS = [
    "Hi! Who are you?",
    "What is the capital of France?",
    "Write a Python function that adds two numbers.",
    "What does HTTP stand for?",
    "Name three sorting algorithms.",
    "What is a linked list?",
    "How do I reverse a string in Python?",
    "What is the difference between a list and a tuple?",
    "Explain recursion in one sentence.",
    "Thanks, goodbye!",
]


def qwen2_env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "QWEN2_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT), **extra}
    env.pop("HF_HUB_OFFLINE", None)
    return env


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed, done


def qwen2(*args: str) -> list[str]:
    return [sys.executable, "-m", "qwen2cli", *args]


def measure_import(gguf: Path, home: Path) -> dict:
    seconds, done = timed(qwen2("import", str(gguf), "--name", IMPORT_NAME), qwen2_env(home))
    if not (Path(done.stdout.strip()) / "config.json").exists():
        raise SystemExit(f"import printed {done.stdout.strip()!r}, which holds no config.json")
    return {"import_s": seconds, "gguf_mb": gguf.stat().st_size / 1e6}


def measure_download(hf_dir: Path, home: Path) -> dict:
    from devtools.hub_server import HubServer, HubState
    from qwen2cli.hub import wanted

    state = HubState()
    state.add_directory(HUB_REPO, hf_dir)
    files = state.repos[HUB_REPO]
    total = sum(len(data) for name, data in files.items() if wanted(name))
    weights = len(files["model.safetensors"])
    with HubServer(state) as server:
        listing_s, _ = timed(["curl", "-sf", "-o", "/dev/null", f"{server.url}/api/models/{HUB_REPO}/revision/main"])
        curl_s, _ = timed(["curl", "-sf", "-o", "/dev/null", f"{server.url}/{HUB_REPO}/resolve/main/model.safetensors"])
        download_s, done = timed(qwen2("download", HUB_REPO), qwen2_env(home, HF_ENDPOINT=server.url))
    path = Path(done.stdout.strip())
    if (path / "model.safetensors").stat().st_size != weights:
        raise SystemExit(f"download installed a model.safetensors of the wrong size at {path}")
    del state, files
    return {
        "download_s": download_s,
        "download_mb": total / 1e6,
        "download_mb_s": total / 1e6 / download_s,
        "listing_s": listing_s,
        "curl_s": curl_s,
        "curl_mb": weights / 1e6,
        "curl_mb_s": weights / 1e6 / curl_s,
        "download_vs_curl": (total / download_s) / (weights / curl_s),
    }


def first_output(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds from spawning `command` to the first byte on its stdout, and to its exit."""
    began = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, stdin=subprocess.DEVNULL
    )
    assert process.stdout is not None and process.stderr is not None  # both PIPE
    first = process.stdout.read(1)
    first_s = time.perf_counter() - began
    process.stdout.read()
    error = process.stderr.read()
    process.wait()
    if process.returncode != 0 or not first:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{error.decode()[-2000:]}")
    return first_s, time.perf_counter() - began


def measure_run(model: str, home: Path, repeats: int = 5) -> dict:
    env = qwen2_env(home)
    command = qwen2("run", model, "--temperature", "0", "--max-tokens", "1", "Hi")
    timed(command, env)  # the first run writes the prompt and tokenizer caches
    runs = [first_output(command, env) for _ in range(repeats)]
    json_s, done = timed(qwen2("run", model, "--temperature", "0", "--max-tokens", "1", "--json", "Hi"), env)
    usage = json.loads(done.stdout)["usage"]
    firsts, exits = sorted(first for first, _ in runs), sorted(end for _, end in runs)
    return {
        "run_first_token_s": firsts[len(firsts) // 2],
        "run_first_token_max_s": firsts[-1],
        "run_s": exits[len(exits) // 2],
        "run_json_s": json_s,
        "run_ttft_s": usage["ttft_s"],
    }


def measure_chat(model: str, home: Path, turns: int, max_tokens: int) -> dict:
    import pexpect

    env = qwen2_env(home, TERM="dumb", NO_COLOR="1")
    began = time.perf_counter()
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwen2cli", "chat", model, "--max-tokens", str(max_tokens)],
        env=env,
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=300,
        dimensions=(50, 200),
    )
    try:
        child.expect_exact(PROMPT)
        startup_s = time.perf_counter() - began
        child.sendline("/set temperature 0")
        child.expect_exact(PROMPT)
        rows = []
        for turn in range(turns):
            child.sendline(QUESTIONS[turn % len(QUESTIONS)])
            child.expect(STATS)
            prompt_tokens, new_tokens, ttft, tok_s = child.match.groups()
            rows.append(
                {
                    "prompt_tokens": int(prompt_tokens),
                    "new_tokens": int(new_tokens),
                    "ttft_s": float(ttft),
                    "decode_tok_s": float(tok_s),
                }
            )
            child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return {
        "chat_startup_s": startup_s,
        "chat_ttft_first_s": rows[0]["ttft_s"],
        "chat_ttft_last_s": rows[-1]["ttft_s"],
        "chat_turns": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-import", action="store_true")
    parser.add_argument("--skip-download", action="store_true")
    parser.add_argument("--skip-run", action="store_true")
    parser.add_argument("--skip-chat", action="store_true")
    parser.add_argument(
        "--model",
        choices=("import", "download"),
        default="import",
        help="which store model steps 3 and 4 use (falls back to the other, then the HF directory)",
    )
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--tmp", help="parent directory of the temporary stores (default: the system's)")
    args = parser.parse_args()
    from devtools.real_model import real_gguf, real_hf_dir

    results: dict = {}
    work = Path(tempfile.mkdtemp(prefix="qwen2-store-bench-", dir=args.tmp))
    try:
        homes = {"import": work / "home-import", "download": work / "home-download"}
        models = {}
        if not args.skip_import:
            results.update(measure_import(real_gguf(), homes["import"]))
            models["import"] = IMPORT_NAME
        if not args.skip_download:
            results.update(measure_download(real_hf_dir(), homes["download"]))
            models["download"] = HUB_REPO
        order = [args.model, *(k for k in ("import", "download") if k != args.model)]
        chosen = next((k for k in order if k in models), None)
        model, home = (models[chosen], homes[chosen]) if chosen else (str(real_hf_dir()), work / "home-dir")
        results["model"] = model
        if not args.skip_run:
            results.update(measure_run(model, home))
        if not args.skip_chat:
            results.update(measure_chat(model, home, args.turns, args.max_tokens))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"model for run/chat: {results['model']}")
    rows = []
    if "import_s" in results:
        rows.append(("import GGUF", f"{results['import_s']:.2f} s", f"{results['gguf_mb']:.0f} MB file"))
    if "download_s" in results:
        rows += [
            (
                "qwen2 download",
                f"{results['download_s']:.2f} s",
                f"{results['download_mb']:.0f} MB, {results['download_mb_s']:.0f} MB/s (incl. listing, sha256)",
            ),
            ("  of it: listing", f"{results['listing_s']:.2f} s", "test server hashes files per listing"),
            (
                "curl model.safetensors",
                f"{results['curl_s']:.2f} s",
                f"{results['curl_mb']:.0f} MB, {results['curl_mb_s']:.0f} MB/s",
            ),
            ("download / curl", f"{results['download_vs_curl']:.2f}x", "MB/s ratio"),
        ]
    if "run_s" in results:
        rows += [
            (
                "run, first token",
                f"{results['run_first_token_s']:.2f} s",
                f"new process, spawn to first byte on stdout (median of 5, max {results['run_first_token_max_s']:.2f})",
            ),
            ("run, 1 token", f"{results['run_s']:.2f} s", "new process, wall (median of 5)"),
            ("run --json, 1 token", f"{results['run_json_s']:.2f} s", f"TTFT {results['run_ttft_s']:.3f} s"),
        ]
    if "chat_startup_s" in results:
        turns = results["chat_turns"]
        rows += [
            ("chat start-up", f"{results['chat_startup_s']:.2f} s", "spawn to first prompt"),
            (
                "chat TTFT turn 1",
                f"{turns[0]['ttft_s']:.2f} s",
                f"{turns[0]['prompt_tokens']} prompt tokens ({turns[0]['new_tokens']} new)",
            ),
            (
                f"chat TTFT turn {len(turns)}",
                f"{turns[-1]['ttft_s']:.2f} s",
                f"{turns[-1]['prompt_tokens']} prompt tokens ({turns[-1]['new_tokens']} new)",
            ),
        ]
    for name, value, note in rows:
        print(f"{name:24}{value:>10}  {note}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
