"""Runs on the virtual clock: synchronous rounds with availability, a deadline and
over-selection, the asynchronous event loop, and what the config refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.devices.clock import VirtualClock
from fedtune.engine.inprocess import run_inprocess
from fedtune.task import task_resources
from tests.conftest import MLP_DIGITS, rows_of, tiny_config

DEVICES = ["data.num_clients=12", "devices.profile=lognormal", "devices.slow_fraction=0.25",
           "devices.available_fraction=0.7", "devices.day_s=600", "run.rounds=3",
           "strategy.fraction_evaluate=0.25"]


def _clock(config):
    sizes = np.array([len(r) for r in task_resources(config).federation.client_train_rows])
    return VirtualClock.for_config(config, sizes)


def test_a_deadline_round_keeps_the_first_k_available_clients_to_finish(tmp_path):
    """Recomputed from the device arrays: who was there at the round's start, who finished
    first within the deadline, when the round ended."""
    config = tiny_config(tmp_path, *DEVICES, "strategy.fraction_train=0.25",
                         "strategy.over_selection=0.7", "strategy.round_deadline_s=3")
    run = run_inprocess(config).path
    clock = _clock(config)
    clients, metrics = rows_of(run / "clients.csv"), rows_of(run / "metrics.csv")
    keep, statuses = 3, set()
    for row in metrics:
        mine = [c for c in clients if c["round"] == row["round"]]
        assert len(mine) == 6 == int(row["clients_sampled"])  # ceil(3 x 1.7)
        start = float(mine[0]["virtual_start_s"])
        ids = np.array([int(c["client_id"]) for c in mine])
        assert clock.available(ids, start).all()  # nobody unavailable was sampled
        durations = clock.durations(ids, *(2 * [_model_bytes(run)]))
        np.testing.assert_allclose([float(c["virtual_duration_s"]) for c in mine], durations,
                                   rtol=1e-5)
        gone = start + durations > clock.online_until(ids, start)
        eligible = [i for i in np.lexsort((ids, durations)) if durations[i] <= 3
                    and not gone[i]]
        kept = sorted(ids[eligible[:keep]].tolist())
        assert sorted(int(c["client_id"]) for c in mine if c["status"] == "ok") == kept
        assert all(c["status"] == "straggler" for c in mine if int(c["client_id"]) not in kept)
        end = start + (max(durations[eligible[:keep]]) if len(kept) == keep else 3)
        assert float(row["virtual_time_s"]) == pytest.approx(end, rel=1e-5)
        statuses |= {c["status"] for c in mine}
        for c in mine:  # the clock's planned work is what the client trained
            if c["status"] == "ok":
                assert int(c["examples_trained"]) == clock.examples[int(c["client_id"])]
    assert statuses == {"ok", "straggler"}


def _model_bytes(run: Path) -> int:
    """The serialised size of the model's arrays: what goes down, and an update up."""
    from safetensors.numpy import load_file

    from fedtune.protocol import to_array_record

    return to_array_record(load_file(str(run / "model/model.safetensors"))).count_bytes()


def test_fedbuff_receives_k_updates_per_server_step_within_the_concurrency(tmp_path):
    config = tiny_config(tmp_path, *DEVICES, "strategy.name=fedbuff", "run.rounds=4",
                         "strategy.fedbuff_buffer_size=3", "strategy.concurrency=4",
                         "faults.nan_fraction=0.1")
    run = run_inprocess(config).path
    clients, metrics = rows_of(run / "clients.csv"), rows_of(run / "metrics.csv")
    releases = [float(m["virtual_time_s"]) for m in metrics]
    assert releases == sorted(releases) and len(releases) == 4
    for row in metrics:
        mine = [c for c in clients if c["round"] == row["round"]]
        assert sum(c["status"] == "ok" for c in mine) == 3 == int(row["clients_ok"])
        assert row["model_update"] == "applied"
    # a NaN update is screened where it ran and never received
    assert any(c["status"] == "rejected" for c in clients)
    spans = [(float(c["virtual_start_s"]), float(c["virtual_start_s"])
              + float(c["virtual_duration_s"])) for c in clients]
    for moment, _ in spans:  # never more than 4 clients in flight
        assert sum(s <= moment < e for s, e in spans) <= 4
    for c in clients:  # staleness: server steps between its start and its arrival
        if c["status"] == "ok":
            started_on = sum(t <= float(c["virtual_start_s"]) for t in releases)
            assert int(c["staleness"]) == int(c["round"]) - 1 - started_on
    assert max(int(c["staleness"]) for c in clients if c["staleness"]) >= 1


