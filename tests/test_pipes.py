"""Shell pipes: only answer text on stdout, one answer per stdin line in chat, a closed pipe ends quietly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen2cli.generate import generate, load_engine
from qwen2cli.load_options import LoadOptions
from qwen2cli.sampling import SamplingParams

QWEN2 = [sys.executable, "-m", "qwen2cli"]


def run(args: list[str], stdin: str = "", *, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(QWEN2 + args, input=stdin, capture_output=True, text=True, timeout=timeout)


def expected_raw(model_dir, prompt: str, max_tokens: int) -> str:
    engine = load_engine(model_dir, LoadOptions(device="cpu", dtype="auto"))
    params = SamplingParams(
        temperature=0, max_tokens=max_tokens, repeat_penalty=engine.config.generation.repetition_penalty
    )
    ids = engine.tokenizer.encode(prompt)
    return "".join(
        c.text for c in generate(engine, ids, params=params, cache=engine.new_cache(len(ids) + max_tokens + 1))
    )


def test_run_prints_only_model_text(tiny_model):
    done = run(["run", str(tiny_model), "--raw", "--temperature", "0", "--max-tokens", "4"], "2+2=\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_raw(tiny_model, "2+2=", 4)
    assert "\x1b" not in done.stdout


def test_run_json(tiny_model):
    done = run(["run", str(tiny_model), "hello", "--json", "--temperature", "0", "--max-tokens", "5"])
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"text", "finish_reason", "usage"}
    assert set(data["usage"]) == {"prompt_tokens", "completion_tokens", "ttft_s", "decode_tok_s"}
    assert data["finish_reason"] in ("stop", "length") and data["usage"]["completion_tokens"] <= 5


def test_prompt_and_piped_stdin_are_joined(tiny_model):
    joined = run(
        ["run", str(tiny_model), "summarize:", "--raw", "--temperature", "0", "--max-tokens", "3", "--json"],
        "some text\n",
    )
    direct = run(
        ["run", str(tiny_model), "summarize:\nsome text", "--raw", "--temperature", "0", "--max-tokens", "3", "--json"]
    )
    assert json.loads(joined.stdout)["usage"]["prompt_tokens"] == json.loads(direct.stdout)["usage"]["prompt_tokens"]
    assert json.loads(joined.stdout)["text"] == json.loads(direct.stdout)["text"]


def test_closed_pipe_exits_quietly(tiny_model):
    pipeline = (
        f"{sys.executable} -m qwen2cli run {tiny_model} --raw --temperature 0.9 --max-tokens 200 hello | head -c 20"
    )
    done = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"" and len(done.stdout) == 20


def test_chat_answers_each_stdin_line(tiny_model):
    done = run(
        ["chat", str(tiny_model), "--temperature", "0", "--max-tokens", "3"], "one\n/set max_tokens 2\ntwo\nthree\n"
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert done.stderr.count("prompt tokens") == 3  # one stats line per answer, on stderr
    assert "max_tokens = 2" in done.stderr


def test_chat_context_overflow_keeps_going(tiny_model):
    lines = "".join(f"message {i} has a handful of words in it\n" for i in range(10))
    done = run(["chat", str(tiny_model), "--ctx", "256", "--temperature", "0", "--max-tokens", "24"], lines)
    assert done.returncode == 0, done.stderr
    assert "dropped the" in done.stderr
    assert done.stderr.count("prompt tokens") == 10


@pytest.mark.real
def test_real_three_questions_three_answers(real_model_dir):
    questions = [
        "What is 2+2? Reply with the number only.",
        "What is the capital of Italy? One word.",
        "What color is the sky on a clear day? One word.",
    ]
    done = run(["chat", str(real_model_dir), "--temperature", "0", "--max-tokens", "16"], "\n".join(questions) + "\n")
    assert done.returncode == 0, done.stderr
    answers = done.stdout.strip().split("\n")
    assert len(answers) == 3, done.stdout
    assert "4" in answers[0] and "Rome" in answers[1] and "blue" in answers[2].lower()
