"""Python's cyclic garbage collector while a run starts.

Importing torch, transformers and Flower makes some 600,000 objects that live as long as the
process. CPython runs a full collection whenever its long-lived objects have grown by a
quarter, and each one walks all of them: while ``fedtune run`` imported its engine, 8 full
collections took 1.0 CPU-s of a one-round 1,000-client run's 8.7, and two more, in the first
round and at exit, 0.3 s each - and found 5-35 objects of garbage each (``gc.callbacks`` with
the thread's CPU time; BENCHMARKS.md, "Start-up"). So the imports run with collection paused,
and a process that runs one command and exits then freezes what they made (``gc.freeze``,
CPython's way to keep long-lived start-up objects out of every later collection, the one at
exit included). A caller that shares its process (a test calling ``fedtune.cli.main``) only
pauses: frozen objects are never collected, so their garbage would stay for good.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


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