def test_an_asynchronous_run_evaluates_every_eval_every_server_updates(tmp_path):
    """strategy.eval_every = 2 of 5 server updates: the global and the federated evaluation in
    updates 2, 4 and the last, every update keeps its row, and nothing else moves: the same
    clients trained the same way into the same final model as with an evaluation every update."""
    runs = {}
    for every in (1, 2):
        config = tiny_config(tmp_path / str(every), *DEVICES, "strategy.name=fedbuff",
                             "run.rounds=5", "strategy.fedbuff_buffer_size=2",
                             "strategy.concurrency=3", "strategy.fraction_evaluate=0.5",
                             f"strategy.eval_every={every}")
        runs[every] = run_inprocess(config).path
    metrics = rows_of(runs[2] / "metrics.csv")
    assert [m["round"] for m in metrics] == ["1", "2", "3", "4", "5"]
    for column in ("eval_accuracy", "eval_loss", "federated_eval_accuracy"):
        assert [m[column] != "" for m in metrics] == [False, True, False, True, True]
    every_update = rows_of(runs[1] / "metrics.csv")
    assert all(m["eval_accuracy"] for m in every_update)
    for kept in (1, 3, 4):
        assert metrics[kept]["eval_accuracy"] == every_update[kept]["eval_accuracy"]
    trained = [{k: v for k, v in c.items() if k != "duration_s"}
               for run in runs.values() for c in rows_of(run / "clients.csv")
               if c["phase"] == "train"]
    half = len(trained) // 2
    assert trained[:half] == trained[half:]
    assert ((runs[1] / "model/model.safetensors").read_bytes()
            == (runs[2] / "model/model.safetensors").read_bytes())
    summary = json.loads((runs[2] / "summary.json").read_text(encoding="utf-8"))
    assert summary["final"]["eval_accuracy"] == float(metrics[-1]["eval_accuracy"])


def test_fedasync_updates_the_model_with_every_arrival(tmp_path):
    config = tiny_config(tmp_path, *DEVICES, "strategy.name=fedasync", "run.rounds=5",
                         "strategy.concurrency=3")
    run = run_inprocess(config).path
    metrics = rows_of(run / "metrics.csv")
    assert [int(m["clients_ok"]) for m in metrics if m["clients_ok"]][:5] == [1] * 5
    assert float(metrics[-1]["eval_accuracy"]) > 0.1


@pytest.mark.parametrize("name", ["fedbuff", "fedasync"])
def test_without_devices_clients_finishing_together_are_heard_first_come_first_served(
        tmp_path, name):
    """Instant devices (no profile): every client finishes the moment it starts, so clients
    are heard in the order they started. A client heard and started again queues behind the
    clients in flight (it was heard first again, alone: a buffer of 6 updates all from one
    client, and the others never heard)."""
    buffer = ["strategy.fedbuff_buffer_size=6", "run.rounds=3"] if name == "fedbuff" else [
        "run.rounds=12"]  # FedAsync: a server update per client update
    config = tiny_config(tmp_path, "data.num_clients=6", f"strategy.name={name}",
                         "strategy.concurrency=6", *buffer)
    clients = [int(c["client_id"]) for c in rows_of(run_inprocess(config).path / "clients.csv")
               if c["phase"] == "train"]
    # every window of 6 updates in a row has each client once
    assert len(clients) == (18 if name == "fedbuff" else 12)
    for first in range(0, len(clients), 6):
        window = clients[first:first + 6]
        assert len(set(window)) == len(window), clients


