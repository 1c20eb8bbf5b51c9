"""CPU memory allocator tuning, applied once per process before training or evaluation.

glibc's malloc serves blocks above its mmap threshold (128 KiB at first) with fresh mmap
calls and returns freed memory to the OS eagerly, so each training step's activations
(several MB each) arrive as new pages and page-fault in again: measured here, that halves
CPU training speed (benchmarks/README.md). Raising the mmap and trim thresholds keeps the
memory in the process for reuse, as tcmalloc or jemalloc would."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20      # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 * 2**20     # keep up to this much freed memory at the top of the heap

_tuned = False


def keep_freed_memory() -> bool:
    """Raises glibc's mmap and trim thresholds (Linux with glibc only; a no-op elsewhere).
    Returns whether the allocator was tuned."""
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return _tuned
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):   # musl and others have no mallopt
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
