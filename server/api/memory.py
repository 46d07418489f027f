"""Memory that a finished decode frees goes back to the system, not to the process's heap.

glibc serves allocations above its mmap threshold with their own mappings, unmapped when
freed; but after each such free it raises the threshold (up to 32 MB), so Pillow's
image blocks (up to 16 MB) soon come from the heaps of the worker threads instead, and
their memory stays with the process after every large decode, heap by heap. A fixed
threshold keeps large buffers mapped and returned at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MB (setting it turns off its adjustment); False where not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        done = bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):
        done = False
    if not done:
        log.info("could not fix the malloc mmap threshold (not glibc?): freed decode memory may stay with the process")
    return done


def trim_freed_memory() -> bool:
    """Hand the free memory of every malloc heap back to the system (glibc's malloc_trim):
    after a burst of slide searches the worker threads' heaps hold tens of MB each of freed
    small blocks (OpenSlide's and Pillow's), which the mmap threshold does not cover. Called
    when the slide queue empties; a few ms."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
