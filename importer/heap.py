"""The process's heap, kept from growing for good in a big batch.

glibc's malloc gives each thread that allocates an arena of its own (up to 8 per core) and
raises its mmap threshold after large blocks are freed: the sending, querying and stamping
threads, and the large log records of a tool's output (a dcmdump of 1,000 files is 16,000
lines), then leave freed memory scattered in the process. Two arenas and a fixed
threshold keep it returned.
"""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # mallopt parameters (malloc.h)
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024  # blocks from this size are mapped and unmapped on their own


def bound() -> None:
    """Tune glibc's malloc before the first thread starts; elsewhere (musl), nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_ARENA_MAX, 2)
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
