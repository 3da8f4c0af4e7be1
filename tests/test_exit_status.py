"""Honest status: a failed turn makes the exit status non-zero, input that is not UTF-8 is said so (or refused), and
`qwen2 info` checks the weight files it describes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open


def qwen2(*args: str, stdin: bytes = b"", home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "QWEN2_HOME": str(home), "NO_COLOR": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-m", "qwen2cli", *args], input=stdin, capture_output=True, timeout=180, env=env
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
    )


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error: ")]


# -- piped chat ----------------------------------------------------------------------------------------------


def test_piped_chat_with_a_failing_turn_exits_non_zero_and_answers_the_rest(tiny_model, tmp_path):
    lines = b"hello\n" + b"word " * 400 + b"\nthanks\n"  # the middle line cannot fit a 256-token context
    done = qwen2("chat", str(tiny_model), "--ctx", "256", "--max-tokens", "4", stdin=lines, home=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (error,) = error_lines(done)
    assert "the context holds 256" in error
    assert done.stderr.count("prompt tokens") == 2  # the first and the last line were still answered


@pytest.mark.parametrize("command", ["/frobnicate", "/load /no/such/chat.json", "/set top_p 7"])
def test_piped_chat_with_a_failing_command_exits_non_zero(tiny_model, tmp_path, command):
    lines = f"{command}\nhello\n".encode()
    done = qwen2("chat", str(tiny_model), "--max-tokens", "3", stdin=lines, home=tmp_path)
    assert done.returncode == 1, done.stderr
    assert len(error_lines(done)) == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("prompt tokens") == 1  # the message after it was still answered


def test_piped_chat_without_failures_exits_zero(tiny_model, tmp_path):
    done = qwen2("chat", str(tiny_model), "--max-tokens", "4", stdin=b"hello\nthanks\n", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert error_lines(done) == [] and done.stderr.count("prompt tokens") == 2


# -- input that is not UTF-8 ---------------------------------------------------------------------------------

BAD_UTF8 = b"caf\xe9 au lait\nna\xefve \xff\n"  # Latin-1, not UTF-8: three invalid bytes on two lines


def warnings(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if "not valid UTF-8" in line]


@pytest.mark.parametrize("command", [("run",), ("chat",)])
def test_input_that_is_not_utf8_is_warned_about_once(tiny_model, tmp_path, command):
    done = qwen2(*command, str(tiny_model), "--max-tokens", "2", stdin=BAD_UTF8, home=tmp_path)
    assert done.returncode == 0, done.stderr
    (warning,) = warnings(done)
    assert warning.startswith("warning: ") and "0xe9 at offset 3" in warning


@pytest.mark.parametrize("command", [("run",), ("chat",)])
def test_input_that_is_not_utf8_is_refused_under_strict(tiny_model, tmp_path, command):
    done = qwen2(*command, str(tiny_model), "--strict", "--max-tokens", "2", stdin=BAD_UTF8, home=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (error,) = error_lines(done)
    assert "standard input is not valid UTF-8 (byte 0xe9 at offset 3)" in error
    assert done.stdout == ""  # refused before the first line is answered


def test_valid_utf8_gives_no_warning(tiny_model, tmp_path):
    done = qwen2("run", str(tiny_model), "--strict", "--max-tokens", "2", stdin="café 日本\n".encode(), home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert warnings(done) == []


# -- qwen2 info checks the files it describes ----------------------------------------------------------------


def rewrite_header(path: Path, change) -> None:
    """Apply `change` to a safetensors file's header dict, keeping the data bytes."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size :])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00" * 64)


def huge_header_length(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 2**40) + path.read_bytes()[8:])


def overlap(path: Path) -> None:
    def change(header: dict) -> None:
        first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
        length = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
        header[second]["data_offsets"] = [0, length]  # two tensors over the same bytes, the file's tail unclaimed

    rewrite_header(path, change)


def wrong_shape(path: Path) -> None:
    def change(header: dict) -> None:
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [dim * 2 for dim in header[name]["shape"]]

    rewrite_header(path, change)


@pytest.mark.parametrize("damage", [truncate, garbage, huge_header_length, overlap, wrong_shape])
def test_info_on_a_damaged_checkpoint_fails(tiny_model, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    damage(weights)
    with pytest.raises(SafetensorError):  # the reference reader refuses the same file
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name)
    done = qwen2("info", str(model), home=tmp_path / "home")
    assert done.returncode == 1
    assert done.stdout == "" and "Traceback" not in done.stderr
    (error,) = done.stderr.strip().splitlines()
    assert error.startswith("error: model.safetensors is corrupt or truncated"), error


def test_info_on_a_sound_checkpoint(tiny_model, tmp_path):
    done = qwen2("info", str(tiny_model), "--json", home=tmp_path)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    with safe_open(str(tiny_model / "model.safetensors"), framework="pt") as handle:
        stored = sum(handle.get_tensor(name).numel() for name in handle.keys())
    assert facts["parameters"] == stored
