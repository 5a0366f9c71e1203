"""strategies/: each server update against a small NumPy reference of the paper's rule."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.exception import InconsistentMessageReplies
from scipy.optimize import minimize

from strategies import RFA, FedDyn, FedNova, Scaffold
from strategies.fednova import NORMALIZER_KEY, local_normalizer
from strategies.rfa import geometric_median
from strategies.scaffold import CONTROL_DELTA_KEY, CONTROL_KEY
from tests.strategy_messages import configure, node_grid, numpy_of, reply

X0 = {"w": np.array([[0.5, -1.0], [2.0, 0.25]], np.float32), "b": np.array([0.1, -0.2],
                                                                              np.float32)}
# three clients' models and control-variate deltas, by hand
MODELS = [
    {"w": np.array([[0.7, -1.1], [1.8, 0.3]], np.float32), "b": np.array([0.2, -0.1], np.float32)},
    {"w": np.array([[0.4, -0.6], [2.1, 0.0]], np.float32), "b": np.array([0.0, -0.3], np.float32)},
    {"w": np.array([[0.9, -1.5], [2.5, 0.5]], np.float32), "b": np.array([0.4, 0.2], np.float32)},
]
DELTAS = [
    {"w": np.array([[0.1, 0.2], [-0.3, 0.4]], np.float32), "b": np.array([1.0, -1.0], np.float32)},
    {"w": np.array([[-0.2, 0.0], [0.5, 0.1]], np.float32), "b": np.array([0.5, 0.5], np.float32)},
    {"w": np.array([[0.3, -0.1], [0.0, -0.2]], np.float32), "b": np.array([-0.5, 2.0], np.float32)},
]
SIZES = [10, 30, 60]
NUM_NODES = 5  # three of five clients answer: N in SCAFFOLD and m in FedDyn are 5


def _round(strategy, server_round, x, models, metrics, extra=None):
    messages = configure(strategy, node_grid(NUM_NODES), server_round, x)
    messages.sort(key=lambda m: m.metadata.dst_node_id)
    replies = [reply(messages[i], models[i], metrics[i],
                     None if extra is None else extra[i]) for i in range(len(models))]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return messages, numpy_of(arrays)


def _sizes_only():
    return [{"num-examples": n} for n in SIZES]


def _scaffold_strategy():
    # fraction 0.6 of 5 nodes: the three that reply are sampled
    return Scaffold(server_lr=0.5, fraction_train=0.6, min_train_nodes=3,
                    min_available_nodes=NUM_NODES)


def test_scaffold_server_update_matches_the_paper():
    strategy = _scaffold_strategy()
    messages, x1 = _round(strategy, 1, X0, MODELS, _sizes_only(), [
        {CONTROL_DELTA_KEY: d} for d in DELTAS])
    # round 1 sends c = 0 for every array
    for name, value in numpy_of(messages[0].content[CONTROL_KEY]).items():
        np.testing.assert_array_equal(value, np.zeros_like(X0[name]))
    c1 = {}
    for name in X0:
        ys = np.stack([m[name] for m in MODELS]).astype(np.float64)
        expected_x = X0[name] + 0.5 * np.mean(ys - X0[name], axis=0)  # eta_g / |S| sum (y - x)
        np.testing.assert_allclose(x1[name], expected_x, atol=1e-6)
        c1[name] = np.sum([d[name] for d in DELTAS], axis=0) / NUM_NODES  # c + 1/N sum dc
    # round 2 sends the updated c, and accumulates on it
    messages, x2 = _round(strategy, 2, x1, MODELS[:2], _sizes_only()[:2], [
        {CONTROL_DELTA_KEY: d} for d in DELTAS[:2]])
    sent = numpy_of(messages[0].content[CONTROL_KEY])
    for name in X0:
        np.testing.assert_allclose(sent[name], c1[name], atol=1e-6)
        np.testing.assert_allclose(
            x2[name], x1[name] + 0.5 * np.mean([m[name] - x1[name] for m in MODELS[:2]], axis=0),
            atol=1e-6)
    assert np.abs(strategy.control["b"] - (c1["b"] + (DELTAS[0]["b"] + DELTAS[1]["b"])
                                           / NUM_NODES)).max() < 1e-6


def test_scaffold_rejects_replies_without_control_delta():
    strategy = _scaffold_strategy()
    with pytest.raises(InconsistentMessageReplies, match="scaffold-control-delta"):
        _round(strategy, 1, X0, MODELS, _sizes_only())


def test_fednova_server_update_matches_the_paper():
    norms = [2.0, 5.0, 8.5]  # ||a_i||_1 of three clients with different step counts
    metrics = [{"num-examples": n, NORMALIZER_KEY: a} for n, a in zip(SIZES, norms)]
    strategy = FedNova(fraction_train=0.6, min_train_nodes=3, min_available_nodes=NUM_NODES)
    messages, x1 = _round(strategy, 1, X0, MODELS, metrics)
    assert messages[0].content["config"]["fednova"] is True
    p = np.array(SIZES) / np.sum(SIZES)
    tau_eff = float(np.dot(p, norms))
    for name in X0:
        d = sum(p[i] * (X0[name].astype(np.float64) - MODELS[i][name]) / norms[i]
                for i in range(3))
        np.testing.assert_allclose(x1[name], X0[name] - tau_eff * d, atol=1e-6)


def test_fednova_with_equal_steps_is_fedavg():
    metrics = [{"num-examples": n, NORMALIZER_KEY: 4.0} for n in SIZES]
    strategy = FedNova(fraction_train=0.6, min_train_nodes=3, min_available_nodes=NUM_NODES)
    _, x1 = _round(strategy, 1, X0, MODELS, metrics)
    p = np.array(SIZES) / np.sum(SIZES)
    for name in X0:
        np.testing.assert_allclose(x1[name], sum(p[i] * MODELS[i][name] for i in range(3)),
                                   atol=1e-6)


def test_fednova_normalizer_matches_momentum_sgd_on_a_constant_gradient():
    """``||a||_1`` is how many gradients' worth (times lr) momentum SGD moves in tau steps."""
    for tau, rho in [(1, 0.0), (7, 0.0), (5, 0.9), (12, 0.5)]:
        position, buffer, gradient, lr = 0.0, 0.0, 1.0, 0.1
        for _ in range(tau):
            buffer = rho * buffer + gradient  # torch.optim.SGD, dampening 0
            position -= lr * buffer
        assert local_normalizer(tau, rho) == pytest.approx(-position / lr, abs=1e-9)


