"""Client side of each strategy: local steps and state updates against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedtune.client.algorithms import (
    ClientSide,
    FedDynClient,
    FedNovaClient,
    FedProxClient,
    ScaffoldClient,
)
from fedtune.engine.inprocess import InProcessGrid
from fedtune.models.mlp import MLP
from fedtune.models.weights import shared_state
from fedtune.protocol import FEDDYN_STATE, SCAFFOLD_STATE
from fedtune.train import TrainSettings, train_local
from strategies.scaffold import CONTROL_DELTA_KEY, CONTROL_KEY
from tests.strategy_messages import numpy_of, record

W0 = np.array([[0.2, -0.4, 0.1], [-0.3, 0.5, 0.6]], np.float32)
B0 = np.array([0.05, -0.05], np.float32)
BATCHES = [
    (np.array([[1.0, 0.5, -1.0], [0.0, 2.0, 1.0], [-1.5, 0.3, 0.2]], np.float32),
     np.array([0, 1, 1])),
    (np.array([[0.4, -0.7, 1.2], [2.0, 1.0, 0.0]], np.float32), np.array([1, 0])),
]
LR, STEPS = 0.3, 5
W, B = "classifier.weight", "classifier.bias"


def _ce_gradient(w, b, x, y):
    """Gradient of the mean cross-entropy of a linear softmax classifier, by hand."""
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    return p.T @ x, p.sum(axis=0)


def _reference_steps(x, steps, extra_gradient):
    """``steps`` SGD steps cycling through BATCHES; ``extra_gradient(y)`` -> (dW, db) added."""
    w, b = x[W].astype(np.float64), x[B].astype(np.float64)
    for k in range(steps):
        features, labels = BATCHES[k % len(BATCHES)]
        gw, gb = _ce_gradient(w, b, features.astype(np.float64), labels)
        ew, eb = extra_gradient({W: w, B: b})
        w, b = w - LR * (gw + ew), b - LR * (gb + eb)
    return {W: w, B: b}


def _train(x, content, state, momentum=0.0, side=ClientSide):
    """fedtune's client path: the strategy's client side, train_local, reply."""
    model = MLP(3, (), 2)
    model.load_state_dict({name: torch.from_numpy(value) for name, value in x.items()})
    settings = TrainSettings(optimizer="sgd", lr=LR, momentum=momentum, local_steps=STEPS)
    algorithm = side(content, state, x, settings)
    loader = [({"features": torch.from_numpy(f)}, torch.from_numpy(y)) for f, y in BATCHES]
    result = train_local(model, loader, settings, torch.device("cpu"),
                         algorithm.objective(model))
    local = shared_state(model)
    records, metrics = algorithm.reply(local, result.num_steps)
    return local, records, metrics


def _message(x, config=None, **records):
    content = RecordDict({"arrays": record(x), "config": ConfigRecord(config or {})})
    for key, value in records.items():
        content[key] = record(value)
    return content


def _assert_close(ours, reference):
    for name in reference:
        np.testing.assert_allclose(ours[name], reference[name], atol=1e-6)


def test_plain_message_trains_plain_sgd_and_adds_nothing():
    x = {W: W0, B: B0}
    local, records, metrics = _train(x, _message(x), RecordDict())
    _assert_close(local, _reference_steps(x, STEPS, lambda y: (0, 0)))
    assert records == {} and metrics == {}


def test_scaffold_client_steps_and_control_variates_over_two_rounds():
    state = RecordDict()
    x = {W: W0, B: B0}
    c = {W: np.full_like(W0, 0.2), B: np.array([-0.1, 0.3], np.float32)}
    c_i = {W: np.zeros((2, 3)), B: np.zeros(2)}
    for _ in range(2):  # round 2 starts from the c_i that round 1 stored in the state
        local, records, _ = _train(x, _message(x, **{CONTROL_KEY: c}), state,
                                   side=ScaffoldClient)
        expected = _reference_steps(x, STEPS, lambda y: (c[W] - c_i[W], c[B] - c_i[B]))
        _assert_close(local, expected)
        new_c_i = {n: c_i[n] - c[n] + (x[n] - expected[n]) / (STEPS * LR) for n in (W, B)}
        _assert_close(numpy_of(records[CONTROL_DELTA_KEY]),
                      {n: new_c_i[n] - c_i[n] for n in (W, B)})
        _assert_close(numpy_of(state[SCAFFOLD_STATE]), new_c_i)
        c_i, x = new_c_i, {n: v.astype(np.float32) for n, v in local.items()}
        c = {n: v * -2 for n, v in c.items()}
    assert np.abs(c_i[W]).max() > 0.01  # the correction really acted


def test_fedprox_client_adds_the_proximal_gradient():
    x = {W: W0, B: B0}
    mu = 0.7
    local, _, _ = _train(x, _message(x, {"proximal-mu": mu}), RecordDict(),
                         side=FedProxClient)
    _assert_close(local, _reference_steps(
        x, STEPS, lambda y: (mu * (y[W] - x[W]), mu * (y[B] - x[B]))))


def test_feddyn_client_regulariser_and_gradient_state_over_two_rounds():
    state = RecordDict()
    alpha = 0.5
    x = {W: W0, B: B0}
    g = {W: np.zeros((2, 3)), B: np.zeros(2)}
    for _ in range(2):
        local, _, _ = _train(x, _message(x, {"feddyn-alpha": alpha}), state,
                             side=FedDynClient)
        expected = _reference_steps(x, STEPS, lambda y: (
            -g[W] + alpha * (y[W] - x[W]), -g[B] + alpha * (y[B] - x[B])))
        _assert_close(local, expected)
        g = {n: g[n] - alpha * (expected[n] - x[n]) for n in (W, B)}
        _assert_close(numpy_of(state[FEDDYN_STATE]), g)
        x = {n: (v + 0.1).astype(np.float32) for n, v in local.items()}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_client_counts_its_steps_and_reports_the_normalizer(momentum):
    x = {W: W0, B: B0}
    _, _, metrics = _train(x, _message(x, {"fednova": True}), RecordDict(), momentum,
                           side=FedNovaClient)
    expected = sum((1 - momentum ** m) / (1 - momentum) for m in range(1, STEPS + 1))
    assert metrics == {"fednova-a": pytest.approx(expected, abs=1e-9)}


def test_control_variates_persist_in_each_clients_context_during_a_run(tmp_path):
    from fedtune.client.app import app as client_app
    from fedtune.config import to_run_config
    from fedtune.server.app import run_federated
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, "strategy.name=scaffold", "client.optimizer=sgd",
                         "client.lr=0.05")
    grid = InProcessGrid(client_app, to_run_config(config), config.data.num_clients)
    run_dir = run_federated(grid, config).path
    assert grid.client_states.clients() == list(range(config.data.num_clients))
    for client in grid.client_states.clients():
        control = numpy_of(grid.client_states.get(client)[SCAFFOLD_STATE])
        assert set(control) == {name for name, _ in MLP(64, [32], 10).named_parameters()}
        assert max(np.abs(v).max() for v in control.values()) > 0
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header and two rounds
    # the server screened and aggregated every reply, control-variate change included
    statuses = [line.split(",")[6] for line in
                (run_dir / "clients.csv").read_text().splitlines()[1:]]
    assert statuses == ["ok"] * 2 * config.data.num_clients
