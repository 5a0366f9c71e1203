"""Central DP under FedBuff (strategies/dp_fedbuff.py), checked from outside its accountant.

- The release is the paper's buffered step on clipped, staleness-scaled updates plus one draw
  of N(0, σ²C²) on the sum, rebuilt here in NumPy from the seeded (not private) stream.
- Neighbouring buffers (one client's update in or out, any norm, any staleness) move the sum
  the noise covers by at most C; a second update of a client already in the buffer is refused.
- The secret noise has std σC on the sum and never repeats.
- ε of a real run by Google's dp-accounting (RDP and PLD of the Gaussian mechanism composed
  over the releases, no sampling) is at most the ε fedtune reports, and summary.json alone
  recomputes it.
"""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.engine.inprocess import run_inprocess
from strategies.dp_fedbuff import DPFedBuff
from strategies.fedbuff import staleness_weight
from tests.conftest import MLP_DIGITS, rows_of, tiny_config

X0 = {"w": np.array([[0.5, -1.0], [2.0, 0.25]], np.float32), "b": np.array([0.1, -0.2],
                                                                              np.float32),
      "steps": np.array([7], np.int64)}
RNG = np.random.default_rng(0)
# three clients' starts (stale models) and trained models, with update norms far above and
# below the bound
STARTS = [X0, {k: v + 0.5 if k != "steps" else v for k, v in X0.items()}, X0]
TRAINED = [{k: (v * 30.0 if k != "steps" else v + 3) for k, v in s.items()} for s in STARTS]
TRAINED[2] = {k: (v + 0.01 if k != "steps" else v) for k, v in STARTS[2].items()}
STALENESS = [0, 2, 5]
FLOATING = ("w", "b")


def _clipped(start, trained, clip):
    update = {k: trained[k].astype(np.float64) - start[k] for k in FLOATING}
    norm = np.sqrt(sum(float(np.sum(u ** 2)) for u in update.values()))
    return {k: u * min(1.0, clip / norm) for k, u in update.items()}


def test_dp_fedbuff_release_matches_a_numpy_reference():
    """x <- x + lr (Σ s(τ_i) clip_C(Δ_i) + N(0, σ²C²)) / K on the floating arrays; integer
    arrays keep the server's values; the noise is the seeded stream [seed, 2801, release]."""
    strategy = DPFedBuff(buffer_size=3, server_lr=0.5, noise_multiplier=0.7, clipping_norm=1.5,
                         seed=11)
    due = [strategy.receive(strategy.prepare(s, t), tau, 1.0, client)
           for client, (s, t, tau) in enumerate(zip(STARTS, TRAINED, STALENESS, strict=True))]
    assert due == [False, False, True]
    new = strategy.release(X0)
    noise = np.random.default_rng([11, 2801, 0])
    for name in FLOATING:
        total = sum(staleness_weight(tau) * _clipped(s, t, 1.5)[name]
                    for s, t, tau in zip(STARTS, TRAINED, STALENESS, strict=True))
        total = total + noise.normal(0.0, 0.7 * 1.5, total.shape)
        np.testing.assert_allclose(new[name], X0[name] + 0.5 * total / 3, rtol=1e-6)
        assert new[name].dtype == np.float32
    np.testing.assert_array_equal(new["steps"], X0["steps"])
    metrics = strategy.release_metrics()
    assert metrics["dp-cohort"] == 3 and metrics["dp-unclipped"] == 1  # only the small one
    assert metrics["dp-noise-std"] == pytest.approx(0.7 * 1.5 / 3)
    assert strategy.releases == 1 and strategy.buffered == 0 and strategy.contributors == []


def test_a_half_full_buffer_resumes_to_the_same_bits_under_the_reproducible_switch():
    from fedtune.server.checkpoint import capture_attributes, restore_attributes

    def fresh() -> DPFedBuff:
        return DPFedBuff(buffer_size=3, noise_multiplier=0.7, clipping_norm=1.5, seed=3)

    arrivals = list(enumerate(zip(STARTS, TRAINED, STALENESS, strict=True)))
    whole = fresh()
    for client, (s, t, tau) in arrivals:
        whole.receive(whole.prepare(s, t), tau, 1.0, client)
    halved = fresh()
    halved.receive(halved.prepare(STARTS[0], TRAINED[0]), 0, 1.0, 0)
    resumed = fresh()
    restore_attributes(resumed, *capture_attributes(halved))
    assert resumed.refuses(0)  # who is in the buffer survives too
    for client, (s, t, tau) in arrivals[1:]:
        resumed.receive(resumed.prepare(s, t), tau, 1.0, client)
    expected, got = whole.release(X0), resumed.release(X0)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)


def _buffer_sum(updates) -> np.ndarray:
    strategy = DPFedBuff(buffer_size=len(updates) + 1, noise_multiplier=1.0, clipping_norm=1.0)
    for client, (trained, tau) in enumerate(updates):
        strategy.receive(strategy.prepare(X0, trained), tau, 1.0, client)
    if not strategy.buffer:
        return np.zeros(6)
    return np.concatenate([strategy.buffer[k].ravel() for k in FLOATING])


