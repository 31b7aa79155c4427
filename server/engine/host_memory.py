"""The process's allocator told to keep freed memory for reuse (glibc's `mallopt`).

By default glibc serves every allocation above a moving threshold (128 KiB at first) with a
fresh `mmap` and returns it to the system on free, and hands the top of its heap back past
128 KiB free. A pack load allocates megabytes in such blocks (the file's buffer, the compact
tiers), so a pack's first load paid a page fault per 4 KiB of them: measured on the 2-core
box, 49 ms for a pack's first cold load against 28 ms once memory had been reused. With the
thresholds below, blocks up to 32 MiB come from the heap and up to 256 MiB of freed heap is
kept: loads reuse memory the process has already touched.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Set the thresholds where the C library is glibc; False (nothing changed) elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator's defaults stand
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.warning("mallopt refused the allocator thresholds: pack loads may page-fault more")
    return ok
