"""Local DP: DP-SGD clients whose ε accumulates in their Context.state, budgets, config errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedtune.client import private_chunks
from fedtune.config import ConfigError, load_config
from fedtune.engine.inprocess import run_inprocess
from fedtune.engine.launch import preflight
from fedtune.models.build import build_model
from fedtune.models.weights import shared_state
from fedtune.privacy import dp_sgd
from fedtune.privacy.dp_sgd import LocalDPSettings, poisson_loader, train_private
from fedtune.privacy.local import LocalDP
from fedtune.task import task_resources, train_settings
from tests.conftest import MLP_DIGITS, tiny_config


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_client_epsilon_after_3_rounds_is_one_accountant_over_all_its_steps(tmp_path):
    config = tiny_config(tmp_path, "privacy.mode=local", "privacy.noise_multiplier=1.2",
                         "run.rounds=3", "client.local_steps=4")
    run_dir = run_inprocess(config).path
    sizes = {int(r["client_id"]): int(r["total"]) for r in _rows(run_dir / "partitions.csv")}
    resources = task_resources(config)
    by_round: dict[int, dict[int, float]] = {}
    for row in _rows(run_dir / "clients.csv"):
        by_round.setdefault(int(row["round"]), {})[int(row["client_id"])] = float(row["epsilon"])
    for client, epsilon in by_round[3].items():
        n = len(resources.federation.client_train_rows[client])
        assert n <= sizes[client]
        accountant = RDPAccountant()  # one accountant over all 3 x 4 steps
        for _ in range(12):
            accountant.step(noise_multiplier=1.2, sample_rate=1 / math.ceil(n / 32))
        assert epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-4)
        assert by_round[1][client] < by_round[2][client] < epsilon  # not reset each round
    metrics = _rows(run_dir / "metrics.csv")
    assert [float(r["max_client_epsilon"]) for r in metrics] == pytest.approx(
        [max(by_round[r].values()) for r in (1, 2, 3)], rel=1e-5)
    assert all(r["epsilon"] == "" for r in metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy"]["mode"] == "local"
    assert summary["privacy"]["epsilon"] == pytest.approx(max(by_round[3].values()), rel=1e-5)
    assert (run_dir / "plots" / "epsilon.png").is_file()


def test_a_client_out_of_budget_stops_says_why_and_never_exceeds_the_target(tmp_path):
    # noise planned for 1 round of 4 steps; every client trains in all 3 rounds
    config = tiny_config(tmp_path, "privacy.mode=local", "privacy.target_epsilon=3",
                         "privacy.client_rounds=1", "run.rounds=3", "client.local_steps=4")
    run_dir = run_inprocess(config).path
    rows = _rows(run_dir / "clients.csv")
    assert all(float(r["epsilon"]) <= 3.0 for r in rows)
    assert {r["status"] for r in rows if r["round"] == "1"} == {"ok"}
    later = [r for r in rows if r["round"] != "1"]
    assert later and all(r["status"] == "rejected" for r in later)
    assert all("privacy budget: trained 0 of 4 steps" in r["reason"] for r in later)
    assert all(float(r["max_client_epsilon"]) <= 3.0 for r in _rows(run_dir / "metrics.csv"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "every client sampled in round 2 has spent its budget" in summary["stop_reason"]
    assert summary["rounds_completed"] == 2


def test_local_dp_with_infinite_epsilon_clips_without_noise_and_reports_no_epsilon(tmp_path):
    config = tiny_config(tmp_path, "privacy.mode=local", "privacy.target_epsilon=inf",
                         "run.rounds=2")
    run_dir = run_inprocess(config).path
    rows = _rows(run_dir / "clients.csv")
    assert rows and {r["status"] for r in rows} == {"ok"}
    assert all(r["epsilon"] == "" for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_on_a_frozen_transformer_trains_only_what_requires_grad(tmp_path, tiny_bert_path,
                                                                        mode):
    config = load_config(None, [
        "data.max_examples=200", "data.num_clients=2", f"model.path={tiny_bert_path}",
        "model.max_length=24", "engine.backend=inprocess", "privacy.mode=local",
        "privacy.noise_multiplier=0.5", f"privacy.grad_sample_mode={mode}",
        "client.local_steps=2", "client.lr=0.01"])
    resources = task_resources(config)
    model = build_model(resources.spec, 0)
    bert = model.bert  # the tiny BERT has no mean pooling: transformers' own classifier
    bert.embeddings.requires_grad_(False)  # as a frozen/LoRA transfer mode would
    bert.encoder.layer[0].requires_grad_(False)
    before = shared_state(model)
    rows = resources.federation.client_train_rows[0]
    loader = poisson_loader(resources.encoded, resources.federation.data.labels, rows, 8, 0,
                            model)
    settings = LocalDPSettings(delta=1e-5, max_grad_norm=1.0, accountant="rdp",
                               grad_sample_mode=mode, noise_multiplier=0.5)
    result = train_private(model, loader, train_settings(config), settings, [],
                           torch.device("cpu"))
    after = shared_state(model)
    assert set(after) == set(before)  # the same names: no Opacus "_module." prefix
    assert not any("_module" in name for name in after)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        assert changed == (name in trainable), name
    assert result.train.num_steps == 2 and result.history == [(0.5, result.sample_rate, 2)]
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


def test_a_text_run_with_local_dp_on_a_transformer(tmp_path, tiny_bert_path):
    config = tiny_config(tmp_path, base=[
        "data.dataset=rotten_tomatoes", "data.max_examples=300", "data.num_clients=3",
        f"model.path={tiny_bert_path}", "model.max_length=24", "run.rounds=2",
        "client.local_steps=2", "engine.backend=inprocess", "strategy.fraction_train=1.0",
        "privacy.mode=local", "privacy.noise_multiplier=1.0"])
    run_dir = run_inprocess(config).path
    rows = _rows(run_dir / "clients.csv")
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    assert all(0 < float(r["epsilon"]) < math.inf for r in rows)


@pytest.mark.parametrize("overrides, message", [
    (["privacy.target_epsilon=0"], "privacy.target_epsilon = 0 is not allowed"),
    (["privacy.target_epsilon=-1"], "privacy.target_epsilon = -1 is not allowed"),
    (["privacy.target_epsilon=2", "privacy.noise_multiplier=1"],
     "privacy.noise_multiplier = 1 is not allowed with privacy.target_epsilon = 2"),
    (["privacy.mode=central", "privacy.target_epsilon=2", "privacy.delta=0.3"],
     "privacy.delta = 0.3 is not allowed: must be < 1/data.num_clients = 0.25"),
    (["privacy.delta=1"], "privacy.delta = 1 is not allowed"),
    (["privacy.target_epsilon=2", "client.max_grad_norm=1"],
     "client.max_grad_norm = 1 is not allowed with privacy.mode = 'local'"),
    (["privacy.target_epsilon=2", "privacy.accountant=gdp"], "privacy.accountant = 'gdp'"),
    (["privacy.mode=central", "privacy.target_epsilon=1", "privacy.adaptive_clipping=true",
      "privacy.delta=0.01", "privacy.clipped_count_stddev=0.2"],
     "privacy.clipped_count_stddev = 0.2 is not allowed"),
    (["privacy.mode=central", "privacy.target_epsilon=1", "privacy.delta=0.01",
      "privacy.clipped_count_stddev=2", "privacy.count_budget_share=0.1"],
     "privacy.count_budget_share = 0.1 is not allowed with privacy.clipped_count_stddev = 2"),
    (["privacy.mode=central", "privacy.target_epsilon=1", "privacy.delta=0.01",
      "strategy.update_norm_z=3"],
     "strategy.update_norm_z = 3 is not allowed with privacy.mode = 'central': must be 0"),
    (["privacy.mode=central", "privacy.target_epsilon=1", "privacy.delta=0.01",
      "privacy.count_budget_share=1"], "privacy.count_budget_share = 1 is not allowed"),
])
def test_bad_privacy_config_gives_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        preflight(load_config(None, [*MLP_DIGITS, "privacy.mode=local", *overrides]))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_local_delta_must_be_below_one_over_the_smallest_client(tmp_path):
    config = tiny_config(tmp_path, "privacy.mode=local", "privacy.target_epsilon=1",
                         "privacy.delta=0.01")
    with pytest.raises(ConfigError, match="privacy.delta = 0.01 is not allowed: must be < 1/n"):
        task_resources(config)
    # the server of a files dataset knows no client sizes: each party checks its own
    LocalDP().check_data(config, [])
    with pytest.raises(ConfigError, match="smallest client's n = 100 "):
        LocalDP().check_data(config, [200, 100])


def _train_twice(config, secure: bool, mode: str) -> list[dict[str, np.ndarray]]:
    """The same client trained twice from the same state, every seed a run sets set alike
    (torch's global generator, the loader's seed): only the DP draws can differ."""
    resources = task_resources(config)
    rows = resources.federation.client_train_rows[0]
    settings = LocalDPSettings(delta=1e-5, max_grad_norm=1.0, accountant="rdp",
                               grad_sample_mode=mode, noise_multiplier=1.0, secure=secure)
    results = []
    for _ in range(2):
        torch.manual_seed(11)
        model = build_model(resources.spec, 0)
        loader = poisson_loader(resources.encoded, resources.federation.data.labels, rows, 16,
                                5, model, secure=secure)
        train_private(model, loader, train_settings(config), settings, [], torch.device("cpu"))
        results.append(shared_state(model))
    return results


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_noise_and_sampling_do_not_follow_the_run_seed(mode):
    """The old DP-SGD drew its noise from torch's generator, which a client seeds from run.seed
    (known to the server), and its Poisson sample from a generator seeded the same way: two
    trainings seeded alike were identical. Now they differ; the insecure switch repeats."""
    config = load_config(None, [*MLP_DIGITS, "privacy.mode=local",
                                "privacy.noise_multiplier=1", "client.local_steps=3"])
    first, second = _train_twice(config, secure=True, mode=mode)
    assert all(not np.array_equal(first[name], second[name]) for name in first)
    first, second = _train_twice(config, secure=False, mode=mode)
    assert all(np.array_equal(first[name], second[name]) for name in first)


def test_the_secure_sampler_draws_poisson_batches_at_the_accounted_rate():
    from fedtune.privacy.dp_sgd import SecurePoissonSampler, poisson_steps

    steps = poisson_steps(500, 25)
    assert steps == 20 and poisson_steps(93 * 16, 16) == 92  # Opacus' int(1 / (1 / 93))
    sampler = SecurePoissonSampler(num_samples=500, sample_rate=1 / steps, steps=steps)
    sizes = [len(batch) for _ in range(20) for batch in sampler]
    assert len(sizes) == 400 and len(set(sizes)) > 5  # Poisson: the size varies
    assert np.mean(sizes) == pytest.approx(25, rel=0.05)


def test_the_server_accounts_every_client_itself_and_ignores_a_reported_zero(tmp_path,
                                                                              monkeypatch):
    """Every client reports epsilon = 0 (issue 25, item 12): the server's epsilon is still each
    client's opacus accountant over the sigma, rate and steps the server asked for, and
    summary.json names the disagreement."""
    original = LocalDP.train

    def lying(self, resources, shard, seed, state, objective):
        trained = original(self, resources, shard, seed, state, objective)
        trained.metrics["epsilon"] = 0.0
        return trained

    monkeypatch.setattr(LocalDP, "train", lying)  # the Opacus path, one client at a time
    config = tiny_config(tmp_path, "privacy.mode=local", "privacy.noise_multiplier=1.2",
                         "run.rounds=2", "client.local_steps=4", "engine.vectorise_clients=false")
    run_dir = run_inprocess(config).path
    assert {float(r["epsilon"]) for r in _rows(run_dir / "clients.csv")} == {0.0}
    resources = task_resources(config)
    expected = []
    for rows in resources.federation.client_train_rows:
        accountant = RDPAccountant()
        for _ in range(8):  # 2 rounds x 4 steps, every client sampled
            accountant.step(noise_multiplier=1.2, sample_rate=1 / math.ceil(len(rows) / 32))
        expected.append(accountant.get_epsilon(delta=1e-5))
    summary = json.loads((run_dir / "summary.json").read_text())["privacy"]
    assert summary["epsilon"] == pytest.approx(max(expected), rel=1e-6)
    assert summary["max_reported_epsilon"] == 0.0
    assert summary["clients_disagreeing"] == 4
    assert "reported epsilon 0.0" in next(iter(summary["disagreements"].values()))
    assert summary["client_sizes_known"] is True and summary["private"] is True
    metrics = _rows(run_dir / "metrics.csv")
    assert float(metrics[-1]["max_client_epsilon"]) == pytest.approx(max(expected), rel=1e-5)


def test_a_supernode_refuses_the_insecure_switch_unless_its_node_config_allows_it():
    from flwr.app import Context, RecordDict

    from fedtune.client.app import check_insecure_noise
    from fedtune.config import to_run_config
    from fedtune.engine.inprocess import node_config

    config = load_config(None, [*MLP_DIGITS, "privacy.mode=local", "privacy.noise_multiplier=1",
                                "privacy.insecure_reproducible_noise=true"])
    deployed = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                       run_config=to_run_config(config))
    with pytest.raises(ConfigError, match="not allowed by this SuperNode"):
        check_insecure_noise(config, deployed)
    for client in range(4):  # fedtune's simulation allows it, and says so
        simulated = Context(run_id=1, node_id=1000 + client, state=RecordDict(),
                            node_config=node_config(client, 4, to_run_config(config)),
                            run_config=to_run_config(config))
        check_insecure_noise(config, simulated)
    private = load_config(None, [*MLP_DIGITS, "privacy.mode=local", "privacy.noise_multiplier=1"])
    check_insecure_noise(private, deployed)
    assert all("insecure-noise-allowed" not in node_config(c, 4, to_run_config(private))
               for c in range(4))


@pytest.mark.parametrize(("secure", "refused"), [(True, True), (False, False)])
def test_a_supernode_refuses_the_switch_under_distributed_dp_only(secure, refused):
    """Central DP's clients draw noise only under SecAgg+ (distributed DP): a deployed
    SuperNode refuses the switch then, and has nothing to refuse without SecAgg+ (the server
    adds the noise)."""
    from flwr.app import Context, RecordDict

    from fedtune.client.app import check_insecure_noise
    from fedtune.config import to_run_config

    config = load_config(None, [*MLP_DIGITS, "privacy.mode=central", "privacy.noise_multiplier=1",
                                "privacy.adaptive_clipping=false",
                                f"strategy.secure_aggregation={str(secure).lower()}",
                                "privacy.insecure_reproducible_noise=true"])
    deployed = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                       run_config=to_run_config(config))
    if refused:
        with pytest.raises(ConfigError, match="not allowed by this SuperNode"):
            check_insecure_noise(config, deployed)
    else:
        check_insecure_noise(config, deployed)


def test_the_servers_round_by_round_account_is_one_accountant_from_scratch(tmp_path):
    """The server composes each client's account round by round (per-(σ, q) step counts and
    cached one-step RDP): after every round each client's ε is bit for bit Opacus'
    RDPAccountant stepped over all its steps from scratch, its state stays one (σ, q, steps)
    entry, and the budget rule holds (noise planned for 2 rounds, 3 asked for: the
    steps stop where one more would pass the target)."""
    from fedtune import protocol
    from fedtune.privacy.accounting import history_from_lists
    from fedtune.privacy.local import LocalServer

    config = tiny_config(tmp_path, "privacy.mode=local", "privacy.target_epsilon=3",
                         "privacy.client_rounds=2", "privacy.delta=1e-3",
                         "client.local_steps=4")
    sizes = [100, 7 * 32]
    server = LocalServer(config, sizes)
    for _ in range(3):
        server.record_round([], [{protocol.PARTITION_ID: client, protocol.NUM_EXAMPLES: n}
                                 for client, n in enumerate(sizes)])
        for client, n in enumerate(sizes):
            [(sigma, q, steps)] = history_from_lists(server.histories[str(client)])
            assert q == 1 / math.ceil(n / 32)
            accountant = RDPAccountant()
            for _ in range(steps):
                accountant.step(noise_multiplier=sigma, sample_rate=q)
            assert server.client_epsilons[str(client)] == accountant.get_epsilon(delta=1e-3)
    for client in map(str, range(len(sizes))):
        [(sigma, q, steps)] = history_from_lists(server.histories[client])
        assert 8 <= steps < 12  # the two planned rounds fit, three do not
        assert server.client_epsilons[client] <= 3
        one_more = RDPAccountant()
        one_more.history = [(sigma, q, steps + 1)]
        assert one_more.get_epsilon(delta=1e-3) > 3


def _empty_samples_for(monkeypatch, size: int) -> set[str]:
    """Every Poisson sample of a client with ``size`` examples made empty, on the Opacus path
    (``SecurePoissonSampler``) and the batched one (``poisson_flips``); the paths that drew one
    are added to the returned set."""
    drawn: set[str] = set()
    sampler = dp_sgd.SecurePoissonSampler.__iter__

    def nothing_sampled(self):
        if self.num_samples != size:
            return sampler(self)
        drawn.add("opacus")
        return iter([[] for _ in range(self.steps)])

    flips = private_chunks.poisson_flips

    def no_flips(sizes, rates, steps):
        taken, start = flips(sizes, rates, steps), 0
        for n in sizes:
            if n == size:
                taken[:, start:start + n] = False
                drawn.add("batched")
            start += n
        return taken

    monkeypatch.setattr(dp_sgd.SecurePoissonSampler, "__iter__", nothing_sampled)
    monkeypatch.setattr(private_chunks, "poisson_flips", no_flips)
    return drawn


@pytest.mark.parametrize(("path", "strategy"), [("opacus", "fedavg"), ("opacus", "fedmedian"),
                                                ("batched", "fedavg"), ("batched", "krum")])
def test_a_client_whose_poisson_samples_are_all_empty_is_accepted_without_a_loss(
        tmp_path, monkeypatch, path, strategy):
    """DP-SGD's Poisson sampling can draw no example at any step of a small client: it steps on
    noise alone and measures no loss. It used to send train-loss = NaN, which the reply schema
    refuses, so an honest client's update was rejected. Now its reply carries no train-loss and
    is accepted: clients.csv says ok with an empty train_loss, the round's model is applied and
    its train_loss is the example-weighted mean of the clients that measured one (not counting
    the silent one as 0) - on the Opacus path and the batched one, through the summing
    aggregator (fedavg) and through a Flower strategy handed every reply (fedmedian, krum:
    Flower refuses replies whose metrics differ in keys, so train-loss is left out of all)."""
    config = tiny_config(tmp_path, "privacy.mode=local", "privacy.noise_multiplier=1",
                         "privacy.delta=1e-3", "model.dropout=0", "client.local_steps=3",
                         "data.num_clients=6", "data.partitioner=dirichlet", "data.alpha=1.0",
                         f"engine.vectorise_clients={path == 'batched'}".lower(),
                         f"strategy.name={strategy}")
    sizes = [len(rows) for rows in task_resources(config).federation.client_train_rows]
    silent = int(np.argmin(sizes))
    assert sizes.count(sizes[silent]) == 1
    drawn = _empty_samples_for(monkeypatch, sizes[silent])
    run_dir = run_inprocess(config).path
    assert drawn == {path}
    clients = _rows(run_dir / "clients.csv")
    strategy_metrics = [json.loads(line)["train"] for line in
                        (run_dir / "strategy_metrics.jsonl").read_text().splitlines()]
    for server_round, row, aggregated in zip((1, 2), _rows(run_dir / "metrics.csv"),
                                             strategy_metrics, strict=True):
        trained = [r for r in clients if int(r["round"]) == server_round]
        assert [r["status"] for r in trained] == ["ok"] * 6
        (mine,) = [r for r in trained if int(r["client_id"]) == silent]
        assert (mine["train_loss"], mine["examples_trained"]) == ("", "0")
        others = [r for r in trained if r is not mine]
        assert all(float(r["train_loss"]) > 0 for r in others)
        weighted = np.average([float(r["train_loss"]) for r in others],
                              weights=[int(r["num_examples"]) for r in others])
        assert (row["clients_ok"], row["model_update"]) == ("6", "applied")
        assert float(row["train_loss"]) == pytest.approx(weighted, rel=1e-5)
        if strategy == "fedavg":  # the summing aggregator weighs the clients that carry it
            assert aggregated["train-loss"] == pytest.approx(weighted, rel=1e-5)
        else:
            assert "train-loss" not in aggregated


def test_an_asynchronous_round_leaves_a_client_without_a_loss_out_of_its_train_loss(
        tmp_path, monkeypatch):
    """FedBuff under local DP: a client whose Poisson samples were all empty is heard, its
    update buffered (ok), and each server update's train_loss is the example-weighted mean of
    the heard clients that measured a loss (once counted as 0)."""
    config = tiny_config(tmp_path, "privacy.mode=local", "privacy.noise_multiplier=1",
                         "privacy.delta=1e-3", "model.dropout=0", "client.local_steps=3",
                         "data.num_clients=8", "data.partitioner=dirichlet", "data.alpha=1.0",
                         "devices.profile=lognormal", "devices.day_s=600",
                         "strategy.name=fedbuff", "strategy.concurrency=8",
                         "strategy.fedbuff_buffer_size=4", "run.rounds=4")
    sizes = [len(rows) for rows in task_resources(config).federation.client_train_rows]
    silent = int(np.argmin(sizes))
    assert sizes.count(sizes[silent]) == 1
    drawn = _empty_samples_for(monkeypatch, sizes[silent])
    run_dir = run_inprocess(config).path
    assert drawn
    clients = _rows(run_dir / "clients.csv")
    heard_silent = 0
    for row in _rows(run_dir / "metrics.csv"):
        ok = [r for r in clients if r["round"] == row["round"] and r["status"] == "ok"]
        mine = [r for r in ok if int(r["client_id"]) == silent]
        heard_silent += len(mine)
        assert all(r["train_loss"] == "" for r in mine)
        others = [r for r in ok if int(r["client_id"]) != silent]
        weighted = np.average([float(r["train_loss"]) for r in others],
                              weights=[int(r["num_examples"]) for r in others])
        assert float(row["train_loss"]) == pytest.approx(weighted, rel=1e-5)
    assert heard_silent
