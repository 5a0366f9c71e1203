"""Who attacks, from which round, with whom (``[attack]``), derived from the config alone so
that the server and every client process agree; and what an update attack is given.

Attackers are drawn once from ``run.seed`` (``attack.fraction`` or ``attack.count``) or named
(``attack.clients``); they attack every round from ``attack.start_round`` on in which they are
sampled. Colluders (``attack.collude``: groups of that many attackers in id order, 0 = one
group) share their data: a colluder of an attack that needs the round's honest updates trains
every member of its group honestly and derives its update from theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.config import Config, clients_per_round
from fedtune.tables.attacks import ATTACKS, AttackEntry

# the stream the attackers are drawn from: [faults] scale_fraction's before the attacks came,
# so a scaling attack by fraction picks the clients it always picked
ATTACKER_STREAM = 0xFA17
_ROUND_STREAM = 0xA77C


def draw_attackers(num_clients: int, count: int, seed: int) -> tuple[int, ...]:
    """``count`` distinct clients drawn from ``seed``, sorted."""
    if count == 0:
        return ()
    rng = np.random.default_rng(np.random.SeedSequence([seed, ATTACKER_STREAM]))
    return tuple(sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False)))


@dataclass(frozen=True)
class AttackPlan:
    """The run's attack: its name, the attackers, their collusion groups, the first round."""

    name: str = "none"
    attackers: tuple[int, ...] = ()
    groups: tuple[tuple[int, ...], ...] = ()
    start_round: int = 1
    settings: dict[str, Any] = field(default_factory=dict)  # the [attack] section's keys

    @classmethod
    def from_config(cls, config: Config) -> AttackPlan:
        a, n = config.attack, config.data.num_clients
        if not ATTACKS[a.name].attacks:
            return cls()
        if a.clients:
            attackers = tuple(sorted(a.clients))
        else:
            attackers = draw_attackers(n, a.count or int(a.fraction * n + 0.5), config.run.seed)
        size = a.collude or len(attackers)
        groups = tuple(attackers[i:i + size] for i in range(0, len(attackers), size))
        return cls(a.name, attackers, groups, a.start_round, dict(vars(a)))

    @property
    def entry(self) -> AttackEntry:
        return ATTACKS[self.name]

    @property
    def active(self) -> bool:
        return bool(self.attackers)

    def attacks(self, client_id: int, server_round: int) -> bool:
        """Whether ``client_id`` attacks in ``server_round``."""
        return server_round >= self.start_round and client_id in self.attackers

    def group_of(self, client_id: int) -> tuple[int, ...]:
        """The collusion group of attacker ``client_id``."""
        return next(group for group in self.groups if client_id in group)

    def describe(self) -> dict[str, Any]:
        """For summary.json: who attacked, how, from when, with what it saw."""
        if not self.active:
            return {"name": "none"}
        entry = self.entry
        owned = {k: self.settings[k] for k in entry.keys}
        return {"name": self.name, "help": entry.help, "acts_on": entry.acts_on,
                "attackers": list(self.attackers), "start_round": self.start_round,
                "groups": [list(g) for g in self.groups], "settings": owned,
                "colluders_see": entry.sees or "only their own data and update"}


@dataclass
class UpdateContext:
    """What an update attack is given besides its own honest update."""

    settings: dict[str, Any]  # the [attack] section's keys
    rng: np.random.Generator  # seeded by (run.seed, round, client)
    clients_per_round: int
    attackers_per_round: float  # expected attackers among them
    benign: list[dict[str, np.ndarray]] = field(default_factory=list)  # the group's honest ones


def update_context(config: Config, plan: AttackPlan, server_round: int, client_id: int,
                   benign: list[dict[str, np.ndarray]]) -> UpdateContext:
    """The context of ``client_id``'s update attack in ``server_round``."""
    rng = np.random.default_rng(np.random.SeedSequence(
        [config.run.seed, _ROUND_STREAM, server_round, client_id]))
    per_round = clients_per_round(config)
    share = len(plan.attackers) / config.data.num_clients
    return UpdateContext(plan.settings, rng, per_round, max(1.0, share * per_round), benign)


def stacked(updates: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Updates as rows of one float64 matrix (their tensors, flattened in order)."""
    width = sum(v.size for v in updates[0].values())
    matrix = np.empty((len(updates), width))
    for row, update in zip(matrix, updates, strict=True):
        start = 0
        for value in update.values():
            row[start:start + value.size] = value.ravel()
            start += value.size
    return matrix


def unflattened(vector: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``vector`` cut back into tensors shaped as ``like``."""
    out, start = {}, 0
    for name, value in like.items():
        out[name] = vector[start:start + value.size].reshape(value.shape)
        start += value.size
    return out


def normal_quantile(p: float) -> float:
    """The standard normal's quantile (inverse CDF) at ``p`` (scipy's ``norm.ppf``)."""
    from scipy.stats import norm

    return float(norm.ppf(p)) if 0 < p < 1 else (math.inf if p >= 1 else -math.inf)
