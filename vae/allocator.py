"""glibc malloc settings for CPU inference: keep freed activation memory for the next call."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc <malloc.h>).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
# Buffers up to this size come from the heap instead of fresh mmap()s, and freed heap memory up to
# this much above the top stays mapped. Why: a 512x512 forward pass allocates activations of up to
# 130 MB, above glibc's largest dynamic mmap threshold (32 MB), so by default every call maps them
# anew and page-faults and zeroes every page of them again.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2 << 30
# One arena for all threads: a thread's own arena grows in heaps of at most 64 MB, so the buffers
# above would still be mapped anew on every call on a server's compute lanes.
ARENA_MAX = 1


def has_glibc_malloc() -> bool:
    """Whether this process's malloc is glibc's (the only one these settings apply to)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory across model calls rather than return it to the
    system; True if applied (Linux with glibc), False elsewhere. Process-wide, and resident memory
    then stays near its peak: meant for processes that run the codec repeatedly (a server, an
    evaluation, an archive job). Call it before starting threads (a thread keeps the arena it first
    allocated from); the latentd CLI calls it once at start."""
    if not has_glibc_malloc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((M_ARENA_MAX, ARENA_MAX), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    # A list, not a generator: every setting is applied even if an earlier one is refused.
    return all([bool(libc.mallopt(parameter, value)) for parameter, value in settings])
