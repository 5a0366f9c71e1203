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


def aggregated_updates(resources: TaskResources, train: TrainPhase
                       ) -> list[tuple[int, RecordDict]]:
    """(client id, a copy of its reply) for every update a selecting aggregator is about to
    see, taken before it does (an aggregator may consume a reply: Flower's trimmed mean pops
    its arrays); none without an attack, or for an aggregator that selects nothing."""
    entry = STRATEGIES[resources.config.strategy.name]
    if not (resources.attack.active and entry.filters):
        return []
    copies = []
    for report in train.accepted_reports:
        if report.reply is not None:
            content = copy.deepcopy(report.reply.content)
        elif report.update is not None:
            content = RecordDict({name: protocol.to_array_record(arrays)
                                  for name, arrays in report.update.items()})
            content[protocol.METRICS] = MetricRecord(dict(report.metrics))
        else:  # summed where the clients ran: no single update to judge
            return []
        copies.append((report.client_id, content))
    return copies


def filtered_clients(config: Config, strategy: Strategy, train: TrainPhase,
                     aggregated: list[tuple[int, RecordDict]]) -> dict[int, bool]:
    """Client id -> whether its update was filtered, for every sampled client that sent one
    (``aggregated``: what ``aggregated_updates`` copied)."""
    filtered = {r.client_id: r.status == "rejected" for r in train.reports
                if r.client_id is not None and r.status in ("ok", "rejected")}
    if aggregated:
        entry = STRATEGIES[config.strategy.name]
        flags = import_object(entry.filters)(strategy, [c for _, c in aggregated], config)
        for (client, _), flag in zip(aggregated, flags, strict=True):
            filtered[client] = filtered.get(client, False) or bool(flag)
    return filtered


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def attack_columns(resources: TaskResources, strategy: Strategy, server_round: int,
                   train: TrainPhase, aggregated: list[tuple[int, RecordDict]],
                   arrays: ArrayRecord
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
