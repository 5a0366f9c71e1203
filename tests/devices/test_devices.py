"""fedtune/devices: the parametric profile, availability queries, FedScale traces, the clock."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.devices.clock import NeverAvailable, VirtualClock, planned_examples
from fedtune.devices.profiles import Diurnal, Intervals, lognormal_profiles
from fedtune.devices.trace import trace_profiles

LOGNORMAL = ["devices.profile=lognormal", "data.num_clients=50"]


def _config(*overrides: str):
    return load_config(None, list(overrides))


def test_lognormal_profiles_follow_the_seed_and_slow_exactly_the_fraction():
    fast = lognormal_profiles(_config(*LOGNORMAL), 200)
    again = lognormal_profiles(_config(*LOGNORMAL), 200)
    np.testing.assert_array_equal(fast.seconds_per_example, again.seconds_per_example)
    other = lognormal_profiles(_config(*LOGNORMAL, "devices.seed=1"), 200)
    assert not np.array_equal(fast.seconds_per_example, other.seconds_per_example)
    slow = lognormal_profiles(_config(*LOGNORMAL, "devices.slow_fraction=0.1"), 200)
    ratio = slow.seconds_per_example / fast.seconds_per_example
    assert np.isclose(ratio, 10).sum() == 20 and np.isclose(ratio, 1).sum() == 180
    # log-normal around the medians
    assert np.median(fast.seconds_per_example) == pytest.approx(0.01, rel=0.15)
    assert np.median(fast.up_bytes_per_s) == pytest.approx(2e6 / 8, rel=0.15)


def _brute_diurnal(phase: float, fraction: float, day: float, t: float) -> bool:
    return (t / day + phase) % 1.0 < fraction


def test_diurnal_windows_against_a_direct_computation():
    phases = np.array([0.0, 0.3, 0.75, 0.99])
    diurnal = Diurnal(phases, 0.4, 100.0)
    clients = np.arange(4)
    for t in np.linspace(0, 300, 601):
        available = diurnal.available(clients, t)
        assert available.tolist() == [_brute_diurnal(p, 0.4, 100.0, t) for p in phases]
        for c in clients:
            if available[c]:  # online until the window closes, not a moment longer
                end = diurnal.online_until(clients, t)[c]
                assert _brute_diurnal(phases[c], 0.4, 100.0, end - 1e-6)
                assert not _brute_diurnal(phases[c], 0.4, 100.0, end + 1e-6)
            else:  # the next opening is the first available moment
                opens = diurnal.next_available(clients, t)[c]
                assert _brute_diurnal(phases[c], 0.4, 100.0, opens + 1e-6)
                assert not _brute_diurnal(phases[c], 0.4, 100.0, opens - 1e-6)


WINDOWS = {  # client -> (starts, ends, period)
    0: ([0.0, 50.0], [10.0, 60.0], 100.0),
    1: ([20.0], [90.0], 100.0),
    2: ([5.0, 15.0, 25.0], [10.0, 20.0, 30.0], 40.0),
}


def _brute_interval(client: int, t: float) -> bool:
    starts, ends, period = WINDOWS[client]
    position = t % period
    return any(s <= position < e for s, e in zip(starts, ends, strict=True))


def test_trace_intervals_against_a_direct_computation():
    intervals = Intervals.build([np.array(WINDOWS[c][0]) for c in WINDOWS],
                                [np.array(WINDOWS[c][1]) for c in WINDOWS],
                                np.array([WINDOWS[c][2] for c in WINDOWS]))
    clients = np.arange(3)
    for t in np.arange(0.0, 400.0, 0.5) + 0.25:
        available = intervals.available(clients, t)
        assert available.tolist() == [_brute_interval(c, t) for c in WINDOWS]
        ends, opens = intervals.online_until(clients, t), intervals.next_available(clients, t)
        for c in WINDOWS:
            if available[c]:
                assert _brute_interval(c, ends[c] - 1e-6) and not _brute_interval(c, ends[c])
            else:
                assert _brute_interval(c, opens[c]) and not _brute_interval(c, opens[c] - 1e-6)


def test_first_time_with_is_the_first_moment_enough_clients_are_there():
    config = _config(*LOGNORMAL, "devices.available_fraction=0.3", "devices.day_s=1000")
    clock = VirtualClock(lognormal_profiles(config, 50), np.full(50, 10))
    everyone = np.arange(50)
    counts = {t: clock.available(everyone, t).sum() for t in np.arange(0, 2000, 0.5)}
    needed = int(np.percentile(list(counts.values()), 90))
    moment = clock.first_time_with(needed, 0.0)
    assert clock.available(everyone, moment).sum() >= needed
    assert all(count < needed for t, count in counts.items() if t < moment - 0.5)
    with pytest.raises(NeverAvailable, match="fewer than 40 of 50 clients are ever available"):
        clock.first_time_with(40, 0.0)


def test_planned_examples_follow_the_batches_train_takes():
    sizes = np.array([5, 31, 32, 40, 100])
    steps = _config("client.local_steps=8", "client.batch_size=32")
    # n < batch: 8 batches of n; 40 = a batch of 32 and one of 8, four times; 100: 4 per pass
    assert planned_examples(steps, sizes).tolist() == [40, 248, 256, 160, 2 * 100 + 0]
    epochs = _config("client.local_steps=0", "client.local_epochs=3")
    assert planned_examples(epochs, sizes).tolist() == [15, 93, 96, 120, 300]


FEDSCALE = {7: {"computation": 50.0, "communication": 800.0},
            3: {"computation": 200.0, "communication": 100.0}}


def test_a_fedscale_capacity_trace_times_clients_as_fedscale_does(tmp_path):
    path = tmp_path / "client_device_capacity"
    path.write_bytes(pickle.dumps(FEDSCALE))
    config = _config("devices.profile=trace", f"devices.trace_file={path}")
    clock = VirtualClock(trace_profiles(config, 3), np.array([10, 20, 30]))
    # clients 0, 1, 2 take the sorted ids 3, 7, 3; FedScale: ms per example, kbit/s both ways
    expected = [10 * 0.2 + 2 * 1000 / (100 * 125), 20 * 0.05 + 2 * 1000 / (800 * 125),
                30 * 0.2 + 2 * 1000 / (100 * 125)]
    np.testing.assert_allclose(clock.durations(np.arange(3), 1000, 1000), expected)
    as_json = tmp_path / "capacity.json"
    as_json.write_text(json.dumps({str(k): v for k, v in FEDSCALE.items()}))
    same = trace_profiles(_config("devices.profile=trace", f"devices.trace_file={as_json}"), 3)
    np.testing.assert_array_equal(same.seconds_per_example,
                                  clock.profiles.seconds_per_example)


def test_a_fedscale_behaviour_trace_gives_the_windows(tmp_path):
    capacity = tmp_path / "capacity.json"
    capacity.write_text(json.dumps(FEDSCALE))
    behaviour = tmp_path / "behaviour.json"
    behaviour.write_text(json.dumps({
        "1": {"active": [0, 50], "inactive": [10, 60], "finish_time": 100, "model": "x"},
        "2": {"active": [20], "inactive": [], "finish_time": 100}}))  # open to the end
    config = _config("devices.profile=trace", f"devices.trace_file={capacity}",
                     f"devices.availability_file={behaviour}")
    availability = trace_profiles(config, 2).availability
    assert availability.available(np.arange(2), 55.0).tolist() == [True, True]
    assert availability.available(np.arange(2), 15.0).tolist() == [False, False]
    assert availability.online_until(np.arange(2), 155.0).tolist() == [160.0, 200.0]


class _Exploit:
    def __reduce__(self):
        import os

        return os.system, ("touch /tmp/fedtune-trace-exploit",)


@pytest.mark.parametrize(("content", "message"), [
    (b"\x80\x04N.", r"must map client ids to records, got NoneType"),
    (pickle.dumps({1: _Exploit()}), r"is not a FedScale trace pickle .*refers to \w+\.system"),
    (b'{\n "1": {"computation": 5,\n "communication": }}', r"capacity:3: devices.trace_file is "
                                                          "not valid JSON"),
    (json.dumps({"4": {"computation": 5}}).encode(),
     r"capacity: client '4': 'communication' = None is not allowed: must be a finite number"),
    (json.dumps({"4": {"computation": -1, "communication": 5}}).encode(),
     r"'computation' = -1 is not allowed"),
])
def test_a_malformed_trace_is_one_line_naming_file_and_place(tmp_path, content, message):
    path = tmp_path / "capacity"
    path.write_bytes(content)
    config = _config("devices.profile=trace", f"devices.trace_file={path}")
    with pytest.raises(ConfigError, match=message) as error:
        trace_profiles(config, 2)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not Path("/tmp/fedtune-trace-exploit").exists()  # nothing ran


def test_overlapping_windows_are_refused(tmp_path):
    capacity = tmp_path / "capacity.json"
    capacity.write_text(json.dumps(FEDSCALE))
    behaviour = tmp_path / "behaviour.json"
    behaviour.write_text(json.dumps({"9": {"active": [0, 5], "inactive": [10, 20],
                                           "finish_time": 100}}))
    config = _config("devices.profile=trace", f"devices.trace_file={capacity}",
                     f"devices.availability_file={behaviour}")
    with pytest.raises(ConfigError, match="client '9': windows must be increasing"):
        trace_profiles(config, 1)
