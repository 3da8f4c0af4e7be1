"""The int4/int8 x float32 row kernels of quant/qgemv.c, quant/qlayer.c's one-token decoder layer on them, and
quant/attention.c's prompt attention (AVX-512 builds), compiled with the system's C compiler at first use.

torch's CPU int4 and int8 kernels compute bfloat16 products and stream weights slowly on AVX2 (docs/performance.md);
qgemv.c quantizes the activations to int8 and multiplies bytes as llama.cpp does. Built once per source into a cache
directory (the caller's, else a private temporary one), loaded with ctypes; absent (None) where there is no compiler,
no AVX2/FMA, not x86-64, or QWEN2_NATIVE=0: callers then keep torch's kernels. A compiler that fails (or is missing
on a CPU that could run the kernels) is told once as a KernelBuildWarning carrying the compiler's output."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .codes import KINDS

SOURCES = [Path(__file__).with_name(name) for name in ("qgemv.c", "qgemv_x8.c", "qlayer.c", "attention.c")]
HEADERS = [Path(__file__).with_name(name) for name in ("simd.h", "qgemv.h")]  # all: one library
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
# where the CPU has them: two blocks of 32 codes per 512-bit vpdpbusd (qgemv.c's rows_dot512)
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
cache_dir: Path | None = None  # set by the application (qwen2cli: QWEN2_HOME/cache/kernels)
FALLBACK = "using torch's kernels"


class KernelBuildWarning(RuntimeWarning):
    """The native kernels could not be built or loaded, so torch's kernels run instead; `output` holds what the
    compiler said."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def _warn_unavailable(reason: str, output: str = "") -> None:
    """Say once (one message text, one place) why the native kernels are not used."""
    warnings.warn(KernelBuildWarning(f"native CPU kernels unavailable ({reason}); {FALLBACK}", output), stacklevel=3)


def native_flags() -> tuple[str, ...]:
    """The compiler flags for this CPU: AVX2 + FMA + F16C, and AVX-512 BW/VL/VNNI where /proc/cpuinfo lists them
    (QWEN2_NATIVE_AVX512=0 keeps the AVX2 build)."""
    vnni = os.environ.get("QWEN2_NATIVE_AVX512") != "0" and _cpu_has_all(
        "avx512f", "avx512bw", "avx512vl", "avx512_vnni"
    )
    return tuple(FLAGS + AVX512_FLAGS if vnni else FLAGS)


def native_library() -> ctypes.CDLL | None:
    """The compiled kernel for this CPU, building it on first call; None where it cannot run here."""
    return build_library(native_flags())


@functools.cache
def build_library(flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """The kernels compiled with `flags` (cached per flags and source); None where they cannot run here."""
    if os.environ.get("QWEN2_NATIVE") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if not _cpu_has("avx2", "fma", "f16c"):
        return None
    asked = os.environ.get("CC", "gcc")
    compiler = shutil.which(asked) or shutil.which("cc")
    if compiler is None:
        _warn_unavailable(f"no C compiler: {asked} not found")
        return None
    digest = hashlib.sha256(
        b"".join(path.read_bytes() for path in SOURCES + HEADERS) + " ".join(flags).encode()
    ).hexdigest()[:16]
    try:
        # never a shared, guessable directory (another user could plant a library there): the caller's cache, else
        # a private temporary one for this process (a 0.5 s build each time)
        private = cache_dir is None
        directory = cache_dir or Path(tempfile.mkdtemp(prefix="qwen2cli-kernels-"))
        target = directory / f"qgemv-{digest}.so"
        if not target.exists():
            directory.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}")
            built = subprocess.run(
                [compiler, *flags, *map(str, SOURCES), "-o", str(partial)], capture_output=True, text=True, timeout=120
            )
            if built.returncode != 0:
                partial.unlink(missing_ok=True)
                reason = f"{Path(compiler).name} failed with exit status {built.returncode}"
                _warn_unavailable(reason, (built.stdout + built.stderr).strip())
                return None
            os.replace(partial, target)  # atomic: another process may be building the same file
        library = ctypes.CDLL(str(target))  # after torch: its libgomp.so.1 is the OpenMP runtime both use
        if private:
            shutil.rmtree(directory, ignore_errors=True)  # the loaded mapping outlives the file
    except (OSError, subprocess.SubprocessError) as exc:
        _warn_unavailable(f"build or load failed: {' '.join(str(exc).split())[:160]}")
        return None
    if not library.q4_supported():
        return None
    for function in (library.q4_gemv, library.q8_gemv, library.q4_gemv_h, library.q8_gemv_h):
        function.restype = None
        function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
    library.q_gemv.restype = None
    library.q_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6
    library.q_unpack.restype = None
    library.q_unpack.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
    library.x8_gemv.restype = None
    library.x8_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6
    library.x8_unpack.restype = None
    library.x8_unpack.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
    library.q_interleave.restype = None
    library.q_interleave.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 5
    library.q_x8_supported.restype = ctypes.c_int
    library.attention_supported.restype = ctypes.c_int
    library.attention_prefill.restype = None
    library.attention_prefill.argtypes = (
        [ctypes.c_void_p] * 3
        + [ctypes.c_long] * 2
        + [ctypes.c_void_p, ctypes.c_long, ctypes.c_long] * 2
        + [ctypes.c_int]
        + [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
        + [ctypes.c_int] * 6
    )
    library.qlayer_work_floats.restype = ctypes.c_long
    library.qlayer_work_floats.argtypes = [ctypes.c_void_p, ctypes.c_int]
    library.qlayer_exp.restype = None
    library.qlayer_exp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    library.qlayer_decode.restype = None
    library.qlayer_decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, *[ctypes.c_void_p] * 7]
    return library


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, read once (every prompt chunk's attention asks for the
    library); None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return frozenset(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )


