"""The process's heap on Linux: glibc's malloc hands every freed block above its mmap threshold
(128 KiB at first, growing up to 32 MiB) back to the kernel, and trims the heap's top above 128
KiB. A full-batch step allocates and frees the same large activations every step (a digits
pack: [K, 1437, 128] floats), so each step page-faults them in anew: 12 % of a digits pack's time
went to the kernel. Raising both thresholds once keeps that memory in the heap for the next step
(`make bench`: bench/pack_bench.py, with and without). Freed memory stays with the process, at
most the trim threshold above what it uses. Elsewhere (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap and are reused
TRIM_THRESHOLD = 256 << 20  # the heap keeps up to this much free memory at its top


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; whether they were set."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # no glibc: its defaults do not apply either
        return False
