"""Process memory: glibc's allocation policy for large tensors, giving freed memory back, and peak readings."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import sys
from pathlib import Path

import torch


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Give the memory freed with the last block back to the OS: glibc keeps freed heap pages otherwise,
    and the resident size would creep up block after block."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc's malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_allocations() -> None:
    """Have glibc serve every allocation of 1 MiB or more from its own memory map, unmapped when freed.

    By default glibc raises that threshold to the largest size freed so far (up to 32 MiB), after which
    tensors of a few MiB (activations, Hessians, weight copies) come from its heap, where fragmentation keeps
    freed pages resident: the peak memory of a blockwise run then creeps up block after block (by about a
    third over 24 blocks in ``benchmarks/memory.py``). The setting is process-wide and idempotent; a
    threshold set through glibc's ``MALLOC_MMAP_THRESHOLD_`` environment variable is left alone.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def peak_memory(device: torch.device) -> int:
    """Peak bytes allocated on a CUDA ``device``, else the peak resident memory of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss() -> int:
    """Resident memory of this process now (Linux), else its peak so far."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def format_bytes(size: float) -> str:
    """``size`` in the largest binary unit that keeps the number at 1 or more: ``"512 B"``, ``"3.25 MiB"``."""
    if abs(size) < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if abs(size) < 1024:
            return f"{size:.2f} {unit}"
    return f"{size / 1024:.2f} TiB"
