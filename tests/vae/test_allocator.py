"""retain_freed_memory: a large freed buffer stays mapped in the process, ready for the next call."""

from __future__ import annotations

import subprocess
import sys

import pytest

from latentd.vae.allocator import has_glibc_malloc

# Allocate, touch and free 256 MB (on the main thread or a worker, like a server's compute thread);
# print how much resident memory the process kept (MB).
_PROBE = """
import os, sys, threading
import numpy as np
if sys.argv[1] == "retain":
    from latentd.vae.allocator import retain_freed_memory
    assert retain_freed_memory()
def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def touch_and_free():
    buffer = np.ones(256 << 20, np.uint8)
    del buffer
before = resident_mb()
if sys.argv[2] == "worker":
    worker = threading.Thread(target=touch_and_free)
    worker.start()
    worker.join()
else:
    touch_and_free()
print(resident_mb() - before)
"""


@pytest.mark.skipif(not has_glibc_malloc(), reason="glibc only")
@pytest.mark.parametrize("thread", ["main", "worker"])
def test_a_freed_buffer_stays_mapped_for_reuse(thread):
    def kept_mb(mode: str) -> float:
        return float(subprocess.run([sys.executable, "-c", _PROBE, mode, thread], check=True, capture_output=True,
                                    text=True).stdout)

    assert kept_mb("default") < 32  # unmapped at free: the next call maps and zeroes it again
    assert kept_mb("retain") > 200  # kept: the next call reuses pages already mapped
