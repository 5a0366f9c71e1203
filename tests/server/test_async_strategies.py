"""strategies/fedbuff.py and strategies/fedasync.py against the papers' update rules, in NumPy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.server.checkpoint import capture_attributes, restore_attributes
from strategies import FedAsync, FedBuff
from strategies.fedasync import staleness_factor
from tests.strategy_messages import node_grid, record

X0 = {"w": np.array([[0.5, -1.0], [2.0, 0.25]], np.float32), "b": np.array([0.1, -0.2],
                                                                              np.float32)}
# three clients' models, each trained from its own (stale) start
STARTS = [X0, {k: v + 0.5 for k, v in X0.items()}, {k: v - 0.25 for k, v in X0.items()}]
TRAINED = [{k: v * 1.5 + 0.1 for k, v in s.items()} for s in STARTS]
STALENESS = [0, 1, 3]


def test_fedbuff_server_step_matches_the_paper():
    """x <- x + lr (1 / K) sum_i delta_i / sqrt(1 + tau_i), after K updates (Nguyen et al.
    2022, Algorithm 1 with their staleness scaling)."""
    strategy = FedBuff(buffer_size=3, server_lr=0.5)
    due = [strategy.receive(strategy.prepare(s, t), tau, 10.0)
           for s, t, tau in zip(STARTS, TRAINED, STALENESS, strict=True)]
    assert due == [False, False, True]
    new = strategy.release(X0)
    for name, x in X0.items():
        step = sum((t[name].astype(np.float64) - s[name]) / np.sqrt(1 + tau)
                   for s, t, tau in zip(STARTS, TRAINED, STALENESS, strict=True)) / 3
        np.testing.assert_allclose(new[name], x + 0.5 * step, rtol=1e-6)
        assert new[name].dtype == np.float32
    assert strategy.buffered == 0 and strategy.buffer == {}


def test_fedbuff_half_full_buffer_survives_a_checkpoint():
    whole = FedBuff(buffer_size=3, server_lr=0.5)
    for s, t, tau in zip(STARTS, TRAINED, STALENESS, strict=True):
        whole.receive(whole.prepare(s, t), tau, 1.0)
    halved = FedBuff(buffer_size=3, server_lr=0.5)
    halved.receive(halved.prepare(STARTS[0], TRAINED[0]), 0, 1.0)
    saved = capture_attributes(halved)
    resumed = FedBuff(buffer_size=3, server_lr=0.5)
    restore_attributes(resumed, *saved)
    for s, t, tau in list(zip(STARTS, TRAINED, STALENESS, strict=True))[1:]:
        resumed.receive(resumed.prepare(s, t), tau, 1.0)
    assert resumed.buffered == 3
    expected, got = whole.release(X0), resumed.release(X0)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)


def test_fedasync_mixing_matches_the_paper():
    """x <- (1 - a_s) x + a_s x_client, a_s = alpha s(staleness) (Xie et al. 2019, Sec. 5.2)."""
    assert staleness_factor("constant", 7, 0.5, 4) == 1.0
    assert staleness_factor("polynomial", 3, 0.5, 4) == pytest.approx(4 ** -0.5)
    assert staleness_factor("hinge", 4, 0.5, 4) == 1.0
    assert staleness_factor("hinge", 10, 0.5, 4) == pytest.approx(1 / (0.5 * 6 + 1))
    strategy = FedAsync(alpha=0.6, staleness="polynomial", a=0.5, b=4)
    assert strategy.receive(strategy.prepare(STARTS[1], TRAINED[1]), 3, 1.0)
    new = strategy.release(X0)
    mix = 0.6 * 4 ** -0.5
    for name, x in X0.items():
        np.testing.assert_allclose(new[name], (1 - mix) * x + mix * TRAINED[1][name], rtol=1e-6)
        assert new[name].dtype == np.float32


def test_fedasync_refuses_an_unknown_staleness_function():
    with pytest.raises(ValueError, match="unknown FedAsync staleness function 'linear'"):
        FedAsync(staleness="linear")


def test_start_messages_share_one_content_with_the_server_round():
    node_grid(4)  # Flower builds messages inside a run
    messages = FedBuff().start_messages(4, record(X0), [3, 1])
    assert [m.metadata.dst_node_id for m in messages] == [3, 1]
    assert messages[0].content is messages[1].content
    assert messages[0].content["config"]["server-round"] == 4


def test_fedbuff_sum_of_a_call_matches_adding_each_update():
    """``receive_sum`` takes a training call's updates (one start model, one staleness) as
    their float64 sum: s(tau) (sum_i y_i - n x), the sum of ``receive(prepare(...))`` up to
    float64 rounding, the same bits for a call of one; ``wanted`` counts down to the release."""
    calls = [(0, 1, [0, 2, 4]), (1, 0, [1, 5]), (2, 3, [3])]  # (start, staleness, updates)
    trained = [{k: v * (1.0 + 0.1 * i) - 0.05 * i for k, v in STARTS[s].items()}
               for i, s in enumerate([0, 1, 0, 2, 0, 1])]
    summed, each = FedBuff(buffer_size=6), FedBuff(buffer_size=6)
    due = []
    for start, tau, members in calls:
        total = {k: sum(trained[i][k].astype(np.float64) for i in members) for k in X0}
        due.append((summed.wanted(), summed.receive_sum(STARTS[start], total, len(members),
                                                        tau)))
        for i in members:
            each.receive(each.prepare(STARTS[start], trained[i]), tau, 1.0)
    assert due == [(6, False), (3, False), (1, True)] and summed.wanted() == 0
    got, expected = summed.release(X0), each.release(X0)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6)
    one, alone = FedBuff(buffer_size=3), FedBuff(buffer_size=3)
    for s, t, tau in zip(STARTS, TRAINED, STALENESS, strict=True):
        one.receive_sum(s, {k: v.astype(np.float64) for k, v in t.items()}, 1, tau)
        alone.receive(alone.prepare(s, t), tau, 1.0)
    for name, value in alone.buffer.items():
        np.testing.assert_array_equal(one.buffer[name], value)


def test_only_plain_fedbuff_takes_sums():
    """DP-FedBuff clips each update (its ``prepare``), so the loop hands it updates one by
    one; FedAsync mixes each arrival."""
    from strategies.dp_fedbuff import DPFedBuff

    assert FedBuff.takes_sums
    assert not DPFedBuff.takes_sums and not FedAsync.takes_sums
    mixing = FedAsync()
    assert mixing.wanted() == 1
    mixing.receive(mixing.prepare(STARTS[0], TRAINED[0]), 0, 1.0)
    assert mixing.wanted() == 0
    mixing.release(X0)
    assert mixing.wanted() == 1


def test_a_server_updates_clients_are_trained_in_one_call_per_start_model():
    """The loop trains the clients heard in a server update one call per model they started
    from, ordered by version, then first arrival; a client heard twice from one model goes in
    a second call (its own batches), an offline one in none."""
    from fedtune.server.async_loop import Heard, _calls

    arrivals = [(4, 1), (7, 0), (4, 1), (2, 1), (9, 1), (7, 0), (5, 2)]  # (client, version)
    heard = [Heard(client, 0.0, 1.0, version, lost=client == 9)
             for client, version in arrivals]
    calls = [(call.version, call.heard) for call in _calls(heard)]
    assert calls == [(0, [1]), (0, [5]), (1, [0, 3]), (1, [2]), (2, [6])]


def test_the_loop_asks_the_clock_only_when_devices_can_be_offline():
    """A start skips the clock's availability queries (``_always_available``) exactly where
    they would say every client is there, at every moment, until +inf."""
    from fedtune.devices.clock import VirtualClock
    from fedtune.devices.profiles import DeviceProfiles, Diurnal
    from fedtune.server.async_loop import _always_available

    clients, moments = np.arange(50), [0.0, 0.3, 17.25, 1e7]
    phase = np.random.default_rng(0).random(50)
    for fraction, always in [(1.0, True), (0.5, False)]:
        profiles = DeviceProfiles(np.ones(50), np.ones(50), np.ones(50),
                                  Diurnal(phase, fraction, 10.0))
        clock = VirtualClock(profiles, np.ones(50, dtype=np.int64))
        assert _always_available(clock) is always
        asked = [(clock.available(clients, t).all(), np.isinf(clock.online_until(clients, t)).all())
                 for t in moments]
        assert all(answer == (always, always) for answer in asked)
