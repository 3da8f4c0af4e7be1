"""Bad input: each gives one line on stderr, exit code 1, and no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def qwen2(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen2cli", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert fragment.lower() in lines[0].lower(), lines[0]
    assert done.stdout == ""


@pytest.fixture()
def broken_copy(tiny_model, tmp_path):
    def copy() -> Path:
        target = tmp_path / "model"
        shutil.copytree(tiny_model, target)
        return target

    return copy


def test_missing_directory(tmp_path):
    assert_one_line_error(qwen2("run", str(tmp_path / "nope"), "hi"), "no such model")


def test_directory_without_config(tmp_path):
    assert_one_line_error(qwen2("run", str(tmp_path), "hi"), "config.json")


def test_other_architecture(broken_copy):
    model = broken_copy()
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    assert_one_line_error(qwen2("run", str(model), "hi"), "unsupported architecture 'llama'")


def test_truncated_safetensors(broken_copy):
    model = broken_copy()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(qwen2("run", str(model), "hi", "--max-tokens", "2"), "corrupt or truncated")


def test_garbage_safetensors(broken_copy):
    model = broken_copy()
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_one_line_error(qwen2("run", str(model), "hi", "--max-tokens", "2"), "corrupt or truncated")


def test_pickle_checkpoint_refused(broken_copy):
    model = broken_copy()
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    assert_one_line_error(qwen2("run", str(model), "hi"), "pickle")


def test_missing_tokenizer(broken_copy):
    model = broken_copy()
    (model / "tokenizer.json").unlink()
    assert_one_line_error(qwen2("run", str(model), "hi"), "tokenizer")


def test_prompt_longer_than_context(tiny_model):
    done = qwen2("run", str(tiny_model), "--raw", "--ctx", "16", "--max-tokens", "2", stdin="word " * 200)
    assert_one_line_error(done, "context holds")


@pytest.mark.parametrize(
    "option",
    [
        ("--dtype", "float8"),
        ("--device", "tpu"),
        ("--temperature", "-1"),
        ("--top-p", "0"),
        ("--max-tokens", "0"),
        ("--ctx", "zero"),
    ],
)
def test_unknown_option_values(tiny_model, option):
    done = qwen2("run", str(tiny_model), "hi", *option)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_unknown_option():
    assert_one_line_error(qwen2("run", "--bogus"), "no such option")


def test_no_arguments_prints_the_help_once():
    done = qwen2()
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Usage:") == 1, done.stdout
    assert "run" in done.stdout and done.stderr == ""