def _cpu_has(*features: str) -> bool:
    """Whether /proc/cpuinfo lists these flags (checked before any AVX2 code is loaded); True where it is absent."""
    flags = _cpu_flags()
    return flags is None or set(features) <= flags


def _cpu_has_all(*features: str) -> bool:
    """Whether /proc/cpuinfo lists all these flags; False where it is absent."""
    return set(features) <= (_cpu_flags() or set())


def cpu_has_any(*features: str) -> bool:
    """Whether /proc/cpuinfo lists one of these flags; False where it is absent."""
    return bool((_cpu_flags() or set()) & set(features))


def native_matmul(
    library: ctypes.CDLL,
    kind: str,
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    *,
    interleaved: bool = False,
) -> torch.Tensor:
    """x (rows, in) float32 contiguous @ W^T -> (rows, out) float32. `kind` q4 (pack_q4's codes), q5 (pack_q5's)
    or q8 (pack_q8's, or any int8 codes); per (out, group), contiguous: float32 scales and offsets,
    W = stored * scale + offset; or float16 scales and int16 zeros, W = (stored - zero) * scale. Groups: multiples
    of 32 inputs, or 16. `interleaved`: codes and tables as `interleave` returns them."""
    rows, in_features = x.shape
    out_features = packed.shape[0]
    if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":  # raw pointers follow
        raise ValueError("native_matmul takes contiguous float32 CPU activations")
    half = scales.dtype == torch.float16
    if (
        offsets.dtype != (torch.int16 if half else torch.float32)
        or (not half and scales.dtype != torch.float32)
        or not (scales.is_contiguous() and offsets.is_contiguous())
    ):
        raise ValueError("native_matmul takes float32 scales and offsets, or float16 scales and int16 zeros")
    out = torch.empty(rows, out_features, dtype=torch.float32, device=x.device)
    (library.x8_gemv if interleaved else library.q_gemv)(
        packed.data_ptr(),
        scales.data_ptr(),
        offsets.data_ptr(),
        x.data_ptr(),
        out.data_ptr(),
        out_features,
        in_features,
        group_size,
        rows,
        KINDS[kind],
        half,
    )
    return out


def native_unpack(
    library: ctypes.CDLL,
    kind: str,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    out: torch.Tensor,
    *,
    interleaved: bool = False,
) -> torch.Tensor:
    """The weight rows `native_matmul` multiplies by, written into `out` (rows, in): float32, or bfloat16 rounded as
    torch rounds. Tables as native_matmul's, rows matching `packed`'s (whole groups of 8 where interleaved)."""
    rows, in_features = out.shape
    if (
        out.dtype not in (torch.float32, torch.bfloat16)
        or not out.is_contiguous()
        or packed.shape[0] != rows
        or not (packed.is_contiguous() and scales.is_contiguous() and offsets.is_contiguous())
    ):
        raise ValueError("native_unpack writes contiguous float32 or bfloat16 rows matching the packed ones")
    (library.x8_unpack if interleaved else library.q_unpack)(
        packed.data_ptr(),
        scales.data_ptr(),
        offsets.data_ptr(),
        out.data_ptr(),
        rows,
        in_features,
        group_size,
        KINDS[kind],
        scales.dtype == torch.float16,
        out.dtype == torch.bfloat16,
    )
    return out


def can_interleave(library: ctypes.CDLL, out_features: int, in_features: int) -> bool:
    """Whether `interleave` applies: an AVX-512 VNNI build (qgemv_x8.c), rows in whole groups of 8, and not turned
    off by QWEN2_NATIVE_INTERLEAVE=0 (for comparisons)."""
    return (
        bool(library.q_x8_supported())
        and out_features % 8 == 0
        and in_features % 32 == 0
        and os.environ.get("QWEN2_NATIVE_INTERLEAVE") != "0"
    )


