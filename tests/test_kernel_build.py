"""A native kernel build that fails is said once on stderr, with the fallback taken; QWEN2_DEBUG=1 adds what the
compiler said. Checked through `qwen2 run` with a compiler that always fails."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

COMPILER_SAYS = "qgemv.c:1:1: error: this compiler refuses every file"
WARNING = "warning: native CPU kernels unavailable (failing-cc failed with exit status 1); using torch's kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma", "f16c"} <= _cpu_flags(),
    reason="the native kernels are built only on x86-64 CPUs with AVX2, FMA and F16C",
)


def qwen2_run(model_dir: Path, home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen2cli", "run", str(model_dir), "--raw", "hello there, how are you"]
        + ["--temperature", "0", "--max-tokens", "6"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "QWEN2_HOME": str(home), "NO_COLOR": "1", **env},
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture()
def failing_compiler(tmp_path) -> Path:
    compiler = tmp_path / "bin" / "failing-cc"
    compiler.parent.mkdir()
    compiler.write_text(f"#!/bin/sh\necho '{COMPILER_SAYS}' >&2\nexit 1\n")
    compiler.chmod(0o755)
    return compiler


def test_failed_build_is_said_once_and_torch_answers(tiny_model, tmp_path, failing_compiler):
    torch_kernels = qwen2_run(tiny_model, tmp_path / "plain", QWEN2_NATIVE="0")
    assert torch_kernels.returncode == 0 and torch_kernels.stderr == "", torch_kernels.stderr
    done = qwen2_run(tiny_model, tmp_path / "failing", CC=str(failing_compiler))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"{WARNING} (QWEN2_DEBUG=1 shows the compiler's output)"]
    assert done.stdout == torch_kernels.stdout  # the fallback it names is the one that answered


def test_debug_shows_the_compilers_output(tiny_model, tmp_path, failing_compiler):
    done = qwen2_run(tiny_model, tmp_path, CC=str(failing_compiler), QWEN2_DEBUG="1")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [WARNING, COMPILER_SAYS]
