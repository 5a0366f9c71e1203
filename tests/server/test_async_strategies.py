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


def test_the_loop_keeps_a_cohorts_stacked_updates_without_copying_them():
    """The event loop holds every update in flight (fedtune.server.async_loop._stacked): rows
    of a cohort's stacked copy (``StackedRow``) stay rows of it (read-only, so the checkpoint
    captured after every server update keeps them without a copy either); other models - plain
    ones, and rows of arrays that do not own their data (a Ray reply's) - are stacked."""
    from fedtune.server.async_loop import _stacked
    from fedtune.server.stacked_rows import StackedRow

    chunk = {"w": np.arange(24.0).reshape(3, 2, 4).copy(), "b": np.arange(3.0)[:, None].copy()}
    viewed = {"w": np.arange(16.0).reshape(2, 2, 4)[::1], "b": np.zeros((2, 1))}
    loose = {"w": np.ones((2, 4)), "b": np.ones(1)}
    models = [StackedRow(chunk, 2), loose, StackedRow(viewed, 1), StackedRow(chunk, 0)]
    blocks, where = _stacked(models, ["w", "b"])
    assert len(blocks) == 2
    assert blocks[0]["w"] is chunk["w"] and blocks[0]["b"] is chunk["b"]
    assert where.tolist() == [[0, 2], [1, 0], [1, 1], [0, 0]]
    for model, (block, row) in zip(models, where, strict=True):
        for name, value in model.items():
            np.testing.assert_array_equal(blocks[block][name][row], value)
    chunk["w"].flags.writeable = False
    _, arrays = capture_attributes(SimpleNamespace(blocks=blocks))
    assert any(array is chunk["w"] for array in arrays.values())  # kept, not copied
    assert not any(array is loose["w"] for array in arrays.values())


def test_fedbuff_regrouped_sum_matches_adding_each_update():
    """``receive_trained`` sums the updates from one start model together at ``settle``
    (s(tau) (sum_i y_i - n x)): the sum of ``receive(prepare(...))`` up to float64 rounding,
    and the same bits for groups of one."""
    arrivals = [(0, 1), (1, 0), (0, 1), (2, 3), (0, 1), (1, 0)]  # (start, staleness)
    trained = [{k: v * (1.0 + 0.1 * i) - 0.05 * i for k, v in STARTS[s].items()}
               for i, (s, _) in enumerate(arrivals)]
    grouped, each = FedBuff(buffer_size=6), FedBuff(buffer_size=6)
    due = [grouped.receive_trained(STARTS[s], t, tau, 1.0)
           for (s, tau), t in zip(arrivals, trained, strict=True)]
    for (s, tau), t in zip(arrivals, trained, strict=True):
        each.receive(each.prepare(STARTS[s], t), tau, 1.0)
    assert due == [False] * 5 + [True] and len(grouped.arrived) == 3
    got, expected = grouped.release(X0), each.release(X0)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6)
    single, alone = FedBuff(buffer_size=3), FedBuff(buffer_size=3)
    for s, t, tau in zip(STARTS, TRAINED, STALENESS, strict=True):
        single.receive_trained(s, t, tau, 1.0)
        alone.receive(alone.prepare(s, t), tau, 1.0)
    single.settle()
    for name, value in alone.buffer.items():
        np.testing.assert_array_equal(single.buffer[name], value)
    assert single.arrived == [] and grouped.arrived == []


def test_a_subclass_that_prepares_each_update_receives_each_prepared_update():
    class Halving(FedBuff):
        def prepare(self, start, trained):
            return {k: v / 2 for k, v in super().prepare(start, trained).items()}

    strategy = Halving(buffer_size=2)
    strategy.receive_trained(STARTS[0], TRAINED[0], 0, 1.0)
    assert strategy.arrived == []
    np.testing.assert_allclose(strategy.buffer["w"],
                               (TRAINED[0]["w"].astype(np.float64) - STARTS[0]["w"]) / 2)


def test_a_calls_results_give_back_each_clients_fields():
    """The loop keeps a training call's clients.csv numbers as float64 columns (NaN: None) and
    only the unusual statuses (``_call_results``); unpacked column by column (``_columns``,
    ``_notes``) they are the rows' own values, ints where clients.csv has ints."""
    from fedtune.results.run_dir import ClientRow
    from fedtune.server.async_loop import _call_results, _columns, _notes

    rows = [ClientRow(3, 9, 12, 0.25, None, 1.5, "ok", "", 8),
            ClientRow(3, 2, None, None, None, None, "failed", "crashed"),
            ClientRow(3, 5, 7, None, 2.0, 0.75, "rejected", "", 0)]
    results, blocks = _call_results([2, 5, 9], rows, {"w": np.zeros(2)}, [])
    assert blocks == []  # nobody accepted: no trained model kept
    picked = [0, 2]  # clients 2 and 9
    columns = _columns(results["numbers"][picked])
    statuses, reasons = _notes(results["notes"], picked)
    for i, row in enumerate([rows[1], rows[0]]):
        got = [column[i] for column in columns] + [statuses[i], reasons[i]]
        expected = [row.num_examples, row.train_loss, row.epsilon, row.duration_s,
                    row.examples_trained, row.status, row.reason]
        assert got == expected
        assert [type(value) for value in got] == [type(value) for value in expected]
    assert _notes({}, [4, 1]) == (["ok", "ok"], ["", ""])


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


def test_idle_clients_are_indexed_as_the_list_of_them_would_be():
    """The loop picks a starting client by index among the idle ones, ascending, without
    listing them (``IdleClients``); the seeded draw is ``Generator.choice``'s: the same client
    as choosing from the list."""
    from fedtune.server.async_loop import IdleClients

    rng = np.random.default_rng(5)
    cases = [(population, np.sort(rng.choice(population, count, replace=False)))
             for population, count in [(1, 0), (5, 4), (10, 10), (50, 7), (10**6, 300)]]
    cases.append((1000, np.arange(1, 1000)))  # only the first is idle
    for population, busy in cases:
        idle = np.setdiff1d(np.arange(population), busy)
        clients = IdleClients(population, busy)
        assert len(clients) == len(idle)
        sample = range(len(idle)) if len(idle) < 100 else rng.integers(len(idle), size=200)
        assert [clients[int(k)] for k in sample] == [int(idle[k]) for k in sample]
        with pytest.raises(IndexError):
            clients[len(idle)]
        if len(idle):
            for seed in range(20):
                draw = np.random.default_rng([seed, 28, 3])
                assert (clients[int(draw.integers(len(clients)))]
                        == np.random.default_rng([seed, 28, 3]).choice(idle))
