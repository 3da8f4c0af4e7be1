"""Locate the real model (Qwen2.5-Coder-0.5B-Instruct) for the `real` test group, fetching it if absent.

`../shared/real-model/fetch` assembles the GGUF. Its `--hf` step fails as shipped (inside `write_hf` the
`import gguf` rebinds the name of the GGUF path argument), so the float32 Hugging Face copy is written here
the same way: transformers dequantizes the GGUF and saves it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FETCH = Path(__file__).resolve().parents[2] / "shared" / "real-model" / "fetch"
HF_NAME = "qwen2.5-coder-0.5b-instruct-hf"
LOCK = Path(tempfile.gettempdir()) / "qwen2cli-real-model.lock"  # test workers fetch and convert one at a time


@contextmanager
def _locked() -> Iterator[None]:
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def real_gguf() -> Path:
    """Path of the real GGUF file; raises RuntimeError saying why when it cannot be had."""
    with _locked():
        return _fetch_gguf()


def _fetch_gguf() -> Path:
    if not FETCH.exists():
        raise RuntimeError(f"real model unavailable: {FETCH} does not exist")
    done = subprocess.run([sys.executable, str(FETCH)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"real model unavailable: fetch failed: {done.stderr.strip()[-500:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def real_hf_dir() -> Path:
    """Directory of the float32 Hugging Face copy of the real model, written on first use."""
    with _locked():
        return _write_hf_dir(_fetch_gguf())


def _write_hf_dir(gguf_path: Path) -> Path:
    target = gguf_path.parent / HF_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(dir=gguf_path.parent, prefix=".hf-"))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # a GGUF-loaded model is marked "quantized with gguf" though its weights are plain tensors: save it as float32
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
    return target


if __name__ == "__main__":
    print(real_hf_dir())
