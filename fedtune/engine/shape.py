"""The Ray runtime's shape, picked from the work before anything starts: Ray actors, or every
client in this process.

Actors pay a fixed price: Ray's own processes, and per actor a process that imports torch,
transformers and Flower and loads the data and one model. For the main job (README: MiniLM,
8 clients, 2 trained and 2 evaluated a round, 3 rounds on 2 cores) that was ~30 % of the wall
time and the run cost 80-94 CPU-s and 8.5 GB against 57 CPU-s and 1.8 GB in process, with the
same result (issue 30); two clients side by side do not pay the start back. A 100-client MLP
round, by contrast, is level or faster on the actors once they run (BENCHMARKS.md). So a run
whose largest phase holds fewer than ``engine.actor_min_cohort`` clients runs in process,
with the actors' threads and the same blocks (the same bits as on actors,
``fedtune.engine.ray_grid``); a run that names its actors (``engine.num_actors``), joins a
cluster (``engine.ray_address``) or gives clients GPUs (``engine.client_gpus``) always gets
actors: the user asked for them.

How many actors, when ``engine.num_actors`` is 0 (``default_actors``): one per
``engine.client_cpus`` of the local machine's CPUs but one, which the driver keeps. The driver
is never idle: it builds a round's messages, reports and evaluation and, with Ray's raylet and
GCS beside it, costs about 0.1 CPU-ms per client-round at 1,000 MLP clients, a fifth of what the
actors' training costs (BENCHMARKS.md, "Clients trained together"). Actors on every core fight
it for them. On this project's 2-core machine a 1,000-client MLP round cost 0.63 CPU-ms per
client-round with 2 actors and 0.565 with 1 (alternated, issue 30; 0.595 against 0.475 under
heavier load, where the one actor's rounds were faster too: 1.06 against 1.34 s; on a quieter
machine (load 2.5-5) two actors' rounds were 10-15 % faster). Two actors each pay more for the
same chunks (their ~34 MB of stacked weights, gradients and moments evict each other from the 32
MB L3 the cores share: likely, not proven), and one actor spreads nothing, so ``RayGrid`` runs a
phase's blocks in the driver once a client's time is known (``ray_grid.RayGrid._in_driver``),
without a Ray call. The count never changes a result: blocks, chunks and the order in which
block sums are added depend on the cohort alone (``fedtune.engine.cohort``). On a cluster
(``engine.ray_address``: the driver may run elsewhere) and for GPU actors every CPU serves
actors, as before; ``engine.num_actors`` set always wins.

A default pool of one local CPU actor starts no actor (``local_pool_is_one``): one actor
spreads nothing, ``RayGrid`` already runs every phase after a kind's first in the driver, so the
actor and Ray's processes (raylet, GCS, idle workers) are pure overhead, and Ray's start-up
costs ~25 CPU-s. At 1,000 MLP clients on 2 cores the one-actor Ray run cost 0.440 CPU-ms per
client-round against 0.420 in process (BENCHMARKS.md, "Clients trained together"). So
``engine.backend = "ray"`` with ``engine.num_actors = 0`` on a machine where the pool would be
one actor (2 CPUs or fewer at ``engine.client_cpus = 1``) is the in-process run, whatever the
cohort; ``engine.num_actors = 1`` still starts one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from fedtune.config import Config, ConfigError
from fedtune.tables.strategies import clients_per_round


def largest_cohort(config: Config) -> int:
    """The most clients one phase of a round sends work to: Flower's sample sizes of the train
    and the federated evaluate phase."""
    s, clients = config.strategy, config.data.num_clients
    evaluates = s.fraction_evaluate > 0 and config.data.local_test_fraction > 0
    evaluated = max(int(clients * s.fraction_evaluate), 1) if evaluates else 0
    return max(clients_per_round(config), evaluated)


def runs_in_process(config: Config) -> bool:
    """Whether the ``ray`` runtime runs this config's clients in process instead of starting
    Ray: a cohort under ``engine.actor_min_cohort``, or a default pool of one local actor
    (the rules in the module docstring)."""
    e = config.engine
    if e.num_actors or e.ray_address or e.client_gpus > 0:
        return False
    return largest_cohort(config) < e.actor_min_cohort or local_pool_is_one(config)


def actors_in(amount: float, per_actor: float) -> int:
    """How many actors that each take ``per_actor`` of a resource (CPUs, a GPU fraction) fit
    in ``amount`` of it, a float's rounding aside (0.3 CPUs hold 3 actors of 0.1 CPU, though
    0.3 / 0.1 is 2.9999999999999996)."""
    return math.floor(amount / per_actor + 1e-9)


def local_cpus() -> int:
    """The CPUs a local Ray session is started with (``fedtune.engine.ray_pool.ray_session``),
    so the CPUs ``default_actors`` shares out on this machine."""
    return os.cpu_count() or 1


def local_pool_is_one(config: Config) -> bool:
    """Whether the default pool (``engine.num_actors = 0``, local CPU actors) would hold
    exactly one actor here: ``pool_size`` over ``local_cpus``. A machine too small for even
    one actor is not one: ``pool_size`` says why when the run starts Ray."""
    try:
        return pool_size(config, {"CPU": local_cpus()}) == 1
    except ConfigError:
        return False


DRIVER_CPUS = 1  # CPUs of the local machine the driver keeps when the engine sizes the pool


def default_actors(config: Config, cluster: Mapping[str, float], fits: int) -> int:
    """How many actors the engine starts when ``engine.num_actors`` is 0, out of the ``fits``
    the ``cluster``'s resources hold: one per ``engine.client_cpus`` of the CPUs the driver
    leaves (``DRIVER_CPUS``), at least one; all of them on a cluster or for GPU actors (the
    rule in the module docstring)."""
    e = config.engine
    if e.ray_address or e.client_gpus > 0:
        return fits
    left = actors_in(cluster.get("CPU", 0) - DRIVER_CPUS, e.client_cpus)
    return max(1, min(fits, left))


def pool_size(config: Config, cluster: Mapping[str, float]) -> int:
    """engine.num_actors, or as many actors as the cluster's CPUs (and GPUs) hold but for the
    local driver's CPU (``default_actors``); never more than there are clients. An impossible
    request stops the run before anything starts."""
    e = config.engine
    fits = actors_in(cluster.get("CPU", 0), e.client_cpus)
    if e.client_gpus > 0:
        fits = min(fits, actors_in(cluster.get("GPU", 0), e.client_gpus))
    if fits < 1 or e.num_actors > fits:
        asked = e.num_actors or 1
        raise ConfigError(
            f"engine.num_actors = {asked} is not allowed here: the Ray cluster has "
            f"{cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs, room for {fits} "
            f"actors of engine.client_cpus = {e.client_cpus:g} and engine.client_gpus = "
            f"{e.client_gpus:g}"
        )
    return min(e.num_actors or default_actors(config, cluster, fits), config.data.num_clients)
