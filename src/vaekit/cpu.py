"""The CPU this process runs on: the cores it may use, and glibc's allocator tuned to keep freed
memory (applied once per process before training or evaluation).

glibc's malloc serves blocks above its mmap threshold (128 KiB at first) with fresh mmap
calls and returns freed memory to the OS eagerly, so each training step's activations
(several MB each) arrive as new pages and page-fault in again: measured here, that halves
CPU training speed (benchmarks/README.md). Raising the trim threshold and turning mmap off
keeps the memory in the process for reuse, as tcmalloc or jemalloc would. mmap is off rather
than its threshold raised, as glibc caps the threshold at 32 MiB: an evaluation's decode batch
of 1,000 draws of the seed's model has a 50 MB layer output, which would still be mapped and
faulted in on every pass (the seed's IWAE pass was 11-12% slower for it, its decode batch tuned
smaller: docs/evaluation.md#speed)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 256 * 2**20     # keep up to this much freed memory at the top of the heap

_tuned = False


def keep_freed_memory() -> bool:
    """Turns glibc's mmap off and raises its trim threshold (Linux with glibc only; a no-op
    elsewhere). Returns whether the allocator was tuned."""
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return _tuned
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):   # musl and others have no mallopt
        return False
    _tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
