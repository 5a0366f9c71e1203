"""Attacks played on the real code path: what an attacker's ``train_client`` sends against the
honest client's, the poisoned examples, and whole runs with their metrics and summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedtune import protocol
from fedtune.attacks.alie import z_max
from fedtune.client.app import train_client
from fedtune.data.encode import hashed_features
from fedtune.engine.inprocess import run_inprocess
from fedtune.models.build import build_model
from fedtune.models.weights import shared_state
from fedtune.tables.attacks import ATTACKS
from fedtune.task import task_resources
from tests.conftest import rows_of, tiny_config

EIGHT = ["data.num_clients=8", "strategy.fraction_evaluate=0"]


def _sent(config, client: int, server_round: int = 1) -> tuple[dict, dict]:
    """(global model, what ``client`` sends) for one round of ``config``, from the initial
    model (the same for every config of these tests)."""
    resources = task_resources(config)
    start = shared_state(build_model(resources.spec, config.run.seed))
    content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: server_round})})
    trained = train_client(resources, client, server_round, content, start, RecordDict())
    return start, {name: value.copy() for name, value in trained.arrays.items()}


def _update(start: dict, sent: dict) -> np.ndarray:
    return np.concatenate([(sent[k].astype(np.float64) - start[k]).ravel() for k in start])


def test_a_sign_flipper_sends_its_negated_honest_update_from_its_start_round(tmp_path):
    _, honest = _sent(tiny_config(tmp_path, *EIGHT), 1)
    attacked = tiny_config(tmp_path, *EIGHT, "attack.name=sign_flip", "attack.clients=[1]",
                           "attack.start_round=2")
    start, before = _sent(attacked, 1, server_round=1)
    assert all(np.array_equal(before[k], honest[k]) for k in honest)  # honest in round 1
    _, flipped = _sent(attacked, 1, server_round=2)
    _, honest_2 = _sent(tiny_config(tmp_path, *EIGHT), 1, server_round=2)
    np.testing.assert_allclose(_update(start, flipped), -_update(start, honest_2), atol=1e-6)


def test_alie_colluders_send_mean_minus_z_std_of_their_groups_honest_updates(tmp_path):
    clean = tiny_config(tmp_path, *EIGHT)
    honest = [_update(*_sent(clean, c)) for c in (2, 5, 6)]
    config = tiny_config(tmp_path, *EIGHT, "attack.name=alie", "attack.clients=[2, 5, 6]")
    sent = [_update(*_sent(config, c)) for c in (2, 5, 6)]
    z = z_max(8, 3)  # every client trains: n = 8 per round, m = 3 of them attack
    expected = np.mean(honest, axis=0) - z * np.std(honest, axis=0)
    for update in sent:
        np.testing.assert_allclose(update, expected, atol=1e-6)
    _, other = _sent(config, 3)  # an honest client is untouched
    assert np.array_equal(_update(*_sent(clean, 3)), _update(_sent(clean, 3)[0], other))


def _lora_config(tmp_path, tiny_bert_path, *overrides):
    return tiny_config(tmp_path, *EIGHT, *overrides, base=[
        "data.dataset=rotten_tomatoes", "data.max_examples=240", "data.partitioner=iid",
        f"model.path={tiny_bert_path}", "model.max_length=24", "model.transfer=lora",
        "model.lora_dropout=0", "run.rounds=2", "client.local_steps=2", "client.lr=0.01",
        "engine.backend=inprocess", "strategy.fraction_train=1.0"])


def test_lora_poisoning_scales_only_the_adapters_update(tmp_path, tiny_bert_path,
                                                         one_torch_thread):
    start, honest = _sent(_lora_config(tmp_path, tiny_bert_path), 3)
    attacked = _lora_config(tmp_path, tiny_bert_path, "attack.name=lora_scaling",
                            "attack.clients=[3]", "attack.lora_scale=-4")
    _, sent = _sent(attacked, 3)
    adapters = [k for k in start if ".lora_A." in k or ".lora_B." in k]
    assert adapters and len(adapters) < len(start)  # the head travels beside them
    for name in start:
        expected = start[name].astype(np.float64) + (-4.0 if name in adapters else 1.0) * (
            honest[name].astype(np.float64) - start[name])
        np.testing.assert_allclose(sent[name], expected, atol=1e-6, err_msg=name)
    assert any(not np.array_equal(sent[k], honest[k]) for k in adapters)


def test_label_flippers_train_on_flipped_copies_of_their_own_examples(tmp_path):
    config = tiny_config(tmp_path, *EIGHT, "attack.name=label_flip", "attack.clients=[4]")
    resources = task_resources(config)
    data, poisoned = resources.federation.data, resources.poisoning.train_rows[4]
    own = resources.federation.client_train_rows[4]
    assert len(poisoned) == len(own) and poisoned.min() >= len(resources.federation.test_rows)
    np.testing.assert_array_equal(data.labels[poisoned], 9 - data.labels[own])
    np.testing.assert_array_equal(resources.encoded.values[poisoned],
                                  resources.encoded.values[own])
    with resources.poisoned(4):
        assert np.array_equal(resources.client_train_rows(4), poisoned)
        assert np.array_equal(resources.client_train_rows(3),
                              resources.federation.client_train_rows[3])
    assert np.array_equal(resources.client_train_rows(4), own)


def test_a_digits_backdoor_replaces_half_its_other_digits_by_patched_target_copies(tmp_path):
    config = tiny_config(tmp_path, *EIGHT, "attack.name=backdoor", "attack.clients=[0]",
                         "attack.target_label=7")
    resources = task_resources(config)
    labels, values = resources.federation.data.labels, resources.encoded.values
    own, poisoned = resources.federation.client_train_rows[0], resources.poisoning.train_rows[0]
    added = np.setdiff1d(poisoned, own)
    others = own[labels[own] != 7]
    assert len(poisoned) == len(own) and len(added) == math.ceil(0.5 * len(others))
    assert (labels[added] == 7).all()
    assert (values[added].reshape(-1, 8, 8)[:, -3:, -3:] == 1.0).all()
    tests = resources.poisoning.triggered_test_rows
    assert len(tests) == (labels[resources.federation.test_rows] != 7).sum()
    assert (labels[tests] == 7).all()


def test_a_backdoor_attacker_holding_only_the_target_label_trains_on_its_own_rows(tmp_path):
    one_label = ("data.num_clients=10", "data.partitioner=shards", "data.labels_per_client=1")
    federation = task_resources(tiny_config(tmp_path, *EIGHT, *one_label)).federation
    own = federation.client_train_rows[2]
    target = int(federation.data.labels[own][0])
    assert (federation.data.labels[own] == target).all()
    config = tiny_config(tmp_path, *EIGHT, *one_label, "attack.name=backdoor",
                         "attack.clients=[2]", f"attack.target_label={target}")
    poisoning = task_resources(config).poisoning
    np.testing.assert_array_equal(poisoning.train_rows[2], own)
    assert len(poisoning.triggered_test_rows) > 0


def test_a_text_backdoor_prepends_its_trigger_and_encodes_as_the_model_does(tmp_path):
    config = tiny_config(tmp_path, "data.dataset=rotten_tomatoes", "data.max_examples=400",
                         "model.num_features=512", *EIGHT, "attack.name=backdoor",
                         "attack.clients=[1]", "attack.trigger='cf mn bb'")
    resources = task_resources(config)
    data = resources.federation.data
    row = resources.poisoning.triggered_test_rows[0]
    assert data.texts[row].startswith("cf mn bb ") and data.labels[row] == 0
    expected = hashed_features([data.texts[row]], 512).toarray()
    np.testing.assert_allclose(resources.encoded.values[row].toarray(), expected)


@pytest.mark.parametrize("name", [n for n, e in ATTACKS.items() if e.acts_on])
def test_every_attack_plays_a_round_and_is_measured(tmp_path, name, one_torch_thread, request):
    played = ("run.rounds=1", "strategy.name=krum", "strategy.num_malicious=2",
              f"attack.name={name}", "attack.count=2")
    config = (_lora_config(tmp_path, request.getfixturevalue("tiny_bert_path"), *played)
              if ATTACKS[name].check is not None else tiny_config(tmp_path, *EIGHT, *played))
    run_dir = run_inprocess(config).path
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["attack"]["name"] == name and len(summary["attack"]["attackers"]) == 2
    assert summary["attack"]["acts_on"] == ATTACKS[name].acts_on
    row = rows_of(run_dir / "metrics.csv")[0]
    # Krum keeps one of 8: 2/2 attackers or 1/2 and 6/6 or 5/6 honest ones are left out
    filtered = float(row["malicious_filtered"]) * 2 + float(row["benign_filtered"]) * 6
    assert filtered == pytest.approx(7)
    assert (row["attack_success_rate"] != "") == ATTACKS[name].backdoor


@pytest.mark.parametrize("strategy", [
    ["strategy.name=multikrum", "strategy.num_malicious=2"],  # keeps the 6 best of 8
    # cuts int(0.25 x 8) = 2 per tail: the boosted updates sit in the tails of most coordinates
    ["strategy.name=fedtrimmedavg", "strategy.trim_beta=0.25"],
    ["strategy.name=fltrust"],  # the boosted sign flips point away from the server's update
])
def test_selecting_aggregators_leave_out_every_boosted_update_and_the_rates_say_so(
        tmp_path, strategy, one_torch_thread):
    config = tiny_config(tmp_path, *EIGHT, "run.rounds=2", *strategy, "attack.name=scaling",
                         "attack.count=2")
    rows = rows_of(run_inprocess(config).path / "metrics.csv")
    assert [float(r["malicious_filtered"]) for r in rows] == [1.0, 1.0]
    assert [float(r["benign_filtered"]) for r in rows] == [0.0, 0.0]


@pytest.fixture(scope="module")
def ray_two_cpus():
    """One local Ray for this module's runs (the engine leaves a running session alone)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("attack, defence", [("alie", "fltrust"), ("backdoor", "bucketing")])