def test_neighbouring_buffers_differ_by_at_most_the_clipping_bound():
    """Any update (norms from 1e-6 to 1e6) at any staleness moves the noised sum by <= C."""
    others = [({k: v + RNG.normal(0, 3, v.shape).astype(v.dtype) if k in FLOATING else v
                for k, v in X0.items()}, int(RNG.integers(0, 10))) for _ in range(4)]
    largest = 0.0
    for scale in (1e-6, 0.3, 1.0, 7.0, 1e6):
        for tau in (0, 1, 50):
            one = ({k: v + scale * RNG.standard_normal(v.shape).astype(v.dtype)
                    if k in FLOATING else v for k, v in X0.items()}, tau)
            gap = np.linalg.norm(_buffer_sum([*others, one]) - _buffer_sum(others))
            largest = max(largest, gap)
            assert gap <= 1.0 + 1e-9
    assert largest > 0.99  # a large fresh update uses the whole bound


def test_a_client_adds_at_most_one_update_to_a_buffer():
    strategy = DPFedBuff(buffer_size=3, noise_multiplier=1.0, clipping_norm=1.0)
    assert strategy.refuses(4) == ""
    strategy.receive(strategy.prepare(X0, TRAINED[0]), 0, 1.0, 4)
    assert "one update per client per buffer release" in strategy.refuses(4)
    assert strategy.refuses(5) == ""


def test_the_secret_noise_has_the_accounted_std_and_never_repeats():
    """No update at all (a zero sum): the release minus the model is the noise / K."""
    big = {"w": np.zeros((300, 200), np.float64)}
    steps = []
    for _ in range(2):
        strategy = DPFedBuff(buffer_size=1, noise_multiplier=2.0, clipping_norm=0.5)
        strategy.receive(strategy.prepare(big, big), 0, 1.0, 0)
        steps.append(strategy.release(big)["w"].ravel())
    for step in steps:
        assert np.std(step) == pytest.approx(2.0 * 0.5, rel=0.02)
    assert abs(np.corrcoef(*steps)[0, 1]) < 0.02


# --- a run: the accountant against independent ones --------------------------------------------

DP_FEDBUFF = ("strategy.name=fedbuff", "devices.profile=lognormal", "strategy.concurrency=3",
              "strategy.fedbuff_buffer_size=2", "data.num_clients=6", "run.rounds=4",
              "privacy.mode=central", "privacy.target_epsilon=8", "privacy.delta=0.01",
              "privacy.clip_norm=0.5", "privacy.adaptive_clipping=false",
              "strategy.fraction_evaluate=0")


@pytest.fixture(scope="module")
def fedbuff_run(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("dp_fedbuff"), *DP_FEDBUFF)
    run = run_inprocess(config).path
    return config, run, json.loads((run / "summary.json").read_text())["privacy"]


def _google(noise: float, releases: int, delta: float) -> dict[str, float]:
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise), releases)
    return {"rdp": dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta),
            "pld": dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)}


def test_a_dp_fedbuff_runs_epsilon_is_at_most_the_reported_one(fedbuff_run):
    """Every server update is one release, composed without sampling (rate 1): dp-accounting's
    PLD never exceeds the reported ε, its RDP matches opacus' within 1 %; the noise is secret;
    the target held; summary.json alone recomputes ε."""
    config, run, summary = fedbuff_run
    metrics = rows_of(run / "metrics.csv")
    assert summary["rounds_accounted"] == len(metrics) == 4
    assert summary["sample_rate"] == 1.0 and "without amplification" in summary[
        "release_accounting"]
    assert summary["private"] is True and summary["noise_source"].startswith("ChaCha20")
    google = _google(summary["noise_multiplier"], summary["rounds_accounted"], summary["delta"])
    reported = summary["epsilon"]
    assert reported <= config.privacy.target_epsilon
    assert google["pld"] <= reported
    assert google["rdp"] == pytest.approx(reported, rel=0.01)
    assert float(metrics[-1]["epsilon"]) == pytest.approx(reported)
    std = summary["noise_multiplier"] * 0.5 / 2  # σ C / K on the mean
    assert [float(m["noise_std"]) for m in metrics] == pytest.approx([std] * 4, rel=1e-5)
    for row in rows_of(run / "clients.csv"):  # no client twice in one release
        assert row["status"] in ("ok", "rejected", "offline")
    per_round: dict[str, list[str]] = {}
    for row in rows_of(run / "clients.csv"):
        if row["status"] == "ok":
            per_round.setdefault(row["round"], []).append(row["client_id"])
    assert all(len(set(ids)) == len(ids) == 2 for ids in per_round.values())


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy.name=fedasync"], ("privacy.mode = 'central' is not allowed with strategy.name "
                                  "= 'fedasync': must be 'none' or 'local', or strategy.name = "
                                  "'fedbuff'")),
    (["strategy.name=fedbuff", "privacy.adaptive_clipping=true"],
     "privacy.adaptive_clipping = true is not allowed with strategy.name = 'fedbuff'"),
    (["strategy.name=fedbuff", "privacy.adaptive_clipping=false",
      "strategy.fedbuff_buffer_size=5"], "strategy.fedbuff_buffer_size = 5 is not allowed"),
])
def test_central_dp_refuses_what_a_buffered_release_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [*MLP_DIGITS, "privacy.mode=central", "privacy.noise_multiplier=1",
                           "privacy.delta=1e-3", *overrides])
    assert "\n" not in str(error.value)
