"""Safetensors weight files: which files a checkpoint has, their tensors read as zero-copy views where they can
be, which file holds each tensor, tensors written one at a time; and handing freed heap memory back to the system
(or keeping it) around loads."""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import BadCheckpoint


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (single or sharded); pickle checkpoints are refused."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise BadCheckpoint(f"cannot read {index}: {exc}") from exc
        files = [model_dir / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise BadCheckpoint(f"{model_dir} is missing shards named in its index: {', '.join(missing[:3])}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")) or list(model_dir.glob("*.pth")):
        raise BadCheckpoint(
            f"{model_dir} holds only pickle (*.bin/*.pt) weights, which can run arbitrary code when loaded; "
            "qwen2cli loads safetensors only (convert with transformers' save_pretrained(safe_serialization=True))"
        )
    raise BadCheckpoint(f"{model_dir} has no *.safetensors weights")


OWN_MAPPING_BYTES = 1 << 22  # tensors read through a mapping of their own when converted or transient
Target = Callable[[str, torch.Tensor], tuple[torch.dtype, torch.device]]


def read_state_dict(
    files: list[Path],
    target: Target | None = None,
    transient: frozenset[str] = frozenset(),
    skip: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Tensors from safetensors files; a corrupt or truncated file is a BadCheckpoint.

    `target(name, tensor)` says the dtype and device each tensor is used in. One already so stays a memory-mapped,
    zero-copy view. One converted, or named in `transient` (read once, then dropped), is read through a mapping of
    its own, so the pages read for it leave memory with it instead of staying resident in the one mapping that the
    kept views hold open. Names in `skip` are not read."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    if name in skip:
                        continue
                    tensor = handle.get_tensor(name)  # a view: none of its pages is read yet
                    dtype, device = (tensor.dtype, tensor.device) if target is None else target(name, tensor)
                    if (dtype, device) == (tensor.dtype, tensor.device) and name not in transient:
                        tensors[name] = tensor
                    elif tensor.nbytes < OWN_MAPPING_BYTES:  # small: not worth a mapping (~2 ms each)
                        tensors[name] = tensor.to(device=device, dtype=dtype)
                    else:
                        with safe_open(str(path), framework="pt", device="cpu") as own:
                            tensors[name] = own.get_tensor(name).to(device=device, dtype=dtype)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise corrupt(path, exc) from exc
    return tensors


def corrupt(path: Path, exc: Exception) -> BadCheckpoint:
    """The one message for a weight file that cannot be read."""
    return BadCheckpoint(f"{path.name} is corrupt or truncated ({' '.join(str(exc).split())[:120]})")


def tensor_homes(files: list[Path]) -> dict[str, Path]:
    """Which file holds each tensor (the files' headers only)."""
    home: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                home.update((name, path) for name in handle.keys())
        except (SafetensorError, OSError) as exc:
            raise corrupt(path, exc) from exc
    return home


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc): loading frees hundreds of MB of temporaries in
    pieces that malloc would otherwise keep, counted in the process's resident memory."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def drop_pages(views: list[torch.Tensor]) -> None:
    """Take the pages read through views of a read-only file mapping (safe_open's) out of the process's resident
    memory (Linux's MADV_DONTNEED; elsewhere nothing). They are the file's: touched again, they are read back from
    the page cache, so only residency changes. Never for memory of the process's own (it would be zeroed)."""
    if not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for view in views:
        start = -(-view.data_ptr() // page) * page  # whole pages inside the view
        end = (view.data_ptr() + view.nbytes) // page * page
        if end > start:
            madvise(start, end - start, 4)  # MADV_DONTNEED


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it: calibration forwards allocate and free
    tensors of tens of MB per batch, each above malloc's mmap threshold (32 MB at most), so every one was a fresh
    mmap whose pages faulted in zeroed (17.8 million page faults in a 32 x 512 GPTQ run, 31 s of system time).
    For this process only (the quantize command); False where the C library has no mallopt (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


STORED_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class StoredRows:
    """Tensors of one safetensors file read a block of rows at a time with plain reads into memory of their own (no
    mapping of the file): the rows of a tensor too big to hold twice (the int8 head) can be turned into something
    else block by block, with only one block's bytes beside the result, and nothing read stays resident after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
        except (OSError, ValueError) as exc:
            raise corrupt(path, exc) from exc
        self.start = 8 + size
        self.header: dict[str, dict] = {name: entry for name, entry in header.items() if name != "__metadata__"}

    def reader(self, name: str) -> Callable[[int, int], torch.Tensor]:
        """`read(start, stop)`: rows start:stop of tensor `name`."""
        entry = self.header[name]
        dtype, shape = STORED_DTYPES.get(entry["dtype"]), list(entry["shape"])
        begin, end = entry["data_offsets"]
        if dtype is None or not shape or end - begin != math.prod(shape) * dtype.itemsize:
            raise corrupt(self.path, ValueError(f"{name}: cannot read rows of {entry['dtype']} {shape}"))
        row_bytes = (end - begin) // shape[0] if shape[0] else 0

        def read(start: int, stop: int) -> torch.Tensor:
            rows = torch.empty((stop - start, *shape[1:]), dtype=dtype, device="cpu")  # never the default device
            try:
                with self.path.open("rb") as handle:
                    handle.seek(self.start + begin + start * row_bytes)
                    done = handle.readinto(rows.view(torch.uint8).numpy().reshape(-1).data)
            except OSError as exc:
                raise corrupt(self.path, exc) from exc
            if done != rows.nbytes or not 0 <= start <= stop <= shape[0]:
                raise corrupt(self.path, ValueError(f"{name}: rows {start}:{stop} are past the end"))
            return rows

        return read


def save_weights(
    state: dict[str, torch.Tensor],
    path: Path,
    *,
    float_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write tensors as safetensors atomically (temporary file, then rename), one tensor at a time: the header
    first (from shapes and dtypes alone), then each tensor's bytes, floating tensors cast to `float_dtype` as they
    are written (`progress`: bytes written and the total, after each). safetensors' save_file serialises the whole
    file in memory first, a second copy of the model (a 7B's int4 output is 5 GB)."""

    def stored_dtype(tensor: torch.Tensor) -> torch.dtype:
        return float_dtype if float_dtype is not None and tensor.is_floating_point() else tensor.dtype

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in state.items():
        size = tensor.numel() * stored_dtype(tensor).itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[stored_dtype(tensor)],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensors start 8-byte aligned
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        written = 0
        for tensor in state.values():
            data = tensor.detach().to("cpu", stored_dtype(tensor)).contiguous().reshape(-1)
            handle.write(data.view(torch.uint8).numpy().data)
            written += data.numel() * data.element_size()
            if progress is not None:
                progress(written, offset)
    temporary.replace(path)
