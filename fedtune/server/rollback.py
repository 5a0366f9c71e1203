"""A strategy's state before it aggregates, to put back when the guard refuses the aggregate.

Flower's strategies change their own state while they aggregate (FedAvgM's momentum and
current model, FedAdam's moments, SCAFFOLD's control variate, FedDyn's h). When the round then
keeps the old global model, that state must be what it was, or the next round starts from a
server step that never happened. ``Snapshot.of`` records every attribute of the strategy (and of
any strategy it wraps, SecAgg+'s inner one): the value itself, a copy of a plain ``dict`` or
``list`` (strategies replace their items) and of an array; ``restore`` sets them back and
drops attributes added since. Objects held otherwise are shared, so what a strategy changes
inside them in place stays changed (a strategy must replace, not modify, the arrays of its
state; every one in ``strategies/`` and Flower's do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy


def _kept(value: Any) -> Any:
    if type(value) is dict:
        return dict(value)
    if type(value) is list:
        return list(value)
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


@dataclass
class Snapshot:
    """The attributes of one strategy object at one time."""

    target: Any
    values: dict[str, Any]
    inner: list[Snapshot] = field(default_factory=list)

    @classmethod
    def of(cls, strategy: Strategy) -> Snapshot:
        values = dict(vars(strategy))
        inner = [cls.of(value) for value in values.values() if isinstance(value, Strategy)]
        return cls(strategy, {name: _kept(value) for name, value in values.items()}, inner)

    def restore(self) -> None:
        attributes = vars(self.target)
        for name in set(attributes) - set(self.values):
            del attributes[name]
        attributes.update({name: _kept(value) for name, value in self.values.items()})
        for snapshot in self.inner:
            snapshot.restore()
