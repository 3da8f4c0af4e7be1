"""`qwen2 serve` under load against llama.cpp's server (llama-cpp-python[server]), same GGUF and threads, one run.

  python benchmarks/serve_load.py [--gguf FILE] [--ours MODEL] [--clients 1 4 8] [-p 256] [-n 128] [--threads 2]

Both servers run side by side; for each client count the systems take turns (rounds alternate which goes first).
Each client streams one chat completion (a distinct prompt of about -p tokens, -n new tokens, greedy). Reported:
time to first token p50/p95, tokens/s over the batch's wall time (prefills included), aggregate decode tokens/s
(the tokens that arrive once every client has its first token, over the span from then to the last token: the
clients decoding side by side, no prompt being read; a server that answers one at a time has only its last client
left by then), the tokens
received, and the server's peak RSS; then the time to first token of a second turn of a long conversation
against its first turn (the prefix cache at work). llama-cpp-python's server answers one request at a time (it has
no parallel slots; it runs with --interrupt_requests False, else a new request cuts the one streaming), so its
clients queue; ours answers up to --parallel at once. Tokens are counted as streamed chunks that carry text (both
servers send one per token, except where a character spans tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = Path.home() / ".cache" / "qwen2cli-dev" / "llamacpp-venv" / "bin" / "python"
GGUF = Path.home() / ".local/share/qwen2cli/cache/pypi/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SENTENCE = "The quick brown fox number {i} jumps over the lazy dog near the river bank. "  # about 17 tokens


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One server process and its base URL."""

    def __init__(self, name: str, command: list[str], port: int, threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would fill up and stall the server
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 900
        while True:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{name} exited: {self.log.read()[-2000:]}")
            try:
                models = httpx.get(f"{self.url}/v1/models", timeout=2).json()
                self.model = models["data"][0]["id"]
                return
            except (httpx.HTTPError, KeyError, ValueError):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not come up") from None
                time.sleep(1)

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def stream_once(
    client: httpx.AsyncClient, server: Server, messages: list[dict], max_tokens: int
) -> tuple[float, int, str, list[float]]:
    """(seconds to the first text chunk, text chunks, text, the clock at each chunk) of one streamed chat
    completion."""
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first, chunks, text, arrivals = None, 0, "", []
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise SystemExit(f"{server.name} failed: {event['error']}")
            choices = event.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                chunks += 1
                text += choices[0]["delta"]["content"]
                arrivals.append(time.perf_counter())
                if first is None:
                    first = arrivals[0] - started
    return (first if first is not None else float("nan")), chunks, text, arrivals


def prompt(index: int, tokens: int) -> list[dict]:
    """About `tokens` tokens of text, asked back word for word (a long answer: it runs to max_tokens)."""
    text = "".join(SENTENCE.format(i=index * 1000 + i) for i in range(max(1, tokens // 17)))
    return [{"role": "user", "content": f"Request {index}. Repeat this text word for word:\n{text}"}]


async def load(server: Server, clients: int, prompt_tokens: int, new_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=3600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(stream_once(client, server, prompt(i, prompt_tokens), new_tokens) for i in range(clients))
        )
        wall = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    # decoding side by side: from the moment every client has its first token (all prompts read) to the last token
    all_started = max(r[3][0] for r in results if r[3])
    decoded = sum(1 for r in results for at in r[3] if at > all_started)
    decode_span = max(r[3][-1] for r in results if r[3]) - all_started
    return {
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "tok_s": sum(r[1] for r in results) / wall,
        "decode_tok_s": decoded / decode_span if decode_span > 0 else float("nan"),
        "tokens": sum(r[1] for r in results),
    }


async def second_turn(server: Server, tokens: int) -> tuple[float, float]:
    """TTFT of a first turn of about `tokens` tokens, and of the second turn that resends it with the answer."""
    first = prompt(99, tokens)
    async with httpx.AsyncClient(timeout=3600) as client:
        first_ttft, _, reply, _ = await stream_once(client, server, first, 16)
        turn = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Shorter, please."}]
        second_ttft, _, _, _ = await stream_once(client, server, turn, 4)
    return first_ttft, second_ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=GGUF)
    parser.add_argument("--ours", default=None, help="the model qwen2 serves (default: the same GGUF)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("-p", "--prompt-tokens", type=int, default=256)
    parser.add_argument("-n", "--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--conversation-tokens", type=int, default=2048)
    args = parser.parse_args()
    slots = max(args.clients)
    ours_port, llama_port = free_port(), free_port()
    ours_cmd = [sys.executable, "-m", "qwen2cli", "serve", args.ours or str(args.gguf), "--port", str(ours_port),
                "--parallel", str(slots), "--ctx", "4096"]  # fmt: skip
    threads = ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    # its default interrupts a streaming answer when another request arrives: queue them instead
    llama_cmd = [str(VENV_PYTHON), "-m", "llama_cpp.server", "--model", str(args.gguf), "--n_ctx", "4096", *threads,
                 "--interrupt_requests", "False", "--port", str(llama_port)]  # fmt: skip
    servers = [
        Server("qwen2cli", ours_cmd, ours_port, args.threads),
        Server("llama.cpp", llama_cmd, llama_port, args.threads),
    ]
    try:
        table: dict[tuple[str, int], list[dict]] = {}
        for round_index in range(args.rounds):
            order = servers if round_index % 2 == 0 else servers[::-1]
            for clients in args.clients:
                for server in order:
                    result = asyncio.run(load(server, clients, args.prompt_tokens, args.new_tokens))
                    table.setdefault((server.name, clients), []).append(result)
        print(
            f"{'server':<10} {'clients':>7} {'ttft p50':>9} {'ttft p95':>9} {'tok/s':>8} {'decode/s':>9} {'tokens':>7}"
        )
        for (name, clients), results in table.items():
            med = {key: statistics.median(r[key] for r in results) for key in results[0]}
            print(
                f"{name:<10} {clients:>7} {med['ttft_p50']:>8.2f}s {med['ttft_p95']:>8.2f}s {med['tok_s']:>8.1f} "
                f"{med['decode_tok_s']:>9.1f} {med['tokens']:>7.0f}"
            )
        ours_single = statistics.median(r["decode_tok_s"] for r in table[("qwen2cli", min(args.clients))])
        print("aggregate decode tokens/s (once every client has its first token):")
        for clients in args.clients:
            ours = statistics.median(r["decode_tok_s"] for r in table[("qwen2cli", clients)])
            theirs = statistics.median(r["decode_tok_s"] for r in table[("llama.cpp", clients)])
            print(
                f"{clients} clients: ours {ours / ours_single:.2f}x our single stream, {ours / theirs:.2f}x llama.cpp"
            )
        for server in servers:
            first, second = asyncio.run(second_turn(server, args.conversation_tokens))
            print(
                f"{server.name}: 2K-token chat, TTFT turn 1 {first:.2f}s, turn 2 {second:.2f}s: {first / second:.1f}x"
            )
        for server in servers:
            print(f"{server.name}: peak RSS {server.peak_rss_mib():.0f} MiB")
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
