"""Checkpoints and resume: state round trips, and interrupted runs that end bit-identical."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam
from safetensors.numpy import load_file

from fedtune.client.app import app as client_app
from fedtune.config import ConfigError, to_run_config
from fedtune.engine.inprocess import InProcessGrid, run_inprocess
from fedtune.server.app import run_federated
from fedtune.server.checkpoint import (
    Checkpoint,
    capture_attributes,
    capture_rng,
    checkpoint_round,
    read_checkpoint,
    restore_attributes,
    restore_rng,
    write_checkpoint,
)
from fedtune.server.exchange import RunStopped
from fedtune.server.reporting import LogReporter
from fedtune.state.codec import state_from_bytes, state_to_bytes
from tests.conftest import MLP_DIGITS, REPO, tiny_config

FIVE_ROUNDS = ["run.rounds=5", "strategy.fraction_train=0.5", "strategy.fraction_evaluate=0.5"]


def _adam_with_moments() -> FedAdam:
    strategy = FedAdam(eta=0.05)
    rng = np.random.default_rng(0)
    strategy.m_t = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2)}
    strategy.v_t = {"w": rng.random((3, 2)), "b": np.ones(2)}
    strategy.current_arrays = {"w": rng.normal(size=(3, 2))}
    return strategy


def test_strategy_attributes_round_trip_through_a_checkpoint(tmp_path):
    saved = _adam_with_moments()
    checkpoint = Checkpoint(3, {"w": np.ones(2)}, capture_attributes(saved), capture_rng(), None)
    write_checkpoint(tmp_path, checkpoint)
    loaded = read_checkpoint(tmp_path)

    fresh = FedAdam(eta=0.05)
    restore_attributes(fresh, *loaded.strategy)
    for name in ("m_t", "v_t", "current_arrays"):
        ours, theirs = getattr(fresh, name), getattr(saved, name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype
            np.testing.assert_array_equal(ours[key], theirs[key])
    assert fresh.eta == 0.05 and fresh.beta_1 == saved.beta_1
    assert loaded.server_round == 3 and loaded.client_states is None


def test_unknown_attribute_types_are_refused_by_name():
    strategy = FedAdam()
    strategy.lock = memoryview(b"x")
    with pytest.raises(TypeError, match="cannot checkpoint lock: unsupported type memoryview"):
        capture_attributes(strategy)


def test_random_generators_continue_where_they_were():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(*state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_client_state_bytes_round_trip():
    state = RecordDict({
        "variate": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
        "accountant": ConfigRecord({"history": [0.5, 0.01], "name": "rdp"}),
        "counts": MetricRecord({"steps": 12}),
    })
    back = state_from_bytes(state_to_bytes(state))
    np.testing.assert_array_equal(back["variate"]["w"].numpy(), state["variate"]["w"].numpy())
    assert dict(back["accountant"]) == dict(state["accountant"])
    assert dict(back["counts"]) == {"steps": 12}


def test_inprocess_grid_keeps_a_clients_state_only_when_its_reply_is_no_error(tmp_path):
    """The message path: each message's Context gets the client's state from the store, and
    what the ClientApp leaves in it goes back unless the client failed."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    counting = ClientApp()

    @counting.train()
    def count(message: Message, context: Context) -> Message:
        calls = int(context.state["calls"]["count"]) + 1 if "calls" in context.state else 1
        context.state["calls"] = MetricRecord({"count": calls})
        if message.content["config"]["fail"]:
            raise RuntimeError("failing after changing the state")
        return Message(RecordDict({"metrics": MetricRecord({"calls": calls})}),
                       reply_to=message)

    grid = InProcessGrid(counting, to_run_config(tiny_config(tmp_path)), 3)
    node = list(grid.get_node_ids())[1]

    def send(fail: bool) -> Message:
        message = Message(RecordDict({"config": ConfigRecord({"fail": fail})}), node, "train")
        (reply,) = grid.send_and_receive([message])
        return reply

    assert send(False).content["metrics"]["calls"] == 1
    assert send(True).has_error()
    assert send(False).content["metrics"]["calls"] == 2  # the failed call's change is gone
    assert grid.client_states.clients() == [1]
    assert dict(grid.client_states.get(1)["calls"]) == {"count": 2}


