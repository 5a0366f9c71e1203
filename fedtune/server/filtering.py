"""Which updates a robust aggregator left out of a round, for the screening rates of an
attacked run (``attack_metrics``). One function per strategy that selects, named by its table
entry (``StrategyEntry.filters``): ``(strategy, contents, config) -> filtered`` over the
replies it aggregated, in their order. What "filtered" means per aggregator:

- Krum / Multi-Krum: not among the updates it selected (Flower's own ``select_multikrum``, the
  selection the strategy made);
- trimmed mean: more than half of the update's coordinates lie outside the range of the values
  kept (each tail ``int(beta n)`` values, as scipy's ``trim_mean`` cuts), counting only the
  coordinates where the updates differ (a value tied with a kept one was not cut off);
- FLTrust: a trust score of 0 (its direction disagrees with the server's root update);
- FLAME: outside the majority cluster of its HDBSCAN (``Flame.admitted``).

Other aggregators weigh every update they are given (a median mixes them coordinate by
coordinate), so only screening and the update bounds filter there.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedtune.config import Config
from fedtune.tables.strategies import strategy_arguments


def _stacked(contents: list[RecordDict]) -> np.ndarray:
    rows = []
    for content in contents:
        record = next(iter(content.array_records.values()))
        rows.append(np.concatenate([a.numpy().ravel() for a in record.values()]))
    return np.stack(rows).astype(np.float64)


def krum_filtered(strategy: Strategy, contents: list[RecordDict], config: Config
                  ) -> list[bool]:
    """The updates Krum / Multi-Krum did not select."""
    arguments = strategy_arguments(config)
    selected = select_multikrum(contents, arguments["num_malicious_nodes"],
                                arguments.get("num_nodes_to_select", 1))
    chosen = {id(content) for content in selected}
    return [id(content) not in chosen for content in contents]


def trimmed_filtered(strategy: Strategy, contents: list[RecordDict], config: Config
                     ) -> list[bool]:
    """The updates whose coordinates were mostly cut by the trimmed mean."""
    values = _stacked(contents)
    n = len(values)
    cut = int(config.strategy.trim_beta * n)
    varying = values.min(axis=0) < values.max(axis=0)
    if cut == 0 or not varying.any():
        return [False] * n
    values = values[:, varying]
    ordered = np.sort(values, axis=0)
    trimmed = (values < ordered[cut]) | (values > ordered[n - cut - 1])
    return [bool(share > 0.5) for share in trimmed.mean(axis=1)]


def fltrust_filtered(strategy: Strategy, contents: list[RecordDict], config: Config
                     ) -> list[bool]:
    """The updates FLTrust gave no trust (its scores of the round, ``FLTrust.trust``)."""
    trust = getattr(strategy, "trust", ())
    return [bool(score == 0) for score in trust] if len(trust) == len(contents) else \
        [False] * len(contents)


def flame_filtered(strategy: Strategy, contents: list[RecordDict], config: Config
                   ) -> list[bool]:
    """The updates FLAME's clustering left out (``Flame.admitted`` of the round)."""
    admitted = getattr(strategy, "admitted", ())
    return [not bool(a) for a in admitted] if len(admitted) == len(contents) else \
        [False] * len(contents)
