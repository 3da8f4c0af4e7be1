"""Progress on stderr: each step of `qwen2 quantize` drawn on a terminal in its own unit; nothing on a pipe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

REPO = Path(__file__).resolve().parents[1]
QUANTIZE = ("quantize", "--method", "gptq", "--group-size", "32", "--samples", "8", "--seq-len", "32")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_a_terminal(args: list[str], home: Path, **env: str) -> str:
    """What the command writes to a pseudo-terminal (stdout and stderr both), escape sequences removed."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwen2cli", *args],
        env={"QWEN2_HOME": str(home), "PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **env},
        encoding="utf-8",
        timeout=180,
        dimensions=(40, 160),
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return ANSI.sub("", child.before)


@pytest.mark.parametrize("colour", [{"TERM": "xterm"}, {"TERM": "xterm", "NO_COLOR": "1"}])
def test_quantize_shows_each_step_in_its_unit(tiny_model, tmp_path, colour):
    shown = on_a_terminal([*QUANTIZE, str(tiny_model), "--out", str(tmp_path / "out")], tmp_path / "home", **colour)
    layers = 3  # the tiny model's
    assert f"loading {tiny_model.name}" in shown
    assert re.search(r"calibration samples\s.*8/8 samples", shown), shown
    assert re.search(rf"quantizing \(gptq-int4\)\s.*{layers}/{layers} layers", shown), shown
    assert re.search(r"saving\s.*[\d.]+/[\d.]+ [kM]B", shown), shown  # bytes, shown as a transfer
    assert "layers bytes" not in shown and not re.search(r"\d/\d+ bytes", shown)
    assert shown.strip().endswith(str((tmp_path / "out").resolve()))  # the answer: the path, after the bars went


def test_quantize_on_a_pipe_writes_nothing_but_the_path(tiny_model, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "qwen2cli", *QUANTIZE, str(tiny_model), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "QWEN2_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == f"{(tmp_path / 'out').resolve()}\n"


def test_download_shows_each_file_and_its_verification_in_bytes(tiny_model, tmp_path):
    from devtools.hub_server import HubServer, HubState

    state = HubState()
    state.add_directory("Qwen/Tiny-Test", tiny_model)
    with HubServer(state) as server:
        shown = on_a_terminal(
            ["download", "Qwen/Tiny-Test"], tmp_path / "home", TERM="xterm", HF_ENDPOINT=server.url, NO_COLOR="1"
        )
    size = (tiny_model / "model.safetensors").stat().st_size
    assert re.search(r"model\.safetensors\s.*kB", shown), shown  # the transfer, in bytes
    assert re.search(r"verifying model\.safetensors\s.*kB", shown), shown
    assert f"{size / 1000:.1f}/{size / 1000:.1f} kB" in shown


def test_chat_shows_the_model_loading_before_its_prompt(tiny_model, tmp_path):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwen2cli", "chat", str(tiny_model)],
        env={"QWEN2_HOME": str(tmp_path), "PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "TERM": "xterm"},
        encoding="utf-8",
        timeout=180,
        dimensions=(40, 160),
    )
    child.expect_exact(">>>")  # the prompt, drawn with escape sequences after it on this terminal
    assert f"loading {tiny_model.name}" in ANSI.sub("", child.before)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