class StopAfter(LogReporter):
    """Sets ``stop`` when round ``after`` ends (what Ctrl-C does from the signal handler)."""

    def __init__(self, stop, after: int) -> None:
        self.stop, self.after = stop, after

    def round_end(self, row) -> None:
        if row.round == self.after:
            self.stop.set()


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _rows_without_time(run_dir: Path, name: str) -> list[dict[str, str]]:
    import csv

    with (run_dir / name).open(newline="") as handle:
        return [{k: v for k, v in row.items() if k not in ("wall_s", "duration_s")}
                for row in csv.DictReader(handle)]


def _assert_same_run(resumed: Path, reference: Path) -> None:
    ours, theirs = _weights(resumed), _weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name  # bit-identical
    for table in ("metrics.csv", "clients.csv"):
        assert _rows_without_time(resumed, table) == _rows_without_time(reference, table)
    if (reference / "personal.csv").exists():  # every client's models (personalisation)
        assert _rows_without_time(resumed, "personal.csv") == _rows_without_time(
            reference, "personal.csv")
    # what the strategy aggregated: one line per round, none twice
    assert _aggregated_rounds(resumed) == _aggregated_rounds(reference)


def _aggregated_rounds(run_dir: Path) -> list[int]:
    lines = (run_dir / "strategy_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["round"] for line in lines]


SEEDED = "privacy.insecure_reproducible_noise=true"
STATEFUL = {
    "fedavg": [],
    "fedadam": ["strategy.name=fedadam"],  # server moments
    "scaffold": ["strategy.name=scaffold", "client.optimizer=sgd", "client.lr=0.05"],  # variates
    "scaffold_on_disk": ["strategy.name=scaffold", "client.optimizer=sgd", "client.lr=0.05",
                         "engine.client_state_memory_mb=0"],  # every variate in a file
    "feddyn": ["strategy.name=feddyn"],  # server state and client gradients
    # personal models in the clients' states; every client evaluated every other round
    "ditto": ["strategy.name=ditto", "run.personal_eval_every=2"],
    "fedrep_on_disk": ["strategy.name=fedrep", "run.personal_eval_every=2",
                       "engine.client_state_memory_mb=0"],  # personal heads in files
    # heads kept in the states' bytes by clients trained together (fedtune.state.arrays)
    "fedper_on_disk": ["strategy.name=fedper", "run.personal_eval_every=2",
                       "engine.client_state_memory_mb=0"],
    # the virtual clock; the asynchronous loop's clients in flight, their updates, the buffer
    "devices": ["devices.profile=lognormal", "devices.slow_fraction=0.25"],
    "fedbuff": ["strategy.name=fedbuff", "devices.profile=lognormal",
                "devices.slow_fraction=0.25", "strategy.fedbuff_buffer_size=2",
                "strategy.concurrency=3"],
    "fedasync": ["strategy.name=fedasync", "devices.profile=lognormal",
                 "strategy.concurrency=3"],
    # every client in flight and a buffer of 3: updates from one start model summed as a
    # group (strategies/fedbuff.py's settle), the calls' results encoded once (FrozenMapping)
    "fedbuff_groups": ["strategy.name=fedbuff", "devices.profile=lognormal",
                       "data.num_clients=6", "strategy.fedbuff_buffer_size=3",
                       "strategy.concurrency=6"],
    # DP runs repeat bit for bit only with seeded noise (not private); a private run's resume:
    # test_a_private_run_resumes_with_fresh_noise_and_the_same_accountant
    "central_dp": ["privacy.mode=central", "privacy.noise_multiplier=0.5",
                   "privacy.delta=1e-3", "privacy.clip_norm=5.0",
                   "privacy.adaptive_clipping=false", SEEDED],  # accountant, noise RNG
    "central_dp_fedadam": ["privacy.mode=central", "privacy.noise_multiplier=0.05",
                           "privacy.delta=1e-3", "strategy.name=fedadam",
                           SEEDED],  # moments, clip
    # DP-FedBuff: the clipped updates in flight, the release count that seeds the noise
    "central_dp_fedbuff": ["strategy.name=fedbuff", "devices.profile=lognormal",
                           "strategy.fedbuff_buffer_size=2", "strategy.concurrency=3",
                           "privacy.mode=central", "privacy.noise_multiplier=0.5",
                           "privacy.delta=1e-3", "privacy.clip_norm=5.0",
                           "privacy.adaptive_clipping=false", SEEDED],
    "local_dp": ["privacy.mode=local", "privacy.noise_multiplier=0.8",
                 "privacy.delta=1e-3", SEEDED],  # client accountants in Context.state
}


@pytest.mark.parametrize("extra", STATEFUL.values(), ids=STATEFUL.keys())
def test_stopped_run_resumes_bit_identical(tmp_path, extra, one_torch_thread):
    """The interrupted half runs ``run_federated`` itself, without ``run_inprocess``'s thread
    limit: one torch thread for it too, as the reference has (two threads sum in another
    order)."""
    import threading

    reference = run_inprocess(tiny_config(tmp_path / "a", *FIVE_ROUNDS, *extra)).path
    statuses = {row["status"] for row in _rows_without_time(reference, "clients.csv")}
    assert statuses == {"ok"}  # every update was aggregated: the state really moved

    config = tiny_config(tmp_path / "b", *FIVE_ROUNDS, "run.checkpoint_every=0", *extra)
    stop = threading.Event()
    grid = InProcessGrid(client_app, to_run_config(config), config.data.num_clients)
    with pytest.raises(RunStopped):
        run_federated(grid, config, StopAfter(stop, after=2), stop)
    assert read_checkpoint(Path(config.run.dir)).server_round == 2
    assert len(_rows_without_time(Path(config.run.dir), "metrics.csv")) == 2

    config.run.resume = True
    resumed = run_inprocess(config).path  # a fresh grid: client states come from the checkpoint
    _assert_same_run(resumed, reference)


@pytest.mark.parametrize("extra", [STATEFUL["central_dp"][:-1], STATEFUL["local_dp"][:-1]],
                         ids=["central_dp", "local_dp"])
def test_a_private_run_resumes_with_fresh_noise_and_the_same_accountant(tmp_path, extra):
    """Secret noise keeps no state, so the checkpoint holds none: a resumed private run draws
    fresh noise for the rounds it still plays (its model differs from an uninterrupted run's)
    while the accountant carries on exactly (the same ε every round)."""
    import threading

    reference = run_inprocess(tiny_config(tmp_path / "a", *FIVE_ROUNDS, *extra)).path
    config = tiny_config(tmp_path / "b", *FIVE_ROUNDS, "run.checkpoint_every=0", *extra)
    stop = threading.Event()
    grid = InProcessGrid(client_app, to_run_config(config), config.data.num_clients)
    with pytest.raises(RunStopped):
        run_federated(grid, config, StopAfter(stop, after=2), stop)
    config.run.resume = True
    resumed = run_inprocess(config).path
    column = "epsilon" if "privacy.mode=central" in extra else "max_client_epsilon"
    epsilons = [[float(r[column]) for r in _rows_without_time(run, "metrics.csv")]
                for run in (resumed, reference)]
    assert len(epsilons[0]) == 5 and epsilons[0] == pytest.approx(epsilons[1], rel=1e-9)
    assert (resumed / "model/model.safetensors").read_bytes() != (
        reference / "model/model.safetensors").read_bytes()


def test_rows_written_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    reference = run_inprocess(tiny_config(tmp_path / "a", *FIVE_ROUNDS)).path
    config = tiny_config(tmp_path / "b", *FIVE_ROUNDS, "run.checkpoint_every=2")
    run_dir = run_inprocess(config).path
    assert read_checkpoint(run_dir).server_round == 4
    # as if killed after round 5's rows were written but before its checkpoint
    (run_dir / "model" / "model.safetensors").unlink()
    config.run.resume = True
    resumed = run_inprocess(config).path
    _assert_same_run(resumed, reference)


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tmp_path):
    config = tiny_config(tmp_path, "run.checkpoint_every=0", "run.rounds=1")
    run_inprocess(config)
    config.run.resume = True
    with pytest.raises(ConfigError, match="has no checkpoint"):
        run_inprocess(config)
    config = tiny_config(tmp_path / "c", "run.rounds=2")
    run_inprocess(config)
    changed = tiny_config(tmp_path / "c", "run.rounds=3", "client.lr=0.5")
    changed.run.resume = True
    with pytest.raises(ConfigError, match=r"client.lr = 0.5 is not allowed when resuming: must "
                                          r"be 0.01"):
        run_inprocess(changed)
    shorter = tiny_config(tmp_path / "c", "run.rounds=1")
    shorter.run.resume = True
    with pytest.raises(ConfigError, match="run.rounds = 1 is not allowed when resuming"):
        run_inprocess(shorter)


