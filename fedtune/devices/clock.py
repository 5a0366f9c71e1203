"""The virtual clock: how long each client's work takes on its device, and when clients are
there to be asked.

A client's virtual duration is its compute - the examples it trains × its seconds per example
- plus the bytes it moves over its bandwidth (the model down, its update up): FedScale's
model of a client's round (Lai et al. 2022), and FLSim's for its asynchronous trainer.
The examples a client trains are known before it trains (``planned_examples``: local_steps
batches cycling through its data, or local_epochs passes; under local DP's Poisson sampling
their expectation), so the clock can order events before anyone trains: who makes a round's
deadline, which update an asynchronous server receives next. Training runs at full speed; the
clock only orders and times events. Every query is vectorised over client indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.config import Config
from fedtune.devices.profiles import DeviceProfiles, Diurnal
from fedtune.tables.devices import DEVICE_PROFILES


class NeverAvailable(RuntimeError):
    """Fewer clients than a round needs are ever available at the same time."""


def planned_examples(config: Config, train_sizes: np.ndarray) -> np.ndarray:
    """Examples each client trains per task, as ``fedtune.train`` draws its batches: with
    ``local_steps`` S and batches of b = min(batch_size, n), S // ceil(n / b) whole passes
    plus S mod ceil(n / b) full batches; with ``local_epochs`` E, E × n."""
    n = np.maximum(train_sizes.astype(np.int64), 1)
    c = config.client
    if not c.local_steps:
        return c.local_epochs * n
    batch = np.minimum(c.batch_size, n)
    per_pass = -(-n // batch)
    return (c.local_steps // per_pass) * n + (c.local_steps % per_pass) * batch


@dataclass(frozen=True)
class VirtualClock:
    """Every client's device and planned work."""

    profiles: DeviceProfiles
    examples: np.ndarray  # int64[n]: what each client trains per task

    @classmethod
    def for_config(cls, config: Config, train_sizes: np.ndarray) -> VirtualClock:
        """The devices the config's profile draws for clients with these training sizes
        (``devices.profile = 'none'``: instant, always available devices)."""
        entry, n = DEVICE_PROFILES[config.devices.profile], len(train_sizes)
        profiles = entry.load()(config, n) if entry.implementation else DeviceProfiles(
            np.zeros(n), np.full(n, np.inf), np.full(n, np.inf), Diurnal(np.zeros(n), 1.0, 1.0))
        return cls(profiles, planned_examples(config, train_sizes))

    def durations(self, clients: np.ndarray, bytes_down: int, bytes_up: int) -> np.ndarray:
        """Virtual seconds each client's task takes: compute, then the transfers."""
        p = self.profiles
        return (self.examples[clients] * p.seconds_per_example[clients]
                + bytes_down / p.down_bytes_per_s[clients] + bytes_up / p.up_bytes_per_s[clients])

    def available(self, clients: np.ndarray, t: float) -> np.ndarray:
        return self.profiles.availability.available(clients, t)

    def online_until(self, clients: np.ndarray, t: float) -> np.ndarray:
        """When each client (available at ``t``) goes offline."""
        return self.profiles.availability.online_until(clients, t)

    def next_available(self, clients: np.ndarray, t: float) -> np.ndarray:
        return self.profiles.availability.next_available(clients, t)

    def first_time_with(self, needed: int, t: float) -> float:
        """The first time from ``t`` at which at least ``needed`` clients are available: the
        count rises only when a window opens, so only those times are tried."""
        everyone = np.arange(self.profiles.num_clients)
        if needed > len(everyone):
            raise NeverAvailable(f"{needed} clients needed, the federation has {len(everyone)}")
        if self.available(everyone, t).sum() >= needed:
            return t
        horizon = t
        for _ in range(4):  # windows repeat every period: a few periods settle it
            openings = np.unique(self.next_available(everyone, horizon))
            for moment in openings + 1e-6:  # just inside the window (float rounding)
                if self.available(everyone, float(moment)).sum() >= needed:
                    return float(moment)
            horizon = float(openings.max()) + 1e-6
        raise NeverAvailable(f"fewer than {needed} of {len(everyone)} clients are ever "
                             "available at the same time")
