"""The central-DP guarantee, checked from outside the accountant (issue 24).

- Nothing in a run directory rebuilds the noise (the attack that stripped it from a run of the
  old code, which drew it from run.seed, fails; it still works on the insecure switch).
- Neighbouring cohorts (one client in or out, any update norm) move the statistics that get
  noised by at most the sensitivities the noise split assumes (the old uncentred count moved
  by 1 where the split assumed 1/2).
- The noise has the std the accountant assumes, in both channels.
- ε of the composed mechanism (update and count), with the measured sensitivities, by Google's
  dp-accounting RDP and PLD, is at most the ε fedtune reports; and summary.json alone is enough
  to recompute that ε (the recipe of docs/privacy.md).
"""

from __future__ import annotations

import copy
import json
import math
import tomllib

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant
from safetensors.numpy import load_file

from fedtune.engine.inprocess import run_inprocess
from fedtune.models.build import build_model
from fedtune.models.weights import shared_state
from fedtune.privacy.central_dp import CentralDP
from fedtune.task import task_resources
from strategies import dp_fedavg
from strategies.dp_fedavg import DPFedAvg
from strategies.noise import SecureRandom
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def server_identity():
    """Messages take their source from the process's task identity (as in a ServerApp)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


# --- the noise cannot be rebuilt from a run directory --------------------------------------------

NOISY = ("privacy.mode=central", "privacy.noise_multiplier=5", "privacy.clip_norm=1",
         "privacy.adaptive_clipping=false", "privacy.delta=0.01", "run.rounds=1",
         "strategy.fraction_evaluate=0")


def _candidate_noises(seed: int, size: int) -> dict[str, np.ndarray]:
    """Every generator an attacker holding the run directory (config.toml: run.seed) could
    try: NumPy streams of (seed, round, stream), NumPy and torch seeded with the seed."""
    candidates = {f"numpy [seed, 1, {stream}]": np.random.default_rng([seed, 1, stream])
                  for stream in range(8)}
    candidates["numpy seed"] = np.random.default_rng(seed)
    candidates["numpy [seed, 1]"] = np.random.default_rng([seed, 1])
    noises = {name: rng.standard_normal(size) for name, rng in candidates.items()}
    noises["torch seed"] = torch.randn(size, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64).numpy()
    return noises


def _best_rebuild(run_dir) -> float:
    """The largest |cosine| between the released model delta and a noise rebuilt from the run
    directory (the old code's noise gave 0.9996 on a real run)."""
    config_file = tomllib.loads((run_dir / "config.toml").read_text())
    seed = int(config_file["run"]["seed"])
    config = tiny_config(run_dir.parent, *NOISY, f"run.seed={seed}")
    initial = shared_state(build_model(task_resources(config).spec, seed))
    final = load_file(str(run_dir / "model" / "model.safetensors"))
    names = [n for n in initial if np.issubdtype(initial[n].dtype, np.floating)]
    delta = np.concatenate([(final[n].astype(np.float64) - initial[n]).ravel() for n in names])
    return max(abs(float(delta @ noise) / (np.linalg.norm(delta) * np.linalg.norm(noise)))
               for noise in _candidate_noises(seed, delta.size).values())


def test_the_noise_cannot_be_rebuilt_from_the_run_directory(tmp_path):
    secure = run_inprocess(tiny_config(tmp_path, *NOISY, f"run.dir={tmp_path / 's'}")).path
    assert _best_rebuild(secure) < 0.1  # random directions in 2,410 dimensions: ~0.02
    summary = json.loads((secure / "summary.json").read_text())["privacy"]
    assert summary["private"] is True and summary["noise_source"].startswith("ChaCha20")
    # the same attack on the NOT PRIVATE switch: the noise dominates the release and is found
    insecure = run_inprocess(tiny_config(tmp_path, *NOISY, f"run.dir={tmp_path / 'i'}",
                                         "privacy.insecure_reproducible_noise=true")).path
    assert _best_rebuild(insecure) > 0.9
    summary = json.loads((insecure / "summary.json").read_text())["privacy"]
    assert summary["private"] is False and summary["noise_source"].startswith("NOT PRIVATE")


def test_secure_draws_are_standard_normal_and_never_repeat():
    from scipy import stats

    source = SecureRandom()
    draws = source.normal(0.0, 2.0, 50_000)
    assert stats.kstest(draws / 2.0, "norm").pvalue > 1e-4
    assert abs(draws.std() - 2.0) < 0.05
    assert not np.array_equal(source.normal(0.0, 1.0, 100), source.normal(0.0, 1.0, 100))
    uniforms = source.random((200, 100))
    assert uniforms.shape == (200, 100) and 0 <= uniforms.min() and uniforms.max() < 1
    assert stats.kstest(uniforms.ravel(), "uniform").pvalue > 1e-4


# --- sensitivities: neighbouring cohorts ------------------------------------------------------

SHAPES = {"w": (6, 4), "b": (4,)}
NORMS = (0.0, 0.3, 1.0, 1.0000001, 7.0, 1e6)  # around and far from the bound C = 1


def _reply(arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _cohort(current: dict[str, np.ndarray]) -> list[Message]:
    rng = np.random.default_rng(0)
    replies = []
    for norm in NORMS:
        step = {k: rng.normal(size=s) for k, s in SHAPES.items()}
        scale = norm / math.sqrt(sum(float(np.sum(v * v)) for v in step.values()))
        replies.append(_reply({k: (current[k] + scale * step[k]).astype(np.float32)
                               for k in SHAPES}))
    return replies


def _statistics(strategy: DPFedAvg, current: dict[str, np.ndarray], replies: list[Message]
                ) -> tuple[np.ndarray, float]:
    """(update sum, centred count) as the released model and clipped fraction show them, from
    a noiseless copy of ``strategy`` (the means of the noised statistics)."""
    noiseless = copy.deepcopy(strategy)
    noiseless.noise_multiplier = 0.0
    noiseless.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    new, metrics = noiseless.aggregate_train(1, replies)
    cohort = noiseless.expected_cohort()
    total = np.concatenate([(new[k].numpy().astype(np.float64) - current[k]).ravel()
                            for k in SHAPES]) * cohort
    count = ((1.0 - metrics[dp_fedavg.CLIPPED_FRACTION]) - 0.5) * cohort
    return total, count


def measured_sensitivities(strategy: DPFedAvg) -> tuple[float, float]:
    """The most one client in or out moves the update sum (L2) and the count, over a cohort
    with update norms from 0 to 10^6 around the bound."""
    current = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    replies = _cohort(current)
    total, count = _statistics(strategy, current, replies)
    update, counted = 0.0, 0.0
    for left_out in range(len(replies)):
        fewer = replies[:left_out] + replies[left_out + 1:]
        other_total, other_count = _statistics(strategy, current, fewer)
        update = max(update, float(np.linalg.norm(total - other_total)))
        counted = max(counted, abs(count - other_count))
    return update, counted


def _adaptive(**kwargs) -> DPFedAvg:
    strategy = DPFedAvg(sample_rate=0.5, noise_multiplier=1.2, clipping_norm=1.0,
                        adaptive=True, min_available_nodes=1, **kwargs)
    strategy.population = 12
    return strategy


def assumed_count_sensitivity(strategy: DPFedAvg) -> float:
    """The count's sensitivity the noise split implies: σ_Δ and σ_b compose to σ only if the
    count moves by at most σ_b sqrt(σ⁻² - σ_Δ⁻²)."""
    update_noise, count_std = strategy.noise_parameters()
    sigma = strategy.noise_multiplier
    return count_std * math.sqrt(sigma ** -2 - update_noise ** -2)


@pytest.mark.parametrize("count", [{}, {"clipped_count_stddev": 2.0}, {"count_share": 0.3}])
def test_neighbouring_cohorts_move_the_noised_statistics_by_at_most_the_assumed_sensitivities(
        count):
    strategy = _adaptive(**count)
    update, counted = measured_sensitivities(strategy)
    assert update == pytest.approx(strategy.clipping_norm, rel=1e-5)  # a client at the bound
    assert update <= strategy.clipping_norm * (1 + 1e-6)
    assumed = assumed_count_sensitivity(strategy)
    assert assumed == pytest.approx(0.5)
    assert counted == pytest.approx(0.5) and counted <= assumed + 1e-9


def test_the_noise_has_the_std_the_split_says_in_both_channels():
    strategy = _adaptive(clipped_count_stddev=2.0)
    update_noise, count_std = strategy.noise_parameters()
    current = {"w": np.zeros(1, np.float32)}
    sums, counts = [], []
    for _ in range(3000):  # an empty cohort: the release is the noise alone
        strategy.current_arrays = ArrayRecord({"w": Array(current["w"])})
        strategy.clipping_norm = 1.0
        new, metrics = strategy.aggregate_train(1, [])
        sums.append(float(new["w"].numpy()[0]) * strategy.expected_cohort())
        counts.append(((1.0 - metrics[dp_fedavg.CLIPPED_FRACTION]) - 0.5)
                      * strategy.expected_cohort())
    assert np.std(sums) == pytest.approx(update_noise * 1.0, rel=0.06)
    assert np.std(counts) == pytest.approx(count_std, rel=0.06)
    assert abs(np.mean(counts)) < 4 * count_std / math.sqrt(3000)  # centred: no offset


# --- the composed mechanism's ε by independent accountants -------------------------------------

CENTRAL_RUN = ("privacy.mode=central", "privacy.target_epsilon=3", "privacy.delta=0.01",
               "privacy.adaptive_clipping=true", "privacy.clip_norm=0.5",
               "strategy.fraction_train=0.5", "data.num_clients=8", "run.rounds=3",
               "strategy.fraction_evaluate=0")


@pytest.fixture(scope="module")
def central_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("central")
    config = tiny_config(tmp_path, *CENTRAL_RUN)
    run_dir = run_inprocess(config).path
    return config, json.loads((run_dir / "summary.json").read_text())["privacy"]


def _google(noise: float, rate: float, rounds: int, delta: float) -> dict[str, float]:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), rounds)
    return {"rdp": dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta),
            "pld": dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)}


