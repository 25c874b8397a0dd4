"""Hand freed heap memory back to the operating system between chunks.

Uneven texts make tensors of ever-new sizes. glibc's malloc keeps what they free in its arenas
and raises its mmap threshold as large blocks come and go, so a worker's resident memory climbs
over a long job (measured on a tiny model: +12% from 10,000 to 100,000 items) without any leak.
``malloc_trim(0)`` returns that free memory. Trimming after every chunk cost the tiny model
about 12% of its throughput (the freed pages fault back in); at most once a second it kept the
worker's RSS flat (-6% from 10,000 to 100,000 items) for a few per cent. Where libc is not glibc
this is a no-op; jemalloc (``LD_PRELOAD``) does not need it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

#: Seconds between two trims at least.
TRIM_INTERVAL = 1.0


def _glibc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _glibc_trim()
_last = float("-inf")


def release_free_memory(*, interval: float = TRIM_INTERVAL) -> bool:
    """Return free heap pages to the OS unless that was done less than ``interval`` seconds ago.

    True if it trimmed now; False where it was too soon or there is nothing to call (not glibc).
    """
    global _last
    now = time.monotonic()
    if _TRIM is None or now - _last < interval:
        return False
    _last = now
    _TRIM(0)
    return True
