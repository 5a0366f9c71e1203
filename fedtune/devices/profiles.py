"""Every client's device as arrays (one entry per client, no per-client objects), and the
parametric profile.

``DeviceProfiles`` holds compute speed (seconds per training example), up- and download
bandwidth (bytes per second) and availability. Availability is either diurnal (a window of
``fraction`` of each virtual day, starting at a random phase per device: devices charge and
idle at night in their own time zone: Bonawitz et al. 2019, "Towards federated learning at
scale", report the daily cycle of eligible devices) or a set of periodic
intervals per client (FedScale's behaviour traces, ``fedtune.devices.trace``). Every query is
vectorised over client indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.config import Config

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class Diurnal:
    """Client i is available while ``(t / day_s + phase[i]) mod 1 < fraction``."""

    phase: np.ndarray  # float64[n], in [0, 1)
    fraction: float
    day_s: float

    def _position(self, clients: np.ndarray, t: float) -> np.ndarray:
        return np.mod(t / self.day_s + self.phase[clients], 1.0)

    def available(self, clients: np.ndarray, t: float) -> np.ndarray:
        if self.fraction >= 1:
            return np.ones(len(clients), dtype=bool)
        return self._position(clients, t) < self.fraction

    def online_until(self, clients: np.ndarray, t: float) -> np.ndarray:
        """When each (available) client's window closes."""
        if self.fraction >= 1:
            return np.full(len(clients), np.inf)
        return t + (self.fraction - self._position(clients, t)) * self.day_s

    def next_available(self, clients: np.ndarray, t: float) -> np.ndarray:
        """When each client's window next opens (``t`` for one available now)."""
        if self.fraction >= 1:
            return np.full(len(clients), float(t))
        position = self._position(clients, t)
        return np.where(position < self.fraction, t, t + (1.0 - position) * self.day_s)


@dataclass(frozen=True)
class Intervals:
    """Client i is available during ``[start, end)`` intervals repeating every ``period[i]``
    seconds. The intervals of all clients are one sorted array keyed by
    ``client × span + start``, so a query is one ``searchsorted`` for all clients."""

    keys: np.ndarray  # float64[m]: client index × span + interval start, sorted
    ends: np.ndarray  # float64[m]: interval end (within the period)
    owner: np.ndarray  # int64[m]: the client each interval belongs to
    period: np.ndarray  # float64[n]
    span: float  # greater than every period

    def _current(self, clients: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(position in the period, index of the last interval starting at or before it)."""
        position = np.mod(t, self.period[clients])
        index = np.searchsorted(self.keys, clients * self.span + position, side="right") - 1
        return position, index

    def available(self, clients: np.ndarray, t: float) -> np.ndarray:
        position, index = self._current(clients, t)
        safe = np.maximum(index, 0)
        return (index >= 0) & (self.owner[safe] == clients) & (position < self.ends[safe])

    def online_until(self, clients: np.ndarray, t: float) -> np.ndarray:
        position, index = self._current(clients, t)
        return t + self.ends[np.maximum(index, 0)] - position

    def next_available(self, clients: np.ndarray, t: float) -> np.ndarray:
        position, index = self._current(clients, t)
        following = index + 1
        safe = np.minimum(following, len(self.keys) - 1)
        same = (following < len(self.keys)) & (self.owner[safe] == clients)
        first = np.searchsorted(self.keys, clients * self.span, side="left")
        wrap = self.keys[first] - clients * self.span + self.period[clients] - position
        start_in_period = np.where(same, self.keys[safe] - clients * self.span - position, wrap)
        return np.where(self.available(clients, t), t, t + start_in_period)

    @classmethod
    def build(cls, starts: list[np.ndarray], ends: list[np.ndarray],
              period: np.ndarray) -> Intervals:
        """From each client's sorted interval starts and ends within its period."""
        span = float(period.max()) * 2 + 1
        owner = np.concatenate([np.full(len(s), i, dtype=np.int64) for i, s in enumerate(starts)])
        keys = np.concatenate(starts) + owner * span
        return cls(keys, np.concatenate(ends).astype(np.float64), owner,
                   period.astype(np.float64), span)


@dataclass(frozen=True)
class DeviceProfiles:
    """Every client's device, indexed by client id."""

    seconds_per_example: np.ndarray  # float64[n]
    up_bytes_per_s: np.ndarray  # float64[n]
    down_bytes_per_s: np.ndarray  # float64[n]
    availability: Diurnal | Intervals
    arrival_rate: float = 0.0  # asynchronous runs: Poisson arrivals per virtual second

    @property
    def num_clients(self) -> int:
        return len(self.seconds_per_example)


def device_rng(config: Config) -> np.random.Generator:
    """The generator every device draw comes from: (run.seed, devices.seed) only."""
    return np.random.default_rng([config.run.seed, config.devices.seed, 28])


def lognormal_profiles(config: Config, num_clients: int) -> DeviceProfiles:
    """Log-normal compute time per example around ``speed_median_s``, a ``slow_fraction`` of
    devices ``slowdown`` times slower (heavy tails of real fleets: FedScale's capacity traces
    span orders of magnitude), log-normal bandwidths around their medians, and a diurnal
    window of ``available_fraction`` of each day at a uniform random phase."""
    d, rng = config.devices, device_rng(config)
    speed = d.speed_median_s * rng.lognormal(0.0, d.speed_sigma, num_clients)
    slow = rng.permutation(num_clients)[:round(d.slow_fraction * num_clients)]
    speed[slow] *= d.slowdown
    up = d.up_mbps * MBIT * rng.lognormal(0.0, d.bandwidth_sigma, num_clients)
    down = d.down_mbps * MBIT * rng.lognormal(0.0, d.bandwidth_sigma, num_clients)
    phase = rng.random(num_clients)
    return DeviceProfiles(speed, up, down, Diurnal(phase, d.available_fraction, d.day_s),
                          d.arrival_rate)