def test_the_composed_mechanisms_epsilon_is_at_most_the_reported_one(central_run):
    """The update channel (noise σ_Δ C, measured sensitivity) and the count channel (noise σ_b,
    measured sensitivity) are one Gaussian mechanism of multiplier
    (σ_Δ⁻² (Δ_u / C)² + (Δ_b / σ_b)²)^(-1/2); dp-accounting's RDP and PLD accountants of its
    Poisson-subsampled composition never exceed the reported ε."""
    config, summary = central_run
    strategy = CentralDP().strategy(config, CentralDP().plan(config), {})
    update, counted = measured_sensitivities(strategy)
    update_noise, count_std = strategy.noise_parameters()
    assert update_noise == pytest.approx(summary["update_noise_multiplier"])
    assert count_std == pytest.approx(summary["clipped_count_stddev"])
    clip = strategy.clipping_norm
    composed = ((update / clip / update_noise) ** 2 + (counted / count_std) ** 2) ** -0.5
    rounds = summary["rounds_accounted"]
    assert rounds == 3
    google = _google(composed, summary["sample_rate"], rounds, summary["delta"])
    reported = summary["epsilon"]
    assert reported <= config.privacy.target_epsilon
    assert google["pld"] <= reported
    assert google["rdp"] <= reported * 1.001  # two RDP implementations, different orders


