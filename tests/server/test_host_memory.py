"""keep_freed_memory: on glibc, blocks of a few MiB come from the heap (reused after a free)
instead of a fresh mmap each time; read back through glibc's own counters (mallinfo2)."""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest

from skillpack_server.engine.host_memory import MMAP_THRESHOLD, keep_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt and mallinfo2 are glibc's")
def test_blocks_below_the_threshold_come_from_the_heap():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    assert keep_freed_memory()
    before = libc.mallinfo2().hblks  # blocks served by mmap right now
    block = libc.malloc(MMAP_THRESHOLD // 4)  # 8 MiB: mmap'd under glibc's default thresholds
    try:
        assert block
        assert libc.mallinfo2().hblks == before
    finally:
        libc.free(block)
