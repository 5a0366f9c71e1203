"""The defences of strategies/ (issue 29) against small NumPy references of the papers' rules,
one round or two of hand-made replies each."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedMedian

from strategies.bucketing import Bucketing, bucket_order
from strategies.centered_clipping import CenteredClipping
from strategies.flame import Flame, admitted_updates
from strategies.fltrust import FLTrust
from strategies.norm_bound_dp import NormBoundDP
from tests.strategy_messages import configure, node_grid, numpy_of, reply

X0 = {"w": np.array([0.5, -1.0, 2.0], np.float32), "b": np.array([0.1], np.float32)}
# four clients' updates (model - X0), the last one an outlier
UPDATES = [np.array([0.2, 0.1, -0.1, 0.05]), np.array([0.1, 0.3, 0.0, -0.05]),
           np.array([0.3, 0.0, -0.2, 0.1]), np.array([-4.0, -4.0, 4.0, -4.0])]
SIZES = [10, 20, 30, 40]


def _models(x, updates):
    flat = np.concatenate([x["w"], x["b"]]).astype(np.float64)
    return [{"w": (flat + u)[:3].astype(np.float32), "b": (flat + u)[3:].astype(np.float32)}
            for u in updates]


def _round(strategy, server_round, x, updates):
    messages = configure(strategy, node_grid(len(updates)), server_round, x)
    messages.sort(key=lambda m: m.metadata.dst_node_id)
    replies = [reply(m, model, {"num-examples": n})
               for m, model, n in zip(messages, _models(x, updates), SIZES, strict=True)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    new = numpy_of(arrays)
    return np.concatenate([new["w"], new["b"]]).astype(np.float64)


def _flat_x0():
    return np.concatenate([X0["w"], X0["b"]]).astype(np.float64)


def test_centered_clipping_matches_the_papers_rule_over_two_rounds():
    tau = 0.25
    strategy = CenteredClipping(tau=tau, iterations=2, min_available_nodes=4)

    def reference(v):
        for _ in range(2):
            v = v + np.mean([(u - v) * min(1.0, tau / np.linalg.norm(u - v)) for u in UPDATES],
                            axis=0)
        return v

    v1 = reference(np.zeros(4))
    x1 = _round(strategy, 1, X0, UPDATES)
    np.testing.assert_allclose(x1, _flat_x0() + v1, atol=1e-6)
    assert np.linalg.norm(v1) < 1.0  # the outlier pulls by at most tau / 4 per iteration
    # round 2 starts from round 1's aggregate (the history), from the new model
    x2 = _round(strategy, 2, {"w": x1[:3].astype(np.float32), "b": x1[3:].astype(np.float32)},
                UPDATES)
    np.testing.assert_allclose(x2, x1 + reference(v1), atol=1e-5)


def test_bucketing_hands_its_inner_aggregator_the_seeded_bucket_means():
    strategy = Bucketing(inner=FedMedian(), bucket_size=2, seed=7, min_available_nodes=4)
    got = _round(strategy, 3, X0, UPDATES)
    order = bucket_order(4, 7, 3)
    means = []
    for bucket in (order[:2], order[2:]):
        weights = np.array([SIZES[i] for i in bucket], float)
        means.append(sum(w * UPDATES[i] for w, i in zip(weights / weights.sum(), bucket,
                                                        strict=True)))
    np.testing.assert_allclose(got, _flat_x0() + np.median(means, axis=0), atol=1e-6)
    # one update per bucket: the inner aggregator on the updates themselves
    alone = Bucketing(inner=FedMedian(), bucket_size=1, seed=7, min_available_nodes=4)
    np.testing.assert_allclose(_round(alone, 3, X0, UPDATES),
                               _flat_x0() + np.median(UPDATES, axis=0), atol=1e-6)


def test_fltrust_weights_by_clipped_cosine_and_rescales_to_the_server_norm():
    server = np.array([0.2, 0.2, -0.1, 0.0])
    strategy = FLTrust(root_update=lambda x, r: {"w": server[:3], "b": server[3:]},
                       min_available_nodes=4)
    got = _round(strategy, 1, X0, UPDATES)
    cos = np.array([u @ server / (np.linalg.norm(u) * np.linalg.norm(server))
                    for u in UPDATES])
    trust = np.maximum(cos, 0)
    assert trust[3] == 0 and (trust[:3] > 0).all()  # the outlier points away
    expected = sum(t * np.linalg.norm(server) / np.linalg.norm(u) * u
                   for t, u in zip(trust, UPDATES, strict=True)) / trust.sum()
    np.testing.assert_allclose(got, _flat_x0() + expected, atol=1e-6)
    np.testing.assert_allclose(strategy.trust, trust)


@pytest.mark.parametrize("noise_std", [0.0, 0.5])
def test_norm_bound_dp_clips_averages_by_examples_and_adds_seeded_noise(noise_std):
    bound = 0.3
    strategy = NormBoundDP(norm_bound=bound, noise_std=noise_std, seed=5,
                           min_available_nodes=4)
    got = _round(strategy, 2, X0, UPDATES)
    clipped = [u * min(1.0, bound / np.linalg.norm(u)) for u in UPDATES]
    mean = np.average(clipped, axis=0, weights=SIZES)
    rng = np.random.default_rng([5, 2])
    noise = np.concatenate([rng.normal(0, noise_std, 3), rng.normal(0, noise_std, 1)])
    np.testing.assert_allclose(got, _flat_x0() + mean + noise, atol=1e-6)


def test_flame_leaves_out_the_minority_direction_clips_to_the_median_norm_and_adds_noise():
    # four honest updates around one direction, two colluders sending one opposite direction
    honest = [np.array([0.2, 0.1, -0.1, 0.05]), np.array([0.25, 0.15, -0.05, 0.0]),
              np.array([0.1, 0.2, -0.15, 0.05]), np.array([0.6, 0.3, -0.3, 0.15])]
    attack = np.array([-0.3, 0.4, 0.3, -0.2])
    updates = [*honest, attack, attack]
    strategy = Flame(noise_lambda=0.01, seed=3, min_available_nodes=6)
    messages = configure(strategy, node_grid(6), 4, X0)
    messages.sort(key=lambda m: m.metadata.dst_node_id)
    replies = [reply(m, model, {"num-examples": 10})
               for m, model in zip(messages, _models(X0, updates), strict=True)]
    arrays, _ = strategy.aggregate_train(4, replies)
    got = numpy_of(arrays)
    np.testing.assert_array_equal(strategy.admitted, [True] * 4 + [False] * 2)
    bound = np.median([np.linalg.norm(u) for u in updates])  # over all six, attackers included
    clipped = [u * min(1.0, bound / np.linalg.norm(u)) for u in honest]
    noise = np.random.default_rng([3, 4]).normal(0, 0.01 * bound, 4)
    expected = _flat_x0() + np.mean(clipped, axis=0) + noise
    np.testing.assert_allclose(np.concatenate([got["w"], got["b"]]), expected, atol=1e-6)


def test_flame_keeps_every_update_when_none_is_outvoted():
    # five clients pointing five orthogonal ways are equally far apart: one cluster of all;
    # two clients cannot outvote each other
    assert admitted_updates(np.eye(5)).tolist() == [True] * 5
    assert admitted_updates(np.eye(2)).tolist() == [True, True]
    # two near-identical updates and a third close to them outvote two others
    flat = np.array([[1, 0], [1, 0.01], [-1, 0], [0.9, 0.3], [0, -1.0]])
    assert admitted_updates(flat).tolist() == [True, True, False, True, False]