def test_feddyn_server_update_matches_the_paper():
    alpha = 0.1
    strategy = FedDyn(alpha=alpha, fraction_train=0.6, min_train_nodes=3,
                      min_available_nodes=NUM_NODES)
    messages, x1 = _round(strategy, 1, X0, MODELS, _sizes_only())
    assert messages[0].content["config"]["feddyn-alpha"] == alpha
    _, x2 = _round(strategy, 2, x1, MODELS[1:], _sizes_only()[1:])
    h = {name: np.zeros(v.shape) for name, v in X0.items()}
    x = {name: v.astype(np.float64) for name, v in X0.items()}
    for models in (MODELS, MODELS[1:]):
        for name in X0:
            thetas = np.stack([m[name] for m in models]).astype(np.float64)
            h[name] = h[name] - alpha / NUM_NODES * np.sum(thetas - x[name], axis=0)
            x[name] = thetas.mean(axis=0) - h[name] / alpha
        ours = x1 if models is MODELS else x2
        for name in X0:
            np.testing.assert_allclose(ours[name], x[name], atol=1e-5)


def test_geometric_median_matches_a_generic_minimiser():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(7, 3))
    weights = rng.uniform(0.5, 2.0, size=7)
    split = [{"a": p[:2], "b": p[2:]} for p in points]  # distance over all arrays together
    median = geometric_median(split, weights, smoothing=1e-12, iterations=500)
    found = np.concatenate([median["a"], median["b"]])
    best = minimize(lambda z: np.sum(weights * np.linalg.norm(points - z, axis=1)),
                    points.mean(axis=0), method="Nelder-Mead",
                    options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    np.testing.assert_allclose(found, best.x, atol=1e-5)


def test_rfa_ignores_a_minority_of_far_away_models():
    honest = [{"w": np.full(4, 1.0 + 0.01 * i, np.float32)} for i in range(8)]
    attackers = [{"w": np.full(4, -10.0, np.float32)} for _ in range(2)]
    strategy = RFA(min_available_nodes=10)
    messages = configure(strategy, node_grid(10), 1, {"w": np.zeros(4, np.float32)})
    replies = [reply(m, model, {"num-examples": 10})
               for m, model in zip(messages, honest + attackers, strict=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    aggregate = numpy_of(arrays)["w"]
    assert np.all(np.abs(aggregate - 1.035) < 0.05)  # near the honest models' centre
    mean = np.mean([m["w"] for m in honest + attackers], axis=0)
    assert np.all(mean < -1)  # what FedAvg would have returned


def test_rfa_holds_against_an_update_scaled_by_a_million():
    """From the weighted mean, 4 Weiszfeld steps leave an update scaled by 1e6 hundreds of
    model norms away (the model is destroyed); from the coordinate-wise median they do not."""
    rng = np.random.default_rng(0)
    honest = [{"w": rng.normal(0, 0.1, 100)} for _ in range(8)]
    direction = rng.normal(0, 0.1, 100)
    attackers = [{"w": -1e6 * direction} for _ in range(2)]
    median = geometric_median(honest + attackers, [1.0] * 10)
    centre = np.mean([h["w"] for h in honest], axis=0)
    spread = np.median([np.linalg.norm(h["w"] - centre) for h in honest])  # about 1
    assert np.linalg.norm(median["w"] - centre) < spread / 2
    start = geometric_median(honest + attackers, [1.0] * 10, iterations=0)
    assert np.linalg.norm(start["w"] - centre) < spread / 2  # the start is already robust
