"""FedScale's device traces (Lai et al., "FedScale", ICML 2022; its docs' "Device Trace File
Formats"), read safely.

Two files, each a mapping from a client id to a record:

- capacity (``devices.trace_file``): ``{"computation": ms per example, "communication":
  kbit/s}``. FedScale times a client as ``computation`` × examples / 1000 seconds plus the model
  down and up over ``communication``; fedtune uses the same bandwidth both ways.
- behaviour (``devices.availability_file``): ``{"active": [s, ...], "inactive": [s, ...],
  "finish_time": s, ...}``: the client is available from ``active[k]`` to ``inactive[k]``,
  the pattern repeating every ``finish_time`` seconds.

FedScale ships them as Python pickles; fedtune reads a pickle with an unpickler that builds
only dicts, lists, strings and numbers (``pickle.Unpickler.find_class`` refuses every class,
so a crafted file cannot run code), or the same structure as JSON. fedtune client i takes the
i-th client id of a file in sorted order (modulo its length). A malformed file is a one-line
``ConfigError`` naming the file and the client id (or JSON line) at fault.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config import Config
from fedtune.devices.profiles import DeviceProfiles, Diurnal, Intervals
from fedtune.errors import ConfigError

KBIT = 1000 / 8  # bytes per second in one kbit/s


class _DataOnly(pickle.Unpickler):
    """Builds the pickle's dicts, lists and numbers; any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name} (only plain data is read)")


def read_trace(path: str, key: str) -> dict[Any, Any]:
    """A FedScale trace file as a mapping; ConfigError naming ``key`` and the file otherwise."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as error:
        raise ConfigError(f"devices.{key} = {path!r} cannot be read: {error.strerror}") from None
    if data[:1] in (b"{", b" ", b"\n"):
        try:
            value = json.loads(data.decode("utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{error.lineno}: devices.{key} is not valid JSON "
                              f"({error.msg})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: devices.{key} is not UTF-8 JSON") from None
    else:
        try:
            value = _DataOnly(io.BytesIO(data)).load()
        except Exception as error:  # noqa: BLE001 - any damage in the file is the user's
            raise ConfigError(f"{path}: devices.{key} is not a FedScale trace pickle "
                              f"({type(error).__name__}: {str(error)[:120]})") from None
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{path}: devices.{key} must map client ids to records, got "
                          f"{type(value).__name__}")
    return dict(value)


def _number(path: str, client: Any, record: Any, field: str, positive: bool = True) -> float:
    value = record.get(field) if isinstance(record, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or (value <= 0 if positive else value < 0):
        raise ConfigError(f"{path}: client {client!r}: {field!r} = {value!r} is not allowed: "
                          f"must be a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


def _order(client: Any) -> tuple[int, float, str]:
    """Client ids in numeric order where they are numbers (JSON keys are strings)."""
    try:
        return 0, float(client), ""
    except (TypeError, ValueError):
        return 1, 0.0, str(client)


def _chosen(trace: dict[Any, Any], num_clients: int) -> list[Any]:
    ids = sorted(trace, key=_order)
    return [ids[i % len(ids)] for i in range(num_clients)]


def _times(path: str, client: Any, record: Mapping[str, Any], field: str) -> np.ndarray:
    value = record.get(field)
    if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value):
        raise ConfigError(f"{path}: client {client!r}: {field!r} must be a list of seconds")
    return np.asarray(value, dtype=np.float64)


def _intervals(path: str, trace: dict[Any, Any], num_clients: int) -> Intervals:
    starts, ends, periods = [], [], []
    for client in _chosen(trace, num_clients):
        record = trace[client]
        if not isinstance(record, Mapping):
            raise ConfigError(f"{path}: client {client!r}: the record must be a mapping")
        period = _number(path, client, record, "finish_time")
        active = _times(path, client, record, "active")
        inactive = _times(path, client, record, "inactive")
        if len(inactive) == len(active) - 1:  # the last window lasts to the period's end
            inactive = np.append(inactive, period)
        if len(active) != len(inactive) or not len(active):
            raise ConfigError(f"{path}: client {client!r}: 'active' ({len(active)}) and "
                              f"'inactive' ({len(inactive)}) must pair up, at least one window")
        if (np.any(inactive <= active) or np.any(active[1:] < inactive[:-1])
                or active[0] < 0 or inactive[-1] > period):
            raise ConfigError(f"{path}: client {client!r}: windows must be increasing, "
                              f"non-overlapping and within [0, finish_time = {period:g}]")
        starts.append(active)
        ends.append(inactive)
        periods.append(period)
    return Intervals.build(starts, ends, np.asarray(periods))


def trace_profiles(config: Config, num_clients: int) -> DeviceProfiles:
    """Every client's device from the FedScale files ``devices.trace_file`` and
    ``devices.availability_file`` ('' = always available)."""
    d = config.devices
    capacity = read_trace(d.trace_file, "trace_file")
    chosen = _chosen(capacity, num_clients)
    speed = np.array([_number(d.trace_file, c, capacity[c], "computation") / 1000
                      for c in chosen])
    bandwidth = np.array([_number(d.trace_file, c, capacity[c], "communication") * KBIT
                          for c in chosen])
    if d.availability_file:
        availability: Diurnal | Intervals = _intervals(
            d.availability_file, read_trace(d.availability_file, "availability_file"),
            num_clients)
    else:
        availability = Diurnal(np.zeros(num_clients), 1.0, 1.0)
    return DeviceProfiles(speed, bandwidth, bandwidth.copy(), availability, d.arrival_rate)