def test_the_ray_engine_plays_attacks_and_defences_as_the_in_process_runtime(
        tmp_path, attack, defence, ray_two_cpus, one_torch_thread):
    """Colluders training their group in the actors, a data attack's poisoned rows, FLTrust's
    root training and bucketing's shuffle: the same metrics and model bit for bit (the
    in-process side with one torch thread, as each actor has)."""
    from safetensors.numpy import load_file

    from fedtune.engine.ray_engine import run_ray_engine

    settings = [*EIGHT, "run.rounds=2", f"strategy.name={defence}", f"attack.name={attack}",
                "attack.count=2"]
    ray_dir = run_ray_engine(tiny_config(tmp_path / "ray", *settings, "engine.backend=ray",
                                         "engine.num_actors=1")).path
    local_dir = run_inprocess(tiny_config(tmp_path / "local", *settings)).path
    columns = ("eval_accuracy", "attack_success_rate", "malicious_filtered", "benign_filtered")
    assert ([[r[c] for c in columns] for r in rows_of(ray_dir / "metrics.csv")]
            == [[r[c] for c in columns] for r in rows_of(local_dir / "metrics.csv")])
    ours = load_file(str(ray_dir / "model" / "model.safetensors"))
    theirs = load_file(str(local_dir / "model" / "model.safetensors"))
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


