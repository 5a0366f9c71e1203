"""What an attacked run measures each round (metrics.csv), beside clean accuracy:

- ``attack_success_rate`` (a backdoor): the share of the triggered global test examples of
  other labels that the new global model classifies as the target label;
- ``malicious_filtered`` / ``benign_filtered``: the true and false positive rates of the
  round's defences, the share of the attackers' / honest clients' updates that screening or
  the update bounds rejected or that a selecting aggregator left out
  (``fedtune.server.filtering``), among the sampled clients that sent an update. An attacker
  counts as malicious only in the rounds it attacks (``attack.start_round``).
"""

from __future__ import annotations

import copy

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedtune import protocol
from fedtune.config import Config
from fedtune.models.weights import load_shared_state
from fedtune.server.phases import TrainPhase
from fedtune.tables import import_object
from fedtune.tables.strategies import STRATEGIES
from fedtune.task import TaskResources
from fedtune.train import evaluate

ATTACK_COLUMNS = ("attack_success_rate", "malicious_filtered", "benign_filtered")


def aggregated_updates(resources: TaskResources, train: TrainPhase) -> list[RecordDict]:
    """Copies of the replies a selecting aggregator is about to see, taken before it does (an
    aggregator may consume them: Flower's trimmed mean pops their arrays); none without an
    attack, for an aggregator that selects nothing, or for a cohort summed where it ran."""
    entry = STRATEGIES[resources.config.strategy.name]
    ok = sum(row.status == "ok" for row in train.rows)
    if not (resources.attack.active and entry.filters and train.replies
            and len(train.replies) == ok):
        return []
    return [copy.deepcopy(reply.content) for reply in train.replies]


def filtered_clients(config: Config, strategy: Strategy, train: TrainPhase,
                     aggregated: list[RecordDict]) -> dict[int, bool]:
    """Client id -> whether its update was filtered, for every sampled client that sent one
    (``aggregated``: what ``aggregated_updates`` copied)."""
    filtered = {row.client_id: row.status == "rejected" for row in train.rows
                if row.client_id is not None and row.status in ("ok", "rejected")}
    if aggregated:
        entry = STRATEGIES[config.strategy.name]
        flags = import_object(entry.filters)(strategy, aggregated, config)
        for content, flag in zip(aggregated, flags, strict=True):
            record = next(r for r in content.values() if isinstance(r, MetricRecord))
            client = int(record[protocol.PARTITION_ID])
            filtered[client] = filtered.get(client, False) or bool(flag)
    return filtered


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def attack_columns(resources: TaskResources, strategy: Strategy, server_round: int,
                   train: TrainPhase, aggregated: list[RecordDict], arrays: ArrayRecord
                   ) -> dict[str, float | None]:
    """The round's attack columns (empty without an attack); ``arrays``: the new model."""
    plan = resources.attack
    if not plan.active:
        return {}
    filtered = filtered_clients(resources.config, strategy, train, aggregated)
    malicious = [f for c, f in filtered.items() if plan.attacks(c, server_round)]
    benign = [f for c, f in filtered.items() if not plan.attacks(c, server_round)]
    success = None
    loader = resources.triggered_test_loader()
    if loader is not None:
        load_shared_state(resources.model, protocol.to_numpy(arrays))
        success = evaluate(resources.model, loader, resources.device).accuracy
    return {"attack_success_rate": success, "malicious_filtered": _share(malicious),
            "benign_filtered": _share(benign)}
