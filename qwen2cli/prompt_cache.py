"""The chat template's opening (system prompt and user header), its keys and values kept on disk per model, so a
cold `qwen2 run` prefills only the user's turn (llama.cpp's --prompt-cache, for the part every prompt shares).

The opening is always prefilled as a chunk of its own, cached or not, so an answer does not depend on whether the
cache file existed: the keys and values read back are the ones that chunk computes. A file is keyed by the model's
files (names, sizes, modification times), the loaded configuration and layer types, dtype, device and the opening's
token ids; anything unreadable is ignored and recomputed. Safetensors only, written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .generate import Engine, prefill
from .kv_cache import KVCache
from .paths import prompt_cache_dir

KEEP_FILES = 32  # the newest files kept; older ones are removed when a new one is written


def shared_prefix_length(ids: list[int], *others: list[int]) -> int:
    """How many leading ids `ids` has in common with every one of `others`."""
    length = len(ids)
    for other in others:
        # the shorter of the two bounds the comparison: zip stops there
        pairs = zip(ids[:length], other, strict=False)
        length = next((i for i, (a, b) in enumerate(pairs) if a != b), min(length, len(other)))
    return length


def _key(engine: Engine, opening: list[int]) -> str:
    digest = hashlib.sha256()
    model_dir = engine.model_dir.resolve()
    digest.update(str(model_dir).encode())
    for path in sorted(model_dir.iterdir()):
        if path.suffix in (".json", ".safetensors") and path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    loaded = engine.loaded
    digest.update(f"{loaded.config!r}|{loaded.dtype}|{loaded.device}|{loaded.model.model.layers[0]}".encode())
    digest.update(",".join(map(str, opening)).encode())
    return digest.hexdigest()[:32]


def fill_opening(engine: Engine, cache: KVCache, opening: list[int]) -> None:
    """Put the keys and values of `opening` (a prompt's first tokens) in the empty `cache`: read from disk when
    this model computed them before, else prefilled and saved for next time."""
    if type(cache) is not KVCache or cache.pos or not opening or len(opening) >= cache.max_len:
        return  # the int8 cache's scales depend on the whole prompt: nothing to share
    path = prompt_cache_dir() / f"{_key(engine, opening)}.safetensors"
    if _restore(cache, path, len(opening)):
        return
    prefill(engine, cache, opening)
    _save(cache, path)


def _restore(cache: KVCache, path: Path, length: int) -> bool:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
        shape = (*cache.shape[:2], length, cache.shape[3])
        pairs = [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(len(cache.keys))]
        if any(
            k.shape != shape or v.shape != shape or k.dtype != cache.dtype or v.dtype != cache.dtype for k, v in pairs
        ):
            return False
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError):
        return False
    for index, (keys, values) in enumerate(pairs):
        cache.write(index, 0, keys.to(cache.keys[index].device), values.to(cache.values[index].device))
    cache.pos = length
    return True


def _save(cache: KVCache, path: Path) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) is simply not kept."""
    from safetensors.torch import save_file

    tensors = {}
    for index, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
        tensors[f"k.{index}"] = keys[:, :, : cache.pos].contiguous().cpu()
        tensors[f"v.{index}"] = values[:, :, : cache.pos].contiguous().cpu()
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, partial)
        partial.replace(path)
        for old in sorted(path.parent.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)[:-KEEP_FILES]:
            old.unlink(missing_ok=True)
    except OSError:
        partial.unlink(missing_ok=True)
