"""Keep freed memory in the process: a large speed-up for many small CPU runs on glibc.

On Linux, glibc hands freed blocks above its mmap threshold (and the free top of the heap) back
to the operating system, so every statistics pass of the pruner faults the same pages back in.
In the digits sweep that churn was about 35 million minor page faults and a third of all CPU time.
Raising the two thresholds keeps those pages mapped; memory the process has used once stays
reserved for it, which is what a long sweep wants. Elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TRIM_BYTES = 1 << 30  # return the heap's free top to the OS only beyond 1 GiB
_MMAP_BYTES = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit systems

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds once per process; True if they were set."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    _done = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)) and bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)
    )
    return _done
