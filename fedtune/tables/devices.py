"""Every device profile fedtune simulates, one entry each (``devices.profile``).

A profile gives each client a device: its compute speed (seconds per training example), its
up- and download bandwidth and when it is available. The virtual clock
(``fedtune.devices.clock``) turns that into each client's virtual duration - the examples it
trains times its speed, plus the bytes it moves over its bandwidth - which orders and times
the run's events: who finishes before a round's deadline, which updates an asynchronous
strategy receives first. Training itself runs at full speed.

- ``none``: no devices; every client is equally fast and always there (fedtune's default).
- ``lognormal``: parametric devices drawn from the config's seed: log-normal speeds, a
  fraction of slow devices, log-normal bandwidths, diurnal availability windows.
- ``trace``: FedScale's device traces (Lai et al., OSDI 2022): a capacity file (each client's
  ``computation`` in ms per example and ``communication`` in kbit/s) and an optional
  availability file (``active`` / ``inactive`` times, repeating every ``finish_time``).

Adding a profile: write a ``(config, num_clients) -> DeviceProfiles`` function in
``fedtune/devices/`` and add one entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError
from fedtune.tables import Entry, Key
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.runtimes import RUNTIMES
from fedtune.tables.strategies import STRATEGIES

if TYPE_CHECKING:
    from fedtune.config import Config


@dataclass(frozen=True)
class DeviceProfileEntry(Entry):
    """One profile: ``implementation`` draws every client's device ("" = no devices)."""

    check: Callable[[Config], None] | None = None


ARRIVAL_RATE = Key(
    0.0, "asynchronous strategies: new clients arrive as a Poisson process of this many per "
         "virtual second (while fewer than strategy.concurrency train); 0 = a client starts "
         "whenever one finishes", ge=0)


def _check_trace(config: Config) -> None:
    if not config.devices.trace_file:
        raise ConfigError("devices.trace_file = '' is not allowed with devices.profile = "
                          "'trace': must name a FedScale device capacity file (pickle or JSON)")


DEVICE_PROFILES: dict[str, DeviceProfileEntry] = {
    "none": DeviceProfileEntry("no devices: every client equally fast and always available"),
    "lognormal": DeviceProfileEntry(
        "parametric devices drawn from run.seed and devices.seed: log-normal speed and "
        "bandwidth, a fraction of slow devices, diurnal availability",
        keys={
            "speed_median_s": Key(0.01, "median compute time per training example, seconds",
                                  gt=0),
            "speed_sigma": Key(0.5, "log-normal sigma of the compute time per example", ge=0),
            "slow_fraction": Key(0.0, "fraction of devices that are slower still", ge=0, le=1),
            "slowdown": Key(10.0, "how many times slower a slow device computes", ge=1),
            "up_mbps": Key(2.0, "median upload bandwidth, Mbit/s", gt=0),
            "down_mbps": Key(20.0, "median download bandwidth, Mbit/s", gt=0),
            "bandwidth_sigma": Key(0.5, "log-normal sigma of the bandwidths", ge=0),
            "available_fraction": Key(
                1.0, "diurnal availability: the share of each virtual day a device is "
                     "available (a window at a random time of its day); 1 = always", gt=0,
                le=1),
            "day_s": Key(86400.0, "length of a virtual day, seconds", gt=0),
            "arrival_rate": ARRIVAL_RATE,
        },
        implementation="fedtune.devices.profiles:lognormal_profiles"),
    "trace": DeviceProfileEntry(
        "FedScale's device traces: client i takes the i-th client of the files (sorted by id, "
        "repeating when the files hold fewer)",
        keys={
            "trace_file": Key("", "FedScale client device capacity file (pickle or JSON): "
                                  "client id -> {computation: ms per example, communication: "
                                  "kbit/s}"),
            "availability_file": Key("", "FedScale client behaviour trace (pickle or JSON): "
                                         "client id -> {active: [s], inactive: [s], "
                                         "finish_time: s}; '' = always available"),
            "arrival_rate": ARRIVAL_RATE,
        },
        implementation="fedtune.devices.trace:trace_profiles", check=_check_trace),
}


def devices_on(config: Config) -> bool:
    """Whether the run simulates devices (a profile that draws them)."""
    return bool(DEVICE_PROFILES[config.devices.profile].implementation)


def sampled_per_round(config: Config, per_round: int) -> int:
    """Clients a synchronous round samples: ``per_round`` (what Flower's sampling picks),
    over-selected by ``strategy.over_selection`` (Bonawitz et al. 2019: sample ceil(K (1 + f)),
    keep the first K to finish)."""
    return math.ceil(per_round * (1 + config.strategy.over_selection))


def check_asynchronous(config: Config) -> None:
    """An asynchronous strategy needs a privacy mode and a runtime that can run it."""
    name = config.strategy.name
    if not STRATEGIES[name].asynchronous:
        return
    mode = PRIVACY_MODES[config.privacy.mode]
    # a mode that replaces the strategy (central DP) runs the strategy's own DP release
    reason = "" if mode.replaces_strategy and STRATEGIES[name].dp_release else (
        mode.asynchronous_refused)
    if reason:
        raise ConfigError(f"privacy.mode = {config.privacy.mode!r} is not allowed with "
                          f"strategy.name = {name!r}: {reason}")
    reason = RUNTIMES[config.engine.backend].asynchronous_refused
    if reason:
        raise ConfigError(f"engine.backend = {config.engine.backend!r} is not allowed with "
                          f"strategy.name = {name!r}: {reason}")


def check_devices(config: Config) -> None:
    """The deadline and over-selection need devices; the chosen profile checks its keys;
    an asynchronous strategy, its privacy mode and runtime."""
    check_asynchronous(config)
    s = config.strategy
    if not devices_on(config):
        for name in ("round_deadline_s", "over_selection"):
            if getattr(s, name):
                raise ConfigError(
                    f"strategy.{name} = {getattr(s, name):g} is not allowed with devices.profile"
                    " = 'none': must be 0 (without devices every client takes no virtual "
                    "time), or set devices.profile")
        return
    if config.data.dataset == "files":
        raise ConfigError("devices.profile = " + repr(config.devices.profile) + " is not allowed "
                          "with data.dataset = 'files': must be 'none' (the server must know "
                          "each client's training-set size to time its work)")
    if config.privacy.mode == "central" and not STRATEGIES[s.name].asynchronous:
        raise ConfigError(
            f"devices.profile = {config.devices.profile!r} is not allowed with privacy.mode = "
            "'central': must be 'none' (availability and dropped stragglers change who "
            "contributes, which DP-FedAvg's Poisson-sampling accountant does not model)")
    if s.secure_aggregation:
        raise ConfigError(
            f"devices.profile = {config.devices.profile!r} is not allowed with "
            "strategy.secure_aggregation = true: must be 'none' (SecAgg+'s stages have no "
            "virtual clock yet)")
    per_round = max(int(config.data.num_clients * s.fraction_train), s.min_train_clients)
    if sampled_per_round(config, per_round) > config.data.num_clients:
        raise ConfigError(
            f"strategy.over_selection = {s.over_selection:g} is not allowed: must sample at "
            f"most data.num_clients = {config.data.num_clients} (ceil({per_round} x (1 + "
            f"{s.over_selection:g})) = {sampled_per_round(config, per_round)})")
    entry = DEVICE_PROFILES[config.devices.profile]
    if entry.check is not None:
        entry.check(config)
