"""Local DP-SGD clients trained together (``fedtune.client.private_chunks``) against Opacus'
one-at-a-time path: the same clipped, noised and scaled steps given the same draws, noise of
the planned std drawn in secret, and the same accounting, budget stops and replies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedtune import protocol
from fedtune.client import private_chunks
from fedtune.client.app import train_client
from fedtune.client.private_chunks import private_chunk_sizes, train_private_chunks
from fedtune.client.vectorised import one_at_a_time_because, vectorisable
from fedtune.engine.cohort import BlockClient, BlockTask, DecodedContent, run_block
from fedtune.engine.inprocess import act_as_server, run_inprocess
from fedtune.models.weights import load_shared_state, shared_state
from fedtune.privacy import dp_sgd, stacked_dp_sgd
from fedtune.privacy.accounting import history_from_lists, history_to_lists
from fedtune.privacy.dp_sgd import plan_steps, poisson_loader, poisson_steps, train_private
from fedtune.privacy.local import LocalServer, local_dp_settings
from fedtune.privacy.stacked_dp_sgd import clipped_sums, noised_means, poisson_flips
from fedtune.protocol import ARRAYS, CONFIG, SERVER_ROUND, to_array_record
from fedtune.server.grid import CohortSpec
from fedtune.server.screening import check_metric_values, reply_limits
from fedtune.state.codec import state_from_bytes, state_to_bytes
from fedtune.task import client_round_seed, seed_torch, task_resources
from tests.chunk_inputs import moved_global_arrays, round_content
from tests.conftest import rows_of, tiny_config

LOCAL = ["privacy.mode=local", "privacy.delta=1e-3", "model.dropout=0", "data.num_clients=6"]


def _state(history):
    return state_to_bytes(RecordDict({protocol.ACCOUNTANT_STATE: ConfigRecord(
        history_to_lists(history))}))


class _Replay:
    """``SecureRandom`` for one client on Opacus' path, replaying given draws: one row of
    ``uniforms`` per ``random`` call (a step's Poisson sample), ``normals`` in order."""

    def __init__(self, uniforms: np.ndarray, normals: np.ndarray) -> None:
        self.uniforms, self.normals, self.used = iter(uniforms), normals.ravel(), 0

    def __call__(self) -> _Replay:
        return self

    def random(self, size):
        return next(self.uniforms)

    def standard_normal(self, size):
        count = math.prod(size)
        out = self.normals[self.used:self.used + count].reshape(size)
        self.used += count
        return out

    def normal(self, loc, scale, size):
        return loc + scale * self.standard_normal(size)


class _StackReplay:
    """``SecureRandom`` for clients trained together, replaying the same draws: every step's
    flips in one call, each step's noise of every client in one call (client k: row k)."""

    def __init__(self, uniforms: list[np.ndarray], normals: list[np.ndarray]) -> None:
        self.uniforms, self.normals, self.step = uniforms, normals, 0

    def __call__(self) -> _StackReplay:
        return self

    def random(self, size):
        steps = size[0]
        return np.concatenate([u[:steps] for u in self.uniforms], axis=1)

    def standard_normal(self, size):
        rows = np.stack([n[self.step] for n in self.normals])
        self.step += 1
        assert rows.shape == tuple(size)
        return rows


@pytest.mark.parametrize(("mode", "overrides"), [
    ("hooks", ["client.optimizer=adamw"]),
    ("ghost", ["client.optimizer=adamw"]),
    ("hooks", ["client.optimizer=sgd", "client.momentum=0.5", "client.lr=0.2"]),
    # dropout: each example's masks from the client's round-seeded generator on both paths,
    # over steps that pass over the Poisson batches more than once (a new DataLoader pass)
    ("ghost", ["model.dropout=0.5", "client.batch_size=64"]),
], ids=["hooks-adamw", "ghost-adamw", "hooks-sgd", "ghost-dropout"])
def test_given_the_same_draws_a_chunk_takes_opacus_steps(tmp_path, monkeypatch, mode,
                                                         overrides, one_torch_thread):
    """The independent check of the mechanism: Opacus (hooks: per-example gradients; ghost:
    ghost clipping) and the chunk fed the same Poisson samples and the same Gaussian draws give
    every client the same weights, loss and examples to float rounding - per-example clipping
    (clip bound 0.5: most examples clipped), noise of std sigma x C, the division by the
    expected batch size and the optimizer step. Clients start from other histories under a
    budget, so they are allowed 5, 5, 3, 3, 0 and 1 steps: a client stops at its own."""
    config = tiny_config(tmp_path, *LOCAL, *overrides, "privacy.target_epsilon=6",
                         "privacy.max_grad_norm=0.5", "client.local_steps=5",
                         "privacy.client_rounds=3", f"privacy.grad_sample_mode={mode}")
    resources = task_resources(config)
    assert vectorisable(resources)
    dp, settings = local_dp_settings(config), resources.train_settings
    batch = config.client.batch_size
    arrays = moved_global_arrays(resources)
    clients = list(range(6))
    rows = [resources.client_train_rows(c) for c in clients]
    past = [0, 0, 12, 12, 100, 14]  # earlier steps at the client's own sigma and q
    histories = []
    for client_rows, steps in zip(rows, past, strict=True):
        plan = plan_steps(len(client_rows), poisson_steps(len(client_rows), batch), settings,
                          dp, [])
        histories.append([(plan.noise_multiplier, plan.sample_rate, steps)] if steps else [])
    plans = [plan_steps(len(r), poisson_steps(len(r), batch), settings, dp, h)
             for r, h in zip(rows, histories, strict=True)]
    allowed = [plan.allowed for plan in plans]
    assert allowed[:2] == [5, 5] and 0 < allowed[2] == allowed[3] < 5 and allowed[4] == 0
    assert 0 < allowed[5] < allowed[2]
    total = sum(p.numel() for p in resources.model.parameters() if p.requires_grad)
    rng = np.random.default_rng(7)
    uniforms = [rng.random((5, len(r))) for r in rows]
    normals = [rng.standard_normal((5, total)) for _ in clients]

    theirs = []
    for client in clients:
        monkeypatch.setattr(dp_sgd, "SecureRandom", _Replay(uniforms[client], normals[client]))
        seed_torch(client_round_seed(config.run.seed, 1, client))  # as train_client seeds it
        load_shared_state(resources.model, arrays)
        loader = poisson_loader(resources.encoded, resources.federation.data.labels,
                                rows[client], batch, 0, resources.model)
        result = train_private(resources.model, loader, settings, dp, histories[client],
                               torch.device("cpu"))
        theirs.append((shared_state(resources.model), result))

    for members in ([0, 1], [2, 3], [5]):  # the groups of equal allowed steps
        group_uniforms = [uniforms[i] for i in members]
        group_normals = [normals[i] for i in members]
        monkeypatch.setattr(stacked_dp_sgd, "SecureRandom",
                            _StackReplay(group_uniforms, group_normals))
        (chunk,) = list(train_private_chunks(
            resources, 1, round_content(1), arrays, members,
            [state_to_bytes(RecordDict({protocol.ACCOUNTANT_STATE: ConfigRecord(
                history_to_lists(histories[i]))})) for i in members]))
        for i, trained in zip(members, chunk.trained, strict=True):
            weights, result = theirs[i]
            assert trained.metrics["num-steps"] == result.train.num_steps == allowed[i]
            assert trained.metrics["examples-seen"] == result.train.num_examples
            assert trained.metrics["train-loss"] == pytest.approx(result.train.loss, rel=1e-5)
            for name in weights:
                np.testing.assert_allclose(trained.arrays[name], weights[name], atol=2e-5,
                                           rtol=0)
                assert not np.array_equal(weights[name], arrays[name])  # it trained
            assert history_from_lists(state_from_bytes(chunk.states[members.index(i)])[
                protocol.ACCOUNTANT_STATE]) == result.history
    assert theirs[4][1].train.num_steps == 0


def test_a_head_on_cached_features_takes_opacus_steps(tmp_path, tiny_bert_path, monkeypatch,
                                                     one_torch_thread):
    """A head on a frozen encoder's cached pooled features (the other model clients train
    together): given the same draws, Opacus' weights to float rounding."""
    config = tiny_config(tmp_path, base=[
        "data.dataset=rotten_tomatoes", "data.max_examples=240", "data.num_clients=4",
        "data.partitioner=iid", f"model.path={tiny_bert_path}", "model.max_length=24",
        "model.transfer=frozen", "model.dropout=0.3", "client.local_steps=4",
        "client.batch_size=8", "client.lr=0.02", "engine.backend=inprocess",
        "privacy.mode=local", "privacy.noise_multiplier=0.7", "privacy.delta=1e-3"])
    resources = task_resources(config)
    assert resources.spec.features and vectorisable(resources)
    arrays = moved_global_arrays(resources)
    rows = [resources.client_train_rows(c) for c in range(4)]
    total = sum(p.numel() for p in resources.model.parameters() if p.requires_grad)
    rng = np.random.default_rng(5)
    uniforms = [rng.random((4, len(r))) for r in rows]
    normals = [rng.standard_normal((4, total)) for _ in rows]
    monkeypatch.setattr(stacked_dp_sgd, "SecureRandom", _StackReplay(uniforms, normals))
    (chunk,) = list(train_private_chunks(resources, 1, round_content(1), arrays, range(4)))
    dp = local_dp_settings(config)
    for client, trained in enumerate(chunk.trained):
        monkeypatch.setattr(dp_sgd, "SecureRandom", _Replay(uniforms[client], normals[client]))
        seed_torch(client_round_seed(config.run.seed, 1, client))
        load_shared_state(resources.model, arrays)
        loader = poisson_loader(resources.encoded, resources.federation.data.labels,
                                rows[client], 8, 0, resources.model)
        result = train_private(resources.model, loader, resources.train_settings, dp, [],
                               torch.device("cpu"))
        assert trained.metrics["examples-seen"] == result.train.num_examples
        weights = shared_state(resources.model)
        for name in weights:
            np.testing.assert_allclose(trained.arrays[name], weights[name], atol=2e-5, rtol=0)


def test_the_clipped_sum_is_opacus_flat_clipping_of_each_example():
    """Per-example norms over every tensor, factor min(1, C / (norm + 1e-6)), padding left
    out: against a per-example loop in float64."""
    rng = np.random.default_rng(3)
    grads = [torch.from_numpy(rng.normal(0, 1, (3, 4, *shape))).float()
             for shape in [(5, 2), (5,)]]
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float32)
    sums = clipped_sums(grads, mask, 1.5)
    for client in range(3):
        expected = [np.zeros(g.shape[2:]) for g in grads]
        for example in range(4):
            if not mask[client, example]:
                continue
            parts = [g[client, example].double().numpy() for g in grads]
            norm = math.sqrt(sum(float((p ** 2).sum()) for p in parts))
            factor = min(1.0, 1.5 / (norm + 1e-6))
            for total, part in zip(expected, parts, strict=True):
                total += factor * part
        for got, want in zip(sums, expected, strict=True):
            np.testing.assert_allclose(got[client].numpy(), want, rtol=1e-5, atol=1e-6)


