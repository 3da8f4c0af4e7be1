"""How much memory a KV cache takes and how much the machine has free: a context too long to fit is refused with
the longest one that does, before anything is allocated."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import BadInput

HEADROOM = 0.9  # of the free memory, the share a cache may take: activations and the allocator need the rest


def kv_bytes_per_token(config, *, element_bytes: float) -> int:
    """Cache bytes one position takes across all layers (int8: 1 byte per value plus a 2-byte scale per head)."""
    per_head = config.head_dim * element_bytes + (2 if element_bytes == 1 else 0)
    return int(2 * config.num_hidden_layers * config.num_key_value_heads * per_head)


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What a cgroup v2 memory limit leaves (a container's limit can be far below the machine's free memory)."""
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_memory(device: str = "cpu") -> int | None:
    """Bytes free for new allocations on `device` (a torch device or its name); None where it cannot be told."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    if kind != "cpu":
        return None
    known = [room for room in (_meminfo_available(), _cgroup_room()) if room is not None]
    if not known:
        try:
            known = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError, AttributeError):
            return None
    return min(known)


def check_cache_fits(
    config, max_len: int, *, element_bytes: float, device: str = "cpu", available: int | None = None
) -> None:
    """Refuse (BadInput) a cache of `max_len` positions that the free memory cannot hold, naming the longest context
    that fits. `available`: the free bytes, measured on `device` when not given."""
    available = available_memory(device) if available is None else available
    if available is None:
        return
    per_token = kv_bytes_per_token(config, element_bytes=element_bytes)
    needed = per_token * max_len
    usable = int(available * HEADROOM)
    if needed <= usable:
        return
    longest = usable // per_token
    advice = f"--ctx {longest} is the longest that fits" if longest >= 2 else "no context fits; free some memory"
    if element_bytes > 1 and longest >= 2:
        advice += f" ({usable // kv_bytes_per_token(config, element_bytes=1)} with --kv-cache int8)"
    raise BadInput(
        f"a {max_len}-token context needs {needed / 2**30:.1f} GiB of KV cache and {available / 2**30:.1f} GiB of "
        f"memory is free: {advice}"
    )