def test_without_devices_nothing_is_timed(tmp_path):
    run = run_inprocess(tiny_config(tmp_path, "run.rounds=1")).path
    assert rows_of(run / "metrics.csv")[0]["virtual_time_s"] == ""
    assert {c["virtual_start_s"] for c in rows_of(run / "clients.csv")} == {""}


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy.round_deadline_s=10"], "strategy.round_deadline_s = 10 is not allowed with "
                                       "devices.profile = 'none': must be 0"),
    (["devices.profile=lognormal", "strategy.over_selection=3", "data.num_clients=4",
      "strategy.fraction_train=0.5"], r"strategy.over_selection = 3 is not allowed: must sample "
                                      r"at most data.num_clients = 4"),
    (["strategy.name=fedasync", "privacy.mode=central", "privacy.noise_multiplier=1",
      "privacy.delta=1e-3"], "or strategy.name = 'fedbuff' \\(central DP noises a release"),
    (["strategy.name=fedasync", "engine.backend=flower"], "engine.backend = 'flower' is not "
                                                          "allowed with strategy.name = "
                                                          "'fedasync': must be 'ray' or"),
    (["strategy.name=fedbuff", "strategy.secure_aggregation=true"], "SecAgg\\+"),
    (["strategy.name=fedbuff", "strategy.round_deadline_s=5", "devices.profile=lognormal"],
     "strategy.round_deadline_s = 5.0 is not allowed with strategy.name = 'fedbuff'"),
    (["devices.profile=trace"], "devices.trace_file = '' is not allowed with devices.profile"),
    (["devices.profile=lognormal", "privacy.mode=central", "privacy.noise_multiplier=1",
      "privacy.delta=1e-3"], "Poisson-sampling accountant does not model"),
    (["devices.speed_median_s=0.5"], "devices.speed_median_s = 0.5 is not allowed with "
                                     "devices.profile = 'none'"),
    (["strategy.name=fedbuff", "strategy.eval_every=0"], "strategy.eval_every = 0 is not "
                                                         "allowed: must be an integer >= 1"),
    (["strategy.eval_every=2"], "strategy.eval_every = 2 is not allowed with strategy.name = "
                                "'fedavg': only strategy.name = 'fedbuff' or 'fedasync' uses it"),
])
def test_the_config_refuses_what_the_clock_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [*MLP_DIGITS, *overrides])
    assert "\n" not in str(error.value)


def test_an_asynchronous_server_hearing_no_update_stops_as_a_round_would(tmp_path):
    """Every client crashes: each server update ends after 2 x max(concurrency, clients)
    fruitless arrivals, and run.max_rounds_without_update stops the run."""
    from fedtune.server.loop import RunFailed

    config = tiny_config(tmp_path, "strategy.name=fedbuff", "strategy.concurrency=2",
                         "faults.crash_probability=1.0", "run.rounds=5")
    with pytest.raises(RunFailed, match="3 rounds in a row without an update"):
        run_inprocess(config)
    # the third round stops the run before its row is written, as in a synchronous run
    metrics = rows_of(Path(config.run.dir) / "metrics.csv")
    assert [m["model_update"] for m in metrics] == ["kept: no update from the last 8 "
                                                    "clients"] * 2
    assert [int(m["clients_failed"]) for m in metrics] == [8, 8]


def test_a_client_restarted_on_the_same_model_draws_other_batches(tmp_path):
    """Two clients, one at a time, four updates per server step: within the first server
    update a client finishes and starts again on the same model. Each dispatch is seeded by
    the loop's training call (fedtune.protocol.DISPATCH), so its second run trains on other
    batches (seeding by the server round alone trained the same batches, the same loss)."""
    config = tiny_config(tmp_path, "data.num_clients=2", "strategy.name=fedbuff",
                         "strategy.concurrency=1", "strategy.fedbuff_buffer_size=4",
                         "run.rounds=1", "client.local_steps=3")
    run = run_inprocess(config).path
    losses: dict[str, list[str]] = {}
    for row in rows_of(run / "clients.csv"):
        assert row["status"] == "ok" and row["staleness"] == "0"  # all on the first model
        losses.setdefault(row["client_id"], []).append(row["train_loss"])
    repeated = [runs for runs in losses.values() if len(runs) > 1]
    assert repeated  # 4 dispatches of 2 clients
    for runs in repeated:
        assert len(set(runs)) == len(runs)
