"""The central audit (``fedtune.audit.report.run_audit``) on DP-FedAvg's own shadow release:
an honest mechanism is never called a violation, one with a tenth of the noise the accountant
assumes is. The study-sized calibration is ``benchmarks/audit_calibration.py``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedtune.audit.report import run_audit
from fedtune.config import load_config
from fedtune.privacy.accounting import epsilon, noise_for_target
from strategies.dp_fedavg import DPFedAvg

# every canary joins every round (q = 1: the canary test is a plain Gaussian mechanism), in
# enough dimensions that 100 inserted canaries barely hide each other
DIMENSION, CANARIES, ROUNDS, RATE, DELTA = 5000, 200, 4, 1.0, 1e-5
NOISE = noise_for_target(2.0, DELTA, RATE, ROUNDS, "rdp")
ACCOUNTANT = epsilon([(NOISE, RATE, ROUNDS)], DELTA, "rdp")


def _audit(seed: int, noise_added: float) -> dict:
    """The audit of a shadow release whose accountant assumes ``NOISE`` but whose noise is
    ``noise_added`` (seeded from ``seed``, as are the canaries: a reproducible test)."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    strategy = DPFedAvg(sample_rate=RATE, noise_multiplier=noise_added, clipping_norm=1.0,
                        server_momentum=0.9, canaries=CANARIES, canary_seed=seed, seed=seed,
                        min_available_nodes=1)
    strategy.population = 50
    initial = np.zeros(DIMENSION, dtype=np.float32)
    current = initial
    for server_round in range(1, ROUNDS + 1):  # no real client: the release is noise and canaries
        strategy.current_arrays = ArrayRecord({"w": Array(current)})
        current = strategy.aggregate_train(server_round, [])[0]["w"].numpy()
    config = load_config(None, ["privacy.mode=central", "privacy.audit=true",
                                f"privacy.audit_canaries={CANARIES}", f"privacy.delta={DELTA}",
                                f"privacy.noise_multiplier={NOISE}", f"run.seed={seed}",
                                f"strategy.fraction_train={RATE}"])
    return run_audit(config, None, {"w": initial}, strategy.canary_release(), ACCOUNTANT)


def test_an_honest_release_is_never_a_violation_though_its_estimate_may_read_high():
    audits = [_audit(seed, NOISE) for seed in range(10)]
    for audit in audits:
        assert audit["epsilon_lower_bound"] <= ACCOUNTANT and not audit["violation"]
        assert audit["bound"]["design"] == "exactly half"
        reference = audit["estimate_reference"]
        assert reference["epsilon"] == ACCOUNTANT and reference["inserted"] == CANARIES // 2
        assert audit["empirical_epsilon"] <= reference["high"] and not audit["estimate_high"]
    # the estimate's bootstrap interval is no bound: its lower end passes the accountant's ε
    # in some honest runs (the rule that called the study's two ε = 1 audits violations)
    assert any(audit["interval"][0] > ACCOUNTANT for audit in audits)


def test_a_tenth_of_the_noise_is_a_violation():
    audit = _audit(0, NOISE / 10)
    assert audit["violation"] and audit["epsilon_lower_bound"] > ACCOUNTANT
    assert audit["estimate_high"] and audit["empirical_epsilon"] > 5 * ACCOUNTANT
    assert ACCOUNTANT == pytest.approx(2.0, abs=0.02)
