"""Give freed memory back to the system, so the agent's RSS follows what it holds.

glibc's allocator serves a request above its mmap threshold with a mapping of its own, returned
to the system when freed, and anything smaller from its heap, which rarely shrinks. The
threshold starts at 128 KiB but rises to the size of every mapped block freed (up to 32 MiB):
after the first few freed arrays of a fit, the tens-of-MB temporaries of the next steps come
from the heap and stay in the RSS after they are freed. Measured on a fit of 1000 entities x
38 metrics x 1440 steps (``multiscale``'s calibration pass): a peak RSS of 1578 MB with the
moving threshold, 1250 MB with it fixed at 1 MiB. Fixing it turns the adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: mallopt(3) parameter number of the mmap threshold (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
#: blocks from this size up are mapped apart and returned to the system when freed
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES` for this process; False
    (and nothing changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; freed memory may stay in the RSS")
    return done
