"""Misbehaving clients for robustness experiments and tests (the ``[faults]`` config section).

A ``FaultPlan`` says which clients misbehave and how. It is derived from the config alone, so
the server and every client process agree:

- crashes (``crash_probability``): each time a client is asked to train it raises with this
  probability, drawn from (run.seed, round, client); the runtime reports an error reply. With
  secure aggregation the crash may strike at a SecAgg+ stage instead (``crash_stage``: setup or
  share-keys, before the client's input is masked; unmask, after it was summed), so the
  protocol's dropout recovery can be driven by the same draw.
- stragglers (``straggler_fraction``, ``straggler_delay``, ``straggler_delay_s``): a fixed
  set of clients waits before training, a constant or exponentially distributed delay with
  mean ``straggler_delay_s`` drawn per (round, client); with ``strategy.round_timeout_s``
  they become timeouts.
- bad updates, each a fixed set of clients drawn once from ``run.seed`` (the same clients
  every round), applied to the finished reply after honest local training, first that applies:
  NaN (``nan_fraction``: the first floating tensor is all NaN), wrong shape
  (``wrong_shape_fraction``: the first tensor loses its last entry along axis 0).

Well-formed malicious updates (scaling, sign flipping, ALIE, backdoors...) are attacks, not
faults: the ``[attack]`` section (``fedtune.attacks``).

No fault library fits here: Flower and Ray inject no client-level faults, so this is written
by hand, with every draw seeded as the rest of fedtune is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.config import Config

# seed streams of the draws, apart from each other and from the data stages (0xFA17 is the
# attackers', fedtune.attacks.plan)
_NAN_STREAM = 0xFA18
_SHAPE_STREAM = 0xFA19
_STRAGGLER_STREAM = 0xFA1A
_CRASH_STREAM = 0xFA1B
_DELAY_STREAM = 0xFA1C


class InjectedCrash(RuntimeError):
    """A crash ``faults.crash_probability`` asked for."""


def draw_clients(num_clients: int, fraction: float, seed: int, stream: int) -> frozenset[int]:
    """``fraction`` of the clients (rounded half up), drawn from ``seed`` and a stream id."""
    count = int(fraction * num_clients + 0.5)
    if count == 0:  # the usual case: every client message builds a plan, so skip the shuffle
        return frozenset()
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
    return frozenset(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def _round_rng(seed: int, stream: int, server_round: int, client_id: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, server_round, client_id]))


@dataclass(frozen=True)
class FaultPlan:
    """Which clients misbehave, and how."""

    nan_clients: frozenset[int] = frozenset()
    wrong_shape_clients: frozenset[int] = frozenset()
    straggler_clients: frozenset[int] = frozenset()
    straggler_delay: str = "constant"
    straggler_delay_s: float = 0.0
    crash_probability: float = 0.0
    crash_stage: str = "train"
    seed: int = 0

    @classmethod
    def from_config(cls, config: Config) -> FaultPlan:
        f, n, seed = config.faults, config.data.num_clients, config.run.seed
        return cls(
            nan_clients=draw_clients(n, f.nan_fraction, seed, _NAN_STREAM),
            wrong_shape_clients=draw_clients(n, f.wrong_shape_fraction, seed, _SHAPE_STREAM),
            straggler_clients=draw_clients(n, f.straggler_fraction, seed, _STRAGGLER_STREAM),
            straggler_delay=f.straggler_delay,
            straggler_delay_s=f.straggler_delay_s,
            crash_probability=f.crash_probability,
            crash_stage=f.crash_stage,
            seed=seed,
        )

    @property
    def active(self) -> bool:
        """Whether any client misbehaves at all."""
        return bool(self.nan_clients or self.wrong_shape_clients
                    or self.straggler_clients or self.crash_probability)

    def crashes(self, client_id: int, server_round: int) -> bool:
        """Whether ``client_id`` crashes in ``server_round`` (at ``crash_stage``)."""
        if not self.crash_probability:
            return False
        draw = _round_rng(self.seed, _CRASH_STREAM, server_round, client_id).random()
        return bool(draw < self.crash_probability)

    def crashes_at(self, client_id: int, server_round: int, stage: str) -> bool:
        """Whether ``client_id`` crashes at ``stage`` ("train" or a SecAgg+ stage)."""
        return stage == self.crash_stage and self.crashes(client_id, server_round)

    def check_crash(self, client_id: int, server_round: int, stage: str = "train") -> None:
        if self.crashes_at(client_id, server_round, stage):
            where = "" if stage == "train" else f" at {stage}"
            raise InjectedCrash(f"injected fault: client {client_id} crashed in round "
                                f"{server_round}{where} (faults.crash_probability = "
                                f"{self.crash_probability:g})")

    def delay_s(self, client_id: int, server_round: int) -> float:
        """Seconds ``client_id`` waits before training in ``server_round``."""
        if client_id not in self.straggler_clients or not self.straggler_delay_s:
            return 0.0
        if self.straggler_delay == "constant":
            return self.straggler_delay_s
        rng = _round_rng(self.seed, _DELAY_STREAM, server_round, client_id)
        return float(rng.exponential(self.straggler_delay_s))

    def corrupt_update(self, client_id: int, local_arrays: dict[str, np.ndarray]
                       ) -> dict[str, np.ndarray]:
        """What ``client_id`` sends instead of its honest model ``local_arrays``."""
        if client_id in self.nan_clients:
            return _with_first(local_arrays, lambda a: np.full_like(a, np.nan),
                               floating_only=True)
        if client_id in self.wrong_shape_clients:
            return _with_first(local_arrays, lambda a: a.reshape(-1)[:-1] if a.ndim < 2
                               else a[:-1])
        return local_arrays

    def describe(self) -> dict[str, object]:
        """For summary.json: who misbehaved and how."""
        return {"nan_clients": sorted(self.nan_clients),
                "wrong_shape_clients": sorted(self.wrong_shape_clients),
                "straggler_clients": sorted(self.straggler_clients),
                "straggler_delay": self.straggler_delay,
                "straggler_delay_s": self.straggler_delay_s,
                "crash_probability": self.crash_probability,
                "crash_stage": self.crash_stage}


def _with_first(arrays: dict[str, np.ndarray], change, floating_only: bool = False
                ) -> dict[str, np.ndarray]:
    """``arrays`` with ``change`` applied to the first (floating) tensor."""
    changed = dict(arrays)
    for name, value in arrays.items():
        if value.size and (not floating_only or np.issubdtype(value.dtype, np.floating)):
            changed[name] = change(value)
            return changed
    return changed