def test_a_finished_run_can_be_extended(tmp_path):
    reference = run_inprocess(tiny_config(tmp_path / "a", *FIVE_ROUNDS)).path
    config = tiny_config(tmp_path / "b", "run.rounds=3", *FIVE_ROUNDS[1:])
    run_inprocess(config)
    config.run.rounds, config.run.resume = 5, True
    _assert_same_run(run_inprocess(config).path, reference)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune", "run", *args]


def _cli_overrides() -> list[str]:
    # more local steps than the tiny config so that a round lasts long enough to be hit
    settings = [*MLP_DIGITS, *FIVE_ROUNDS, "client.local_steps=40"]
    return [arg for setting in settings for arg in ("--set", setting)]


def _checkpointed(run_dir: Path) -> int:
    try:
        return checkpoint_round(run_dir) or 0
    except OSError:  # caught while the writer swapped checkpoint directories
        return 0


def _wait_for_rows(run_dir: Path, rows: int, process: subprocess.Popen, timeout: float) -> None:
    """Until round ``rows`` is on disk: its metrics row and then its checkpoint (a round's rows
    are written before its checkpoint, so a kill in between would meet the previous one)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.csv"
    while time.monotonic() < deadline:
        if (metrics.exists() and len(metrics.read_text().splitlines()) - 1 >= rows
                and _checkpointed(run_dir) >= rows):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{rows} rounds not finished within {timeout}s")


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted CLI run the killed ones must end up identical to."""
    reference = tmp_path_factory.mktemp("cli") / "reference"
    subprocess.run(_cli(*_cli_overrides(), "--output", str(reference)), check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                   timeout=300)
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_killed_cli_run_resumes_bit_identical(tmp_path, how, cli_reference):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli(*_cli_overrides(), "--output", str(killed)), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_rows(killed, 2, process, timeout=240)
        process.send_signal(how)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    if how == signal.SIGINT:
        assert process.returncode == 130, output
        assert f"fedtune run --resume {killed}" in output
    else:
        assert process.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()  # it really stopped early
    stopped_at = read_checkpoint(killed).server_round
    assert 2 <= stopped_at < 5

    resumed = subprocess.run(_cli("--resume", str(killed)), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(killed, cli_reference)


def test_cli_resume_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(_cli("--resume", str(tmp_path)), env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"fedtune: error: --resume {str(tmp_path)!r} is not "
                                     "allowed: must be a run directory (it has no config.toml)")


@pytest.mark.slow
def test_ray_engine_run_stopped_and_resumed_is_bit_identical(tmp_path):
    """The fast engine seeds every client by (seed, round, client) and aggregates in client
    order, so its resumed runs are bit-identical too (client states travel through the
    checkpoint: SCAFFOLD's variates here)."""
    import threading

    from fedtune.engine.ray_engine import run_ray_engine

    scaffold = [*STATEFUL["scaffold"], "engine.backend=ray", "engine.num_actors=2",
                "engine.client_cpus=0.5"]
    reference = run_ray_engine(tiny_config(tmp_path / "a", *FIVE_ROUNDS, *scaffold)).path
    config = tiny_config(tmp_path / "b", *FIVE_ROUNDS, "run.checkpoint_every=0", *scaffold)
    stop = threading.Event()
    with pytest.raises(RunStopped):
        run_ray_engine(config, StopAfter(stop, after=2), stop)
    checkpoint = read_checkpoint(Path(config.run.dir))
    assert checkpoint.server_round == 2
    assert len(checkpoint.client_states.digests) >= 2  # the variates of those that trained
    config.run.resume = True
    _assert_same_run(run_ray_engine(config).path, reference)


def test_resuming_a_finished_run_with_a_changed_key_is_refused(tmp_path, capsys):
    """A finished run has nothing to continue; a changed key used to be ignored ("nothing to
    do"), now it is refused as for an unfinished run."""
    from fedtune.cli import main

    config = tiny_config(tmp_path, "run.rounds=1")
    run_dir = run_inprocess(config).path
    assert main(["run", "--resume", str(run_dir), "--set", "client.lr=0.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fedtune: error: client.lr = 0.5 is not allowed when resuming: must be 0.01 as in "
        f"{run_dir}/config.toml (only run.rounds, run.checkpoint_every, engine.* and "
        "tracking.* may change)")
    assert main(["run", "--resume", str(run_dir)]) == 0  # unchanged: nothing to do


@pytest.mark.slow
def test_a_killed_ditto_run_resumes_bit_identical_with_every_clients_models(tmp_path):
    """SIGKILL mid-run: the personal models in the clients' states, personal.csv (every client
    evaluated every round) and the global model all end up as an uninterrupted run's."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ditto = [arg for setting in ("strategy.name=ditto", "run.personal_eval_every=1")
             for arg in ("--set", setting)]
    reference = tmp_path / "reference"
    subprocess.run(_cli(*_cli_overrides(), *ditto, "--output", str(reference)), check=True,
                   env=env, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli(*_cli_overrides(), *ditto, "--output", str(killed)),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        _wait_for_rows(killed, 2, process, timeout=240)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=120)
    finally:
        process.kill()
    assert not (killed / "summary.json").exists()
    resumed = subprocess.run(_cli("--resume", str(killed)), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(killed, reference)
    rounds = {row["round"] for row in _rows_without_time(killed, "personal.csv")}
    assert rounds == {"1", "2", "3", "4", "5"}


def test_a_frozen_mapping_is_encoded_once_per_path():
    """The asynchronous loop's per-call results (``FrozenMapping``) are walked at the first capture
    only; a later capture reuses the node and arrays, and restoring gives a plain dict."""
    from fedtune.server.checkpoint import FrozenMapping

    block = np.arange(6, dtype=np.float32).reshape(2, 3).copy()  # owns its data
    block.flags.writeable = False
    holder = SimpleNamespace(results={"7": FrozenMapping({"trained": [{"w": block}], "n": 2})})
    first, second = capture_attributes(holder), capture_attributes(holder)
    assert first[0]["results"]["map"]["7"] is second[0]["results"]["map"]["7"]
    assert second[1]["results.7.trained.0.w"] is block  # read-only: no copy
    restored = SimpleNamespace(results={})
    restore_attributes(restored, *second)
    assert type(restored.results["7"]) is dict and restored.results["7"]["n"] == 2
    np.testing.assert_array_equal(restored.results["7"]["trained"][0]["w"], block)


def test_a_checkpoint_whose_table_of_clients_in_flight_has_other_columns_is_refused():
    """A checkpoint of an asynchronous run written before the start number joined the table
    of clients in flight (7 columns, now 8) would be misread: refused in one line, naming it."""
    from fedtune.server.checkpoint import CheckpointError
    from fedtune.server.resume import _refuse_another_event_loop

    def stateful(columns: int) -> SimpleNamespace:
        return SimpleNamespace(async_loop=SimpleNamespace(flight=np.zeros((3, columns)), now=1.0))

    _refuse_another_event_loop(stateful(8), *capture_attributes(stateful(8)))  # the same: fine
    with pytest.raises(CheckpointError, match=r"another version of fedtune \(its state differs "
                                              r"in flight\)"):
        _refuse_another_event_loop(stateful(8), *capture_attributes(stateful(7)))
