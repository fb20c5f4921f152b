"""glibc malloc settings for CPU inference: keep freed activation memory for the next call."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc <malloc.h>).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Buffers up to this size come from the heap instead of fresh mmap()s, and freed heap memory up to
# this much above the top stays mapped. Why: a 512x512 forward pass allocates activations of up to
# 130 MB, above glibc's largest dynamic mmap threshold (32 MB), so by default every call maps them
# anew and page-faults and zeroes every page of them again.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2 << 30


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory across model calls rather than return it to the
    system; True if applied (Linux with glibc), False elsewhere. Process-wide, and resident memory
    then stays near its peak: meant for processes that run the codec repeatedly (a server, an
    evaluation, an archive job). The latentd CLI calls it once at start."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
