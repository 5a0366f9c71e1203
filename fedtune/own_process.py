"""What a process that runs one fedtune command alone sets for itself: Python's cyclic garbage
collector while the engine is imported, and glibc's allocator.

**The collector.** Importing torch, transformers and Flower makes some 600,000 objects that
live as long as the process. CPython runs a full collection whenever its long-lived objects
have grown by a quarter, and each one walks all of them: while ``fedtune run`` imported its
engine, 8 full collections took 1.0 CPU-s of a one-round 1,000-client run's 8.7, and two more,
in the first round and at exit, 0.3 s each - and found 5-35 objects of garbage each
(``gc.callbacks`` with the thread's CPU time). So the imports run with collection paused, and
a process of its own then freezes what they made (``gc.freeze``, CPython's way to keep
long-lived start-up objects out of every later collection, the one at exit included). A
caller that shares its process (a test calling ``fedtune.cli.main``) only pauses: frozen
objects are never collected, so their garbage would stay for good.

**The allocator.** glibc's malloc serves a request above its mmap threshold (128 KiB at
first, raised to the largest block freed, at most 32 MiB) with fresh pages from the kernel,
and gives the top of its heap back beyond its trim threshold (twice the mmap threshold): a
round that allocates and frees its chunks' stacked weights, gradients and sums (megabytes
each) then pays the kernel to zero pages again round after round - 25,000 page faults a
1,000-client synchronous round of the engine benchmark's MLP, about a fifth of its time.
A process of its own sets both thresholds once (``mallopt``, glibc's documented interface,
the same as its ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` variables), so
freed blocks are reused from the heap: blocks below ``MMAP_THRESHOLD`` come from the heap, and
up to ``TRIM_THRESHOLD`` of free heap is kept. Elsewhere (not glibc) nothing is set.
BENCHMARKS.md, "Start-up, the garbage collector and the allocator", has the measurements.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager

MMAP_THRESHOLD = 64 * 2**20  # bytes: larger blocks still get their own mapping
TRIM_THRESHOLD = 2**30  # bytes of free heap kept before any is given back to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h parameter numbers


@contextmanager
def imports_outside_collection(owns_process: bool) -> Iterator[None]:
    """Collection paused for the body (the engine's imports); ``owns_process``: then frozen."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if owns_process:
            gc.freeze()
        if enabled:
            gc.enable()


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (the module doc); False where there is no glibc
    ``mallopt`` or it refused."""
    # the symbols the process already has (libc's among them): no library search
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 on error
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