def test_epsilon_recomputes_from_summary_json_alone(central_run):
    """docs/privacy.md's recipe: the composed multiplier from the two channels, then a
    Poisson-subsampled Gaussian composed ``rounds_accounted`` times at rate ``sample_rate``."""
    _, summary = central_run
    composed = (summary["update_noise_multiplier"] ** -2
                + (summary["clipped_count_stddev"] / summary["count_sensitivity"]) ** -2
                ) ** -0.5
    assert composed == pytest.approx(summary["composed_noise_multiplier"])
    assert composed == pytest.approx(summary["noise_multiplier"])
    rate, rounds, delta = summary["sample_rate"], summary["rounds_accounted"], summary["delta"]
    opacus_rdp, opacus_prv = RDPAccountant(), PRVAccountant()
    for _ in range(rounds):
        opacus_rdp.step(noise_multiplier=composed, sample_rate=rate)
        opacus_prv.step(noise_multiplier=composed, sample_rate=rate)
    assert summary["epsilon"] == pytest.approx(opacus_rdp.get_epsilon(delta), rel=1e-6)
    assert summary["epsilon_by_accountant"]["rdp"] == pytest.approx(summary["epsilon"])
    assert summary["epsilon_by_accountant"]["prv"] == pytest.approx(
        opacus_prv.get_epsilon(delta), rel=1e-3)
    google = _google(composed, rate, rounds, delta)
    assert google["rdp"] == pytest.approx(summary["epsilon"], rel=0.01)
    assert google["pld"] <= summary["epsilon"]