INTERLEAVE_ROWS = 8192  # rows interleaved at a time (7 MB of the int8 head's codes): a multiple of 8


def interleave(
    library: ctypes.CDLL, kind: str, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """native_matmul's codes and tables with each 8 rows' interleaved (quant/qgemv_x8.c's layout: a vpdpbusd lane
    per row, which lets several activation rows share the per-block float work): new tensors of the same shapes
    and dtypes, for `interleaved=True`. Rows: a multiple of 8 (can_interleave)."""
    return interleave_rows(
        library,
        kind,
        packed.shape[0],
        group_size,
        lambda start, stop: (packed[start:stop], scales[start:stop], offsets[start:stop]),
    )


def interleave_rows(
    library: ctypes.CDLL,
    kind: str,
    rows: int,
    group_size: int,
    read: Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`interleave` of the codes and tables `read(start, stop)` gives for rows start:stop, asked for INTERLEAVE_ROWS
    at a time and dropped before the next block is read: a reader that maps its file for each block holds one
    block's pages in memory beside the interleaved copy, never the whole tensor's."""
    outputs: list[torch.Tensor] = []
    for start in range(0, rows, INTERLEAVE_ROWS):
        stop = min(rows, start + INTERLEAVE_ROWS)
        parts = [part.contiguous() for part in read(start, stop)]
        if any(part.device.type != "cpu" for part in parts):  # raw pointers follow
            raise ValueError("interleave takes CPU tensors")
        in_features = parts[1].numel() // (stop - start) * group_size  # tables (rows, groups), or (rows, groups, 1)
        if not outputs:
            if not can_interleave(library, rows, in_features):
                raise ValueError(f"cannot interleave a {rows} x {in_features} {kind} matrix here")
            outputs = [torch.empty((rows, *part.shape[1:]), dtype=part.dtype, device="cpu") for part in parts]
        library.q_interleave(
            *(part.data_ptr() for part in parts),
            *(out[start:stop].data_ptr() for out in outputs),
            stop - start,
            in_features,
            group_size,
            KINDS[kind],
            parts[1].element_size(),
        )
        del parts
    codes, scales, offsets = outputs
    return codes, scales, offsets


def prefill_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    *,
    dual_chunk: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor | None:
    """Causal GQA attention of a prompt chunk in C (quant/attention.c, AVX-512 builds): q (heads, length, d) at
    positions start.., keys/values (kv_heads, >= start + length, d) float32 or bfloat16, each with unit stride in d.
    `dual_chunk`: (successive queries, inter queries, chunk_len) for dual chunk attention, q then being the intra
    queries (qwen2cli/dca.py defines it). Returns float32 (heads, length, d) as a view of a (length, heads, d)
    tensor (what the output projection reads), or None where the kernel does not run: no AVX-512 build, head_dim
    not a multiple of 16, a chunk length not a multiple of 64, other dtypes or devices."""
    library = native_library()
    heads, length, d = q.shape
    kv_heads = keys.shape[0]
    queries = [q] if dual_chunk is None else [q, dual_chunk[0], dual_chunk[1]]
    chunk_len = 0 if dual_chunk is None else dual_chunk[2]
    if (
        library is None
        or not library.attention_supported()
        or d % 16
        or heads % kv_heads
        or chunk_len % 64
        or (dual_chunk is not None and chunk_len <= 0)
        or q.device.type != "cpu"
        or keys.dtype != values.dtype
        or keys.dtype not in (torch.float32, torch.bfloat16)
        or keys.shape[1] < start + length
        or any(t.stride(-1) != 1 for t in (keys, values))
    ):
        return None
    # float32 with unit stride in d, all variants laid out alike (the kernel takes one set of strides)
    queries = (
        [query.float().contiguous() for query in queries]
        if dual_chunk is not None or (q.dtype != torch.float32 or q.stride(-1) != 1)
        else queries
    )
    first = queries[0]
    successive, inter = (queries[1].data_ptr(), queries[2].data_ptr()) if dual_chunk is not None else (None, None)
    out = torch.empty(length, heads, d, dtype=torch.float32, device=q.device)  # never the default device
    library.attention_prefill(
        first.data_ptr(),
        successive,
        inter,
        first.stride(0),
        first.stride(1),
        keys.data_ptr(),
        keys.stride(0),
        keys.stride(1),
        values.data_ptr(),
        values.stride(0),
        values.stride(1),
        keys.dtype == torch.bfloat16,
        out.data_ptr(),
        d,
        heads * d,
        heads,
        kv_heads,
        length,
        start,
        d,
        chunk_len,
    )
    return out.transpose(0, 1)