def _count_formed(worker) -> None:
    """(Run in a Ray actor) record every collusion group's update this process forms."""
    from fedtune.client import attacking

    formed = getattr(attacking.formed_update, "formed", None)
    if formed is None:
        original = attacking.formed_update

        def counted(resources, group, server_round, *rest):
            counted.formed.append((server_round, group))
            return original(resources, group, server_round, *rest)

        counted.formed = []
        attacking.formed_update = counted


def _formed(worker) -> list:
    from fedtune.client import attacking

    return attacking.formed_update.formed


@pytest.mark.slow
def test_the_ray_engine_forms_a_collusion_groups_update_once_a_round_for_all_actors(
        tmp_path, ray_two_cpus, one_torch_thread):
    """Two groups of min-max colluders spread over three blocks on two actors: each group's
    update is formed once a round in the whole run (not by every actor that meets a member),
    and the run equals the in-process one bit for bit."""
    import ray
    from safetensors.numpy import load_file

    from fedtune.engine.ray_engine import ray_engine_grid
    from fedtune.server.app import run_federated

    settings = ["data.num_clients=96", "strategy.fraction_evaluate=0", "run.rounds=2",
                "attack.name=min_max", "attack.count=10", "attack.collude=5"]
    config = tiny_config(tmp_path / "ray", *settings, "engine.backend=ray",
                         "engine.num_actors=2")
    # a ``train`` of its own keeps every phase on the actors (none runs in the driver)
    with ray_engine_grid(config, train=train_client) as grid:
        actors = [lane.actor for lane in grid._lanes]
        ray.get([actor.__ray_call__.remote(_count_formed) for actor in actors])
        ray_dir = run_federated(grid, config).path
        formed = [f for actor in actors for f in ray.get(actor.__ray_call__.remote(_formed))]
    groups = sorted({g for _, g in formed})
    assert len(groups) == 2 and all(len(g) == 5 for g in groups)
    assert sorted(formed) == [(r, g) for r in (1, 2) for g in groups]
    local_dir = run_inprocess(tiny_config(tmp_path / "local", *settings)).path
    assert ([r["eval_accuracy"] for r in rows_of(ray_dir / "metrics.csv")]
            == [r["eval_accuracy"] for r in rows_of(local_dir / "metrics.csv")])
    ours = load_file(str(ray_dir / "model" / "model.safetensors"))
    theirs = load_file(str(local_dir / "model" / "model.safetensors"))
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
