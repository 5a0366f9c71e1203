"""Whole runs with SecAgg+ (fedtune's ClientApp, MLP on digits): the same model as without it
within the quantisation bound, dropouts and failed rounds in clients.csv and metrics.csv,
distributed DP with the central accountant, and the other runtimes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedtune.engine.inprocess import run_inprocess
from fedtune.engine.launch import launch
from fedtune.privacy.accounting import epsilon
from fedtune.secagg import distributed_dp, masking
from tests.conftest import rows_of, tiny_config

SECURE = ("strategy.secure_aggregation=true",)


def _model(run_dir) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _strategy_metrics(run_dir) -> list[dict]:
    lines = (run_dir / "strategy_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train"] for line in lines]


@pytest.mark.parametrize("bits", [16, 24])
def test_a_secure_round_gives_plain_fedavgs_model_within_the_bound(tmp_path, bits):
    common = ("run.rounds=1", "data.num_clients=5")
    plain = run_inprocess(tiny_config(tmp_path, *common, f"run.dir={tmp_path / 'plain'}")).path
    secure = run_inprocess(tiny_config(tmp_path, *common, *SECURE, f"strategy.secagg_bits={bits}",
                                       f"run.dir={tmp_path / 'secure'}")).path
    bound = masking.rounding_bound(1.0, bits)
    reference = _model(plain)
    worst = max(float(np.abs(value - reference[name]).max())
                for name, value in _model(secure).items())
    assert worst <= bound + 1e-6
    metrics = _strategy_metrics(secure)[0]
    assert metrics["secagg-rounding-bound"] == pytest.approx(bound)
    assert metrics["secagg-clipped"] == 0
    (plain_row,), (secure_row,) = rows_of(plain / "metrics.csv"), rows_of(secure / "metrics.csv")
    assert secure_row["eval_accuracy"] == plain_row["eval_accuracy"]  # accuracy unchanged
    assert abs(float(secure_row["eval_loss"]) - float(plain_row["eval_loss"])) < 1e-4
    # the masked vectors and the key set-up cost bytes: both are counted
    assert int(secure_row["bytes_up"]) > int(plain_row["bytes_up"])


def test_clients_csv_says_who_dropped_at_which_stage_and_a_failed_round_is_recorded(tmp_path):
    # 6 clients, complete graph: t = 3 of 5 neighbours, 4 inputs needed, 2 dropouts tolerated;
    # seed 96 crashes client 3 in round 1, clients 0, 2, 3 in round 2, nobody in round 3
    config = tiny_config(tmp_path, *SECURE, "data.num_clients=6", "run.rounds=3",
                         "run.seed=96", "faults.crash_probability=0.3",
                         "faults.crash_stage=share-keys", "strategy.fraction_evaluate=0")
    run_dir = run_inprocess(config).path
    clients = rows_of(run_dir / "clients.csv")
    by_round = {r: {int(row["client_id"]): row for row in clients if row["round"] == str(r)}
                for r in (1, 2, 3)}
    assert all(len(rows) == 6 for rows in by_round.values())
    assert by_round[1][3]["status"] == "failed"
    assert by_round[1][3]["reason"].startswith("secagg share-keys: ")
    assert "injected fault" in by_round[1][3]["reason"]
    assert [c for c, row in by_round[1].items() if row["status"] == "ok"] == [0, 1, 2, 4, 5]
    # round 2: three dropouts at share-keys are one too many: the round fails, nobody's
    # update is used, and the run goes on
    assert sorted(c for c, row in by_round[2].items() if row["status"] == "failed") == [0, 2, 3]
    for client in (1, 4, 5):
        assert by_round[2][client]["status"] == "rejected"
        assert by_round[2][client]["reason"].startswith("secure aggregation failed: 3 of 6")
    assert all(row["status"] == "ok" for row in by_round[3].values())
    rounds = rows_of(run_dir / "metrics.csv")
    assert [(r["clients_sampled"], r["clients_ok"]) for r in rounds] == [
        ("6", "5"), ("6", "0"), ("6", "6")]
    assert rounds[1]["eval_loss"] == rounds[0]["eval_loss"]  # the model stayed as it was
    assert rounds[2]["eval_loss"] != rounds[1]["eval_loss"]
    failed = [m["secagg-failed"] for m in _strategy_metrics(run_dir)]
    assert failed == [0, 1, 0]


def test_a_dropout_after_masking_is_recovered_and_named(tmp_path):
    # seed 96 at unmask: client 3 vanishes in round 1 after its input was masked
    config = tiny_config(tmp_path, *SECURE, "data.num_clients=6", "run.rounds=1",
                         "run.seed=96", "faults.crash_probability=0.3",
                         "faults.crash_stage=unmask", "strategy.fraction_evaluate=0")
    run_dir = run_inprocess(config).path
    rows = {int(row["client_id"]): row for row in rows_of(run_dir / "clients.csv")}
    assert all(row["status"] == "ok" for row in rows.values())  # 3's input is in the sum
    assert rows[3]["reason"].startswith("secagg unmask: ")
    assert "recovered from its neighbours' shares" in rows[3]["reason"]
    assert _strategy_metrics(run_dir)[0]["secagg-survivors"] == 6


def test_distributed_dp_accounts_as_central_dp(tmp_path):
    # central DP samples clients by secret Poisson draws (no seed): 16 clients at q = 0.75 give
    # SecAgg+ fewer than 3 clients with probability ~5e-7 a run; 8 did ~1 run in 120 (a CI run
    # of 2026-12-05 drew 3 and 2)
    dp = ("privacy.mode=central", "privacy.noise_multiplier=0.8", "privacy.delta=1e-3",
          "privacy.adaptive_clipping=false", "strategy.fraction_train=0.75",
          "data.num_clients=16", "run.rounds=2", "strategy.fraction_evaluate=0")
    central = run_inprocess(tiny_config(tmp_path, *dp, f"run.dir={tmp_path / 'c'}")).path
    distributed = run_inprocess(tiny_config(tmp_path, *dp, *SECURE,
                                            f"run.dir={tmp_path / 'd'}")).path
    c_rows, d_rows = rows_of(central / "metrics.csv"), rows_of(distributed / "metrics.csv")
    assert [r["epsilon"] for r in d_rows] == [r["epsilon"] for r in c_rows]  # same accountant
    assert float(d_rows[-1]["epsilon"]) > 0
    summary = json.loads((distributed / "summary.json").read_text())
    assert summary["privacy"]["noise_multiplier"] == 0.8
    for metrics in _strategy_metrics(distributed):
        assert metrics["secagg-failed"] == 0 and "dp-unclipped" not in metrics
        assert 0 < metrics["secagg-dp-clip-bound"] <= distributed_dp.CLIP_PROBABILITY * 1.001
    assert "distributed" not in json.loads((central / "summary.json").read_text())["privacy"]


def test_fewer_than_m_min_inputs_release_nothing_and_the_server_sees_who_took_part(tmp_path):
    """6 clients, q = 1, m_min = 4: seed 96 crashes client 3 in round 1 and clients 0, 2, 3 in
    round 2 (3 inputs left), nobody in round 3. Round 2 fails: the model stays, so its noise
    shares, sized for 4 inputs, never had to cover 3 (sigma sqrt(3/4) would be what 3 give).
    The accountant still counts round 2 (an upper bound). Against the server, which picked
    the cohort, epsilon is that of the 2 rounds a client's update was summed, without
    amplification by sampling."""
    config = tiny_config(tmp_path, *SECURE, "data.num_clients=6", "run.rounds=3",
                         "run.seed=96", "faults.crash_probability=0.3",
                         "faults.crash_stage=share-keys", "strategy.fraction_evaluate=0",
                         "privacy.mode=central", "privacy.noise_multiplier=1.5",
                         "privacy.delta=0.01", "privacy.adaptive_clipping=false",
                         "strategy.fraction_train=1.0")
    run_dir = run_inprocess(config).path
    failed = [m["secagg-failed"] for m in _strategy_metrics(run_dir)]
    assert failed == [0, 1, 0]
    rows = rows_of(run_dir / "metrics.csv")
    assert [float(r["epsilon"]) for r in rows][-1] == pytest.approx(
        epsilon([(1.5, 1.0, 3)], 0.01, "rdp"))
    summary = json.loads((run_dir / "summary.json").read_text())["privacy"]["distributed"]
    assert summary["max_participations"] == 2
    assert summary["epsilon_against_server"] == pytest.approx(
        epsilon([(1.5, 1.0, 2)], 0.01, "rdp"))
    assert summary["quantiser_clip_probability"] <= 2.002 * distributed_dp.CLIP_PROBABILITY
    assert summary["delta_with_quantiser"] == pytest.approx(0.01, rel=1e-6)
    assert distributed_dp.honest_noise_multiplier(1.5, 3, 4) == pytest.approx(1.5 * 0.75**0.5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray", "flower"])
def test_secure_aggregation_on_the_ray_runtimes(tmp_path, backend):
    config = tiny_config(tmp_path, *SECURE, f"engine.backend={backend}", "run.rounds=2",
                         "strategy.fraction_evaluate=0", "data.num_clients=4",
                         *(["engine.num_actors=1"] if backend == "ray" else []))
    run_dir = launch(config).path
    rounds = rows_of(run_dir / "metrics.csv")
    assert [r["clients_ok"] for r in rounds] == ["4", "4"]
    assert [m["secagg-survivors"] for m in _strategy_metrics(run_dir)] == [4, 4]
    plain = run_inprocess(tiny_config(tmp_path, "run.rounds=2", "strategy.fraction_evaluate=0",
                                      "data.num_clients=4", f"run.dir={tmp_path / 'plain'}"))
    reference = _model(plain.path)
    worst = max(float(np.abs(v - reference[k]).max()) for k, v in _model(run_dir).items())
    assert worst < 1e-4  # two rounds: the rounding (< 1.2e-7) moves round 2's start a little


def test_a_stopped_secure_run_resumes_bit_identical(tmp_path, one_torch_thread):
    """The masks are fresh randomness every round, but they cancel exactly and the rounding is
    seeded: a resumed run ends with the same model, and the checkpoint holds no client secret."""
    import threading
    from pathlib import Path

    from fedtune.client.app import app as client_app
    from fedtune.config import to_run_config
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.server.app import run_federated
    from fedtune.server.checkpoint import read_checkpoint
    from fedtune.server.exchange import RunStopped
    from fedtune.state.blobs import STATE_DIR, StateBlobs
    from fedtune.state.codec import state_from_bytes
    from tests.server.test_resume import FIVE_ROUNDS, StopAfter, _assert_same_run

    extra = (*SECURE, "strategy.name=fedadam", "strategy.fraction_train=0.75")
    reference = run_inprocess(tiny_config(tmp_path / "a", *FIVE_ROUNDS, *extra)).path
    config = tiny_config(tmp_path / "b", *FIVE_ROUNDS, *extra, "run.checkpoint_every=0")
    stop = threading.Event()
    grid = InProcessGrid(client_app, to_run_config(config), config.data.num_clients)
    with pytest.raises(RunStopped):
        run_federated(grid, config, StopAfter(stop, after=2), stop)
    checkpoint = read_checkpoint(Path(config.run.dir))
    assert checkpoint.server_round == 2
    blobs = StateBlobs(Path(config.run.dir) / STATE_DIR)
    for digest in checkpoint.client_states.digests.values():
        kept = state_from_bytes(blobs.read(digest)).config_records.get("secagg-state", {})
        assert not {"mask-seed", "seal-private", "self-seed", "seal-keys", "seed-shares",
                    "key-shares"} & set(kept)
    config.run.resume = True
    _assert_same_run(run_inprocess(config).path, reference)


# --- hostile clients in whole runs (issue 25, items 1 and 2) -----------------------------------

def _hostile_secure_run(tmp_path, attacks, *overrides):
    from fedtune.config import to_run_config
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.server.app import run_federated
    from tests.hostile_secagg import hostile_secagg_app

    config = tiny_config(tmp_path, *SECURE, "data.num_clients=6", "strategy.fraction_evaluate=0",
                         *overrides)
    grid = InProcessGrid(hostile_secagg_app(attacks), to_run_config(config), 6)
    return config, lambda: run_federated(grid, config).path


def test_clients_csv_names_the_attacker_and_nobody_else(tmp_path):
    """Client 1 seals a share that does not open; client 4 claims to be client 0 at setup.
    Before: client 1's receiver failed at masked input while client 1 stayed ok (and a setup
    claim rewrote the server's node -> client map). Now client 1 alone is rejected, its reason
    names the receiver by client id; client 4 is recorded as itself; every round applies."""
    from tests import hostile_secagg

    _, run = _hostile_secure_run(tmp_path, {1: hostile_secagg.BAD_SHARE,
                                            4: hostile_secagg.IMPERSONATE})
    run_dir = run()
    rows = {(int(r["round"]), int(r["client_id"])): r for r in rows_of(run_dir / "clients.csv")}
    assert sorted(rows) == [(r, c) for r in (1, 2) for c in range(6)]
    for server_round in (1, 2):
        attacker = rows[server_round, 1]
        assert attacker["status"] == "rejected"
        assert attacker["reason"].startswith("secagg masked-input: its share for client ")
        assert "does not open (checked with the key that node revealed)" in attacker["reason"]
        assert {rows[server_round, c]["status"] for c in (0, 2, 3, 4, 5)} == {"ok"}
    assert [m["model_update"] for m in rows_of(run_dir / "metrics.csv")] == ["applied"] * 2


def test_an_input_outside_the_range_stops_the_run_with_one_line(tmp_path):
    from fedtune.server.loop import RunFailed
    from tests import hostile_secagg

    _, run = _hostile_secure_run(tmp_path, {2: hostile_secagg.SHIFTED_INPUT}, "run.rounds=3",
                                 "run.max_rounds_without_update=2")
    with pytest.raises(RunFailed, match="2 rounds in a row without an update.*secure "
                                        "aggregation failed: the unmasked sum is outside what 6 "
                                        "inputs in range add up to"):
        run()
    metrics = rows_of(tmp_path / "run" / "metrics.csv")
    assert [m["model_update"].split(":")[0:2] for m in metrics] == [
        ["kept", " secure aggregation failed"]]


def test_a_commitment_no_seed_matches_stops_one_round_not_the_run_even_across_a_resume(tmp_path):
    """Client 2 commits to no seed in every round. Before: every round failed at unmask, and
    the run failed after run.max_rounds_without_update. Now round 1 fails naming it (and only
    it); the run stops there and resumes, and round 2 leaves it out (clients.csv says why) and
    applies the other clients' update; the log says so once."""
    import logging
    import threading

    from fedtune.config import to_run_config
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.server.app import run_federated
    from fedtune.server.exchange import RunStopped
    from tests import hostile_secagg
    from tests.hostile_secagg import hostile_secagg_app
    from tests.server.test_resume import StopAfter

    attacks = {2: hostile_secagg.WRONG_COMMITMENT}
    config = tiny_config(tmp_path, *SECURE, "data.num_clients=6", "strategy.fraction_evaluate=0",
                         "run.rounds=2", "run.max_rounds_without_update=2")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("flwr").addHandler(handler)
    try:
        stop = threading.Event()
        with pytest.raises(RunStopped):
            run_federated(InProcessGrid(hostile_secagg_app(attacks), to_run_config(config), 6),
                          config, StopAfter(stop, after=1), stop)
        config.run.resume = True
        run_dir = run_federated(InProcessGrid(hostile_secagg_app(attacks), to_run_config(config),
                                              6), config).path
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    rows = {(int(r["round"]), int(r["client_id"])): r for r in rows_of(run_dir / "clients.csv")}
    assert sorted(rows) == [(r, c) for r in (1, 2) for c in range(6)]
    culprit = rows[1, 2]
    assert culprit["status"] == "rejected"
    assert culprit["reason"].startswith("secagg unmask: client 2 (node ")
    assert culprit["reason"].endswith("; left out of every later round")
    assert {rows[1, c]["reason"].split(":")[0] for c in (0, 1, 3, 4, 5)} == {
        "secure aggregation failed"}
    assert rows[2, 2]["status"] == "rejected"  # round 2: after the resume
    assert rows[2, 2]["reason"] == (
        "excluded: its self-mask seed could not be recovered from 5 shares in round 1 (its "
        "commitment or the shares it dealt are bad)")
    assert {rows[2, c]["status"] for c in (0, 1, 3, 4, 5)} == {"ok"}
    updates = [m["model_update"] for m in rows_of(run_dir / "metrics.csv")]
    assert updates[0].startswith("kept: secure aggregation failed: client 2 (node ")
    assert updates[1:] == ["applied"]
    said = [line for line in lines if "left out of every later round of secure" in line]
    assert len(said) == 1 and said[0].startswith("fedtune: round 1: client 2 (node ")
