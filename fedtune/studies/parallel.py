"""Run a sweep's points side by side: each in a child process that runs it in process.

``run_points`` hands the configs to a pool of ``workers`` child processes and reports each
point as it finishes. The children are forked from Python's fork server, which imports
fedtune's runtimes (torch, Flower) once before it forks (``forkserver`` with preload): a
child starts in a fraction of a second, without the parent's threads or Ray state, where a
``spawn``ed child would import everything again. A child keeps its resident data between points
(``fedtune.task``), so a grid of small runs pays the data start-up once per worker. Points are whole runs
with their own run directories; nothing is shared between children but the disk caches of
encoded inputs. A point that raises stops the sweep: points not started are cancelled, the
ones running finish, and the error is raised again (what finished is on disk already).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from fedtune.config import Config, ConfigError
from fedtune.tables.runtimes import RUNTIMES

# what the fork server imports before it forks a child: the runtimes a parallel point may use
PRELOAD = ["fedtune.engine.launch", "fedtune.engine.inprocess", "fedtune.engine.centralized"]


def check_parallel(workers: int, configs: Sequence[Config]) -> None:
    """``--parallel N``: a positive count, and runtimes that compute in their own process (a
    Ray runtime per child would start one Ray cluster per child on the same cores)."""
    if workers < 1:
        raise ConfigError(f"--parallel {workers} is not allowed: must be an integer >= 1")
    if workers == 1:
        return
    for config in configs:
        if not RUNTIMES[config.engine.backend].in_process:
            here = [name for name, entry in RUNTIMES.items() if entry.in_process]
            raise ConfigError(
                f"--parallel {workers} is not allowed with engine.backend = "
                f"{config.engine.backend!r}: must be 1, or set engine.backend to one of "
                + ", ".join(repr(b) for b in here)
                + " (each parallel point runs in its own process)")


def run_points(configs: Sequence[Config], run_one: Callable[[Config], Any], workers: int,
               on_done: Callable[[int], None]) -> None:
    """``run_one(configs[i])`` for every i, ``workers`` at a time in child processes;
    ``on_done(i)`` in this process as each finishes. ``run_one`` must be importable by name
    (a module-level function), as the children import it."""
    if not configs:
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, run_one.__module__])
    with ProcessPoolExecutor(max_workers=min(workers, len(configs)),
                             mp_context=context) as pool:
        pending: dict[Future, int] = {pool.submit(run_one, config): index
                                      for index, config in enumerate(configs)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    future.result()  # a point's error stops the sweep here
                    on_done(index)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
