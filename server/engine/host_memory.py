"""The process's allocator told to keep freed memory for reuse (glibc's `mallopt`).

By default glibc serves every allocation above a moving threshold (128 KiB at first) with a
fresh `mmap` and returns it to the system on free, and hands the top of its heap back past
128 KiB free; and each new thread that allocates gets an arena of its own. A pack load
allocates megabytes in such blocks (the file's buffer, the compact tiers), so a pack's first
load paid a page fault per 4 KiB of them: measured on the 2-core box, 49 ms for a pack's
first cold load against 28 ms once memory had been reused, and the pack cache's loader thread,
in an arena of its own, converted a pack in 40 ms where the engine thread took 14. With the
settings below, blocks up to 32 MiB come from the heap, up to 256 MiB of freed heap is kept,
and every thread shares one arena: loads reuse memory the process has already touched. (The
engine's threads take turns allocating, so one arena costs them little waiting.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Set the thresholds and the one arena where the C library is glibc; False (nothing changed) elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator's defaults stand
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(option, value) for option, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, 1)))
    if not ok:
        log.warning("mallopt refused the allocator thresholds: pack loads may page-fault more")
    return ok