def test_the_noise_has_the_planned_std_and_is_secret():
    """Empirical std of the added noise, divided by the expected batch size, against
    sigma x C / batch (200,000 draws a client: the sample std within 1 %, ~7 standard errors),
    mean 0; two draws differ (not seeded: OS entropy per call); sigma 0 adds nothing."""
    size = 200_000
    zeros = [torch.zeros(3, size // 4, 4)]
    stds = np.array([0.8, 2.0, 5.0])  # sigma x C of three clients
    divisors = np.array([16, 5, 40])
    first = noised_means(zeros, stds, divisors)[0].reshape(3, -1).double()
    second = noised_means(zeros, stds, divisors)[0].reshape(3, -1).double()
    for client in range(3):
        expected = stds[client] / divisors[client]
        assert first[client].std().item() == pytest.approx(expected, rel=0.01)
        assert abs(first[client].mean().item()) < 5 * expected / math.sqrt(size)
    assert not torch.equal(first, second)
    sums = [torch.full((2, 3), 6.0)]
    assert torch.equal(noised_means(sums, np.zeros(2), np.array([2, 3]))[0],
                       torch.tensor([[3.0] * 3, [2.0] * 3]))


def test_poisson_samples_take_each_example_at_its_clients_rate_in_secret():
    sizes, rates = [50, 200, 10], [0.5, 0.05, 1.0]
    flips = poisson_flips(sizes, rates, 400)
    assert flips.shape == (400, 260)
    taken = [flips[:, :50].mean(), flips[:, 50:250].mean(), flips[:, 250:].mean()]
    assert taken[0] == pytest.approx(0.5, abs=0.02)  # ~6 standard errors
    assert taken[1] == pytest.approx(0.05, abs=0.004)
    assert taken[2] == 1.0
    assert not np.array_equal(poisson_flips(sizes, rates, 400), flips)


def test_chunks_trained_twice_from_one_seed_differ(tmp_path, one_torch_thread):
    """Everything a run seeds is seeded alike (the round seeds, the global model): the draws
    are secret, so the weights differ; sampled examples and noise both move them."""
    resources = task_resources(tiny_config(tmp_path, *LOCAL, "privacy.noise_multiplier=1"))
    arrays = moved_global_arrays(resources)
    runs = [[{n: v.copy() for n, v in t.arrays.items()} for t in chunk.trained]
            for chunk in (next(train_private_chunks(resources, 2, round_content(2), arrays,
                                                    range(6))) for _ in range(2))]
    for first, second in zip(*runs, strict=True):
        assert all(not np.array_equal(first[n], second[n]) for n in first)


def _budget_block(resources, config, histories):
    act_as_server(1)
    content = DecodedContent.of(RecordDict({ARRAYS: to_array_record(moved_global_arrays(resources)),
                                            CONFIG: ConfigRecord({SERVER_ROUND: 2})}))
    spec = CohortSpec(weighted_mean=True, limits=reply_limits(config, resources.federation))
    clients = [BlockClient(1000 + c, c, _state(h) if h else None)
               for c, h in enumerate(histories)]
    return content, BlockTask(0, "train", clients, spec)


def test_a_block_accounts_stops_and_replies_as_opacus_one_at_a_time(tmp_path,
                                                                    one_torch_thread):
    """The accounting check: each client's allowed steps, stop reason, reply metrics (noise
    multiplier, sample rate, epsilon, steps), status and new accountant history are the Opacus
    path's exactly (clients of other sizes, so other rates; one epoch each; histories that
    leave some a full round, some part of one, some none), and the server's own account
    agrees with every client."""
    config = tiny_config(tmp_path, *LOCAL, "privacy.target_epsilon=3", "privacy.client_rounds=2",
                         "client.local_steps=0", "client.local_epochs=1",
                         "client.batch_size=16", "data.partitioner=dirichlet",
                         "data.alpha=1.0", "data.num_clients=8")
    resources = task_resources(config)
    sizes = [len(r) for r in resources.federation.client_train_rows]
    assert len(set(sizes)) > 4
    dp = local_dp_settings(config)
    histories = []  # earlier rounds at the client's own sigma and q: 0 to 2 rounds' steps
    for n, rounds in zip(sizes, (0, 1, 1.5, 1.7, 0.5, 2, 0, 1.2), strict=True):
        plan = plan_steps(n, poisson_steps(n, 16), resources.train_settings, dp, [])
        past = round(rounds * plan.wanted)
        histories.append([(plan.noise_multiplier, plan.sample_rate, past)] if past else [])
    content, task = _budget_block(resources, config, histories)
    together = run_block(resources, content, task)
    loop = run_block(resources, content, task, train=lambda *args: train_client(*args))
    steps = [r.metrics["num-steps"] for r in loop.reports]
    wanted = [poisson_steps(n, 16) for n in sizes]
    assert any(s == w for s, w in zip(steps, wanted, strict=True))
    assert any(0 < s < w for s, w in zip(steps, wanted, strict=True))
    assert 0 in steps
    server = LocalServer(config, sizes)  # which knows what the clients spent before
    server.histories = {str(c): history_to_lists(h) for c, h in enumerate(histories) if h}
    for ours, theirs in zip(together.reports, loop.reports, strict=True):
        assert (ours.client_id, ours.status, ours.reason) == (
            theirs.client_id, theirs.status, theirs.reason)
        for key in ("num-steps", "noise-multiplier", "sample-rate", "epsilon", "num-examples",
                    "partition-id"):
            assert ours.metrics.get(key) == theirs.metrics.get(key), key
        assert ours.metrics.keys() == theirs.metrics.keys()
        if theirs.status == "ok":
            server.account(ours.metrics)
    assert {r.status for r in loop.reports} == {"ok", "declined"}
    assert server.disagreements == {}
    assert together.states.keys() == loop.states.keys()  # all but a client whose history
    assert len(loop.states) == 7  # stays as it was (no step left)
    for client, state in loop.states.items():
        assert (state_from_bytes(together.states[client])[protocol.ACCOUNTANT_STATE]
                == state_from_bytes(state)[protocol.ACCOUNTANT_STATE])


def test_a_budget_run_together_spends_and_stops_as_one_at_a_time(tmp_path, one_torch_thread):
    """A whole run under a budget that ends it: the same clients.csv statuses, reasons, ε and
    steps, the same max ε per round, stop reason and summary ε both ways; accuracy of the
    same order (the draws differ)."""
    runs = {}
    for flag in ("true", "false"):
        config = tiny_config(tmp_path, *LOCAL, "privacy.target_epsilon=3",
                             "privacy.client_rounds=2", "run.rounds=4", "client.local_steps=4",
                             f"engine.vectorise_clients={flag}", f"run.dir={tmp_path / flag}")
        assert (one_at_a_time_because(config) is None) == (flag == "true")
        runs[flag] = run_inprocess(config).path
    columns = ("round", "client_id", "status", "reason", "epsilon", "num_examples")
    rows = {flag: [[row[c] for c in columns] for row in rows_of(path / "clients.csv")]
            for flag, path in runs.items()}
    assert rows["true"] == rows["false"] and {r[2] for r in rows["true"]} >= {"ok", "rejected"}
    metrics = {flag: rows_of(path / "metrics.csv") for flag, path in runs.items()}
    assert [r["max_client_epsilon"] for r in metrics["true"]] == [
        r["max_client_epsilon"] for r in metrics["false"]]
    import json
    summaries = {flag: json.loads((path / "summary.json").read_text())
                 for flag, path in runs.items()}
    for key in ("stop_reason", "rounds_completed"):
        assert summaries["true"][key] == summaries["false"][key]
    assert summaries["true"]["privacy"]["epsilon"] == summaries["false"]["privacy"]["epsilon"]
    assert summaries["true"]["privacy"]["clients_disagreeing"] == 0


def test_private_chunks_hold_a_bounded_number_of_per_example_gradients(tmp_path, monkeypatch):
    resources = task_resources(tiny_config(tmp_path, *LOCAL, "privacy.noise_multiplier=1"))
    per_client = sum(p.numel() * 4 for p in resources.model.parameters()) * (32 + 4)
    monkeypatch.setattr(private_chunks, "PRIVATE_CHUNK_BYTES", 3 * per_client)
    assert private_chunk_sizes(7, resources) == [3, 2, 2]


def test_an_empty_poisson_sample_takes_a_noise_only_step(tmp_path, monkeypatch,
                                                         one_torch_thread):
    """No example sampled at any step: the step adds the noise alone, divided by the expected
    batch size (as Opacus' empty batch), and the client's reply carries no train-loss (it
    measured none; NaN would be refused) and passes the reply schema."""
    resources = task_resources(tiny_config(tmp_path, *LOCAL, "privacy.noise_multiplier=1",
                                           "client.optimizer=sgd", "client.lr=1.0",
                                           "client.local_steps=1"))
    arrays = moved_global_arrays(resources)
    monkeypatch.setattr(private_chunks, "poisson_flips",
                        lambda sizes, rates, steps: np.zeros((steps, sum(sizes)), bool))
    (chunk,) = list(train_private_chunks(resources, 1, round_content(1), arrays, [0, 1]))
    schema = protocol.train_reply_schema("fedavg", "local")
    for client, trained in enumerate(chunk.trained):
        assert trained.metrics["examples-seen"] == 0 and trained.metrics["num-steps"] == 1
        assert "train-loss" not in trained.metrics
        assert check_metric_values(trained.metrics, schema) is None
        moved = np.concatenate([(arrays[n] - trained.arrays[n]).ravel() for n in arrays])
        n = len(resources.client_train_rows(client))
        assert moved.std() == pytest.approx(1.0 / int(n / poisson_steps(n, 32)), rel=0.1)
