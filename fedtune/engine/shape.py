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
"""

from __future__ import annotations

from fedtune.config import Config
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
    Ray (the rule in the module docstring)."""
    e = config.engine
    if e.num_actors or e.ray_address or e.client_gpus > 0:
        return False
    return largest_cohort(config) < e.actor_min_cohort
