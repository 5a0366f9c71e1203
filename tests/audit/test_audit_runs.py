"""privacy.audit in runs: canary clients (central DP) and canary examples (local DP, none),
audit.json and its plot, `fedtune audit RUN_DIR`, and a violation reported loudly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fedtune.cli import main
from fedtune.config import ConfigError
from fedtune.engine.inprocess import run_inprocess
from fedtune.task import task_resources
from tests.conftest import rows_of, tiny_config

FEDERATION = ["data.num_clients=40", "strategy.fraction_train=0.5", "run.rounds=4",
              "strategy.fraction_evaluate=0"]
CENTRAL = [*FEDERATION, "privacy.mode=central", "privacy.delta=0.001", "privacy.clip_norm=1",
           "privacy.adaptive_clipping=false", "privacy.audit_canaries=100"]


def _audit(run_dir) -> dict:
    return json.loads((run_dir / "audit.json").read_text())


def _without_time(path):
    return [{k: v for k, v in row.items() if k not in ("wall_s", "duration_s")}
            for row in rows_of(path)]


@pytest.mark.slow
def test_canary_clients_measure_a_large_epsilon_without_noise_and_never_touch_accuracy(
        tmp_path, capsys):
    # the same cohorts in both runs: the sampling is seeded (not private; there is no noise);
    # a tiny δ leaves the one-run bound its power (its δ term is 2 m δ times a tail)
    seeded = ("privacy.target_epsilon=inf", "privacy.insecure_reproducible_noise=true",
              "privacy.delta=1e-10")
    plain = run_inprocess(tiny_config(tmp_path / "plain", *CENTRAL, *seeded)).path
    audited = run_inprocess(tiny_config(tmp_path / "audited", *CENTRAL, *seeded,
                                        "privacy.audit=true")).path
    # the canaries went into a shadow release only: every reported number is the same
    assert _without_time(audited / "metrics.csv") == _without_time(plain / "metrics.csv")
    assert _without_time(audited / "clients.csv") == _without_time(plain / "clients.csv")
    assert (audited / "model/model.safetensors").read_bytes() == (
        plain / "model/model.safetensors").read_bytes()
    audit = _audit(audited)
    assert audit["kind"].startswith("user-level") and audit["canaries"] == 100
    assert audit["accountant_epsilon"] == "inf" and not audit["violation"]
    assert audit["empirical_epsilon"] > 5  # no noise: the audit sees the canaries plainly
    assert audit["empirical_is"] == "estimate" and audit["estimate_reference"] is None
    assert audit["epsilon_lower_bound"] > 0.5  # and the one-run bound on the same cosines
    assert np.mean(audit["inserted_values"]) > np.mean(audit["held_out_values"])
    assert (audited / "plots/audit.png").read_bytes()[:4] == b"\x89PNG"
    # fedtune audit RUN_DIR redoes it from what the run directory kept
    assert main(["audit", str(audited)]) == 0
    assert _audit(audited)["empirical_epsilon"] == pytest.approx(audit["empirical_epsilon"])
    printed = capsys.readouterr().out
    assert f"estimate ε {audit['empirical_epsilon']:.3g}" in printed
    assert f"lower bound ε {audit['epsilon_lower_bound']:.3g} (no violation)" in printed
    # an accountant claiming less than the audit's lower bound is reported loudly
    broken = tmp_path / "broken"
    shutil.copytree(audited, broken)
    summary = json.loads((broken / "summary.json").read_text())
    summary["privacy"]["epsilon"] = 0.5
    (broken / "summary.json").write_text(json.dumps(summary))
    assert main(["audit", str(broken)]) == 1
    assert "VIOLATION" in capsys.readouterr().out and _audit(broken)["violation"]


def test_canary_clients_under_noise_stay_below_the_accountant(tmp_path):
    run_dir = run_inprocess(tiny_config(tmp_path, *CENTRAL, "privacy.target_epsilon=2",
                                        "privacy.audit=true")).path
    audit = _audit(run_dir)
    assert 1.5 < audit["accountant_epsilon"] <= 2.0
    assert audit["epsilon_lower_bound"] <= audit["accountant_epsilon"]
    assert not audit["violation"]
    reference = audit["estimate_reference"]  # what the estimate reads at the accountant's ε
    assert reference["epsilon"] == audit["accountant_epsilon"] and reference["inserted"] == 50
    assert reference["low"] < audit["accountant_epsilon"] < reference["high"]
    assert audit["dimension"] == 64 * 32 + 32 + 32 * 10 + 10  # the MLP's floats


def test_canary_examples_go_into_training_rows_only_and_are_audited(tmp_path):
    config = tiny_config(tmp_path, *FEDERATION, "privacy.audit=true",
                         "privacy.audit_examples=100")
    resources = task_resources(config)
    canaries, federation = resources.canaries, resources.federation
    assert canaries.count == 100 and 30 < canaries.included.sum() < 70
    assert len(federation.data.labels) == canaries.rows[-1] + 1
    assert resources.encoded.values.shape[0] == len(federation.data.labels)
    held = {int(row) for rows in federation.client_train_rows for row in rows}
    for row, client, inside in zip(canaries.rows, canaries.clients, canaries.included,
                                   strict=True):
        assert (row in federation.client_train_rows[client]) == bool(inside)
        assert inside or row not in held
    tested = np.concatenate([federation.test_rows, *federation.client_test_rows])
    assert not np.isin(canaries.rows, tested).any()  # never in the reported accuracy
    run_dir = run_inprocess(config).path
    audit = _audit(run_dir)
    assert audit["kind"].startswith("sample-level")
    assert audit["accountant_epsilon"] == "inf" and audit["empirical_epsilon"] >= 0
    assert audit["empirical_is"] == "lower bound"
    assert audit["epsilon_lower_bound"] == audit["empirical_epsilon"]
    assert len(audit["inserted_values"]) == canaries.included.sum()
    assert max(t["guesses"] for t in audit["bound"]["tried"]) == 100


@pytest.mark.slow
def test_local_dp_runs_with_canary_examples(tmp_path):
    run_dir = run_inprocess(tiny_config(tmp_path, *FEDERATION, "privacy.mode=local",
                                        "privacy.target_epsilon=2", "privacy.audit=true",
                                        "privacy.audit_examples=100", "privacy.delta=0.001",
                                        "run.rounds=2")).path
    audit = _audit(run_dir)
    assert 0 < audit["accountant_epsilon"] <= 2.0
    assert audit["empirical_epsilon"] <= audit["accountant_epsilon"]


def test_auditing_a_run_without_canaries_is_refused(tmp_path):
    run_dir = run_inprocess(tiny_config(tmp_path, "run.rounds=1")).path
    with pytest.raises(ConfigError, match="ran with privacy.audit = false"):
        from fedtune.audit.report import audit_run_dir

        audit_run_dir(run_dir)
