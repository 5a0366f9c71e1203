"""Clients trained together (engine.vectorise_clients): the same training as one client at a
time to float rounding, the same bits however blocks are spread, and only where it is allowed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from safetensors.numpy import load_file

from fedtune import protocol
from fedtune.client import vectorised
from fedtune.client.algorithms import PROXIMAL_KEY
from fedtune.client.app import train_client
from fedtune.client.vectorised import (
    chunk_sizes,
    one_at_a_time_because,
    train_chunks,
    vectorisable,
)
from fedtune.config import ConfigError, load_config
from fedtune.engine.cohort import (
    VECTOR_BLOCK,
    BlockClient,
    BlockTask,
    DecodedContent,
    add_blocks,
    block_size,
    cohort_blocks,
    cohort_clients,
    least_block,
    run_block,
)
from fedtune.engine.inprocess import act_as_server, run_inprocess
from fedtune.personal.evaluation import initial_arrays
from fedtune.personal.split import head_names
from fedtune.protocol import (
    ARRAYS,
    CONFIG,
    FEDDYN_STATE,
    PERSONAL_STATE,
    SCAFFOLD_STATE,
    SERVER_ROUND,
    to_array_record,
)
from fedtune.server.grid import CohortSpec
from fedtune.server.screening import reply_limits
from fedtune.state.codec import state_from_bytes, state_to_bytes
from fedtune.state.store import ClientStateStore
from fedtune.task import client_round_seed, task_resources
from strategies import feddyn, scaffold
from strategies.records import floating
from tests.chunk_inputs import moved_global_arrays, round_content
from tests.conftest import rows_of, tiny_config

VECTORISED = ["engine.vectorise_clients=true", "data.num_clients=12", "model.dropout=0"]


@pytest.mark.parametrize("overrides", [
    [],  # AdamW, 5 steps of 32 (the digits shards hold ~110 examples: epochs cycle)
    ["client.optimizer=sgd", "client.momentum=0.9", "client.weight_decay=0.01"],
    # one epoch: batches of 16 leave a smaller last batch, and shards differ in steps, with
    # several step counts shared by as many clients (groups that reuse one stacked copy)
    ["client.local_steps=0", "client.local_epochs=1", "client.batch_size=16",
     "data.partitioner=dirichlet", "data.alpha=1.0", "client.optimizer=sgd"],
    # each client's gradients clipped by its own total norm (torch's clip_grad_norm_), a bound
    # most steps pass: AdamW (which a clipped step moves as far) and SGD (which it moves less)
    ["client.max_grad_norm=0.05"],
    ["client.max_grad_norm=0.05", "client.optimizer=sgd", "client.lr=0.5"],
], ids=["adamw", "sgd-momentum", "epochs-padded", "clipped-adamw", "clipped-sgd"])
def test_clients_trained_together_match_one_client_at_a_time(tmp_path, overrides,
                                                             one_torch_thread):
    resources = task_resources(tiny_config(tmp_path, *VECTORISED, *overrides))
    assert vectorisable(resources)
    arrays = moved_global_arrays(resources)
    clients = list(range(12))
    together = [(trained, chunk.share)
                for chunk in train_chunks(resources, 3, round_content(3), arrays, clients)
                for trained in chunk.trained]
    steps: list[int] = []
    clipped_sgd = overrides[:2] == ["client.max_grad_norm=0.05", "client.optimizer=sgd"]
    plain = task_resources(tiny_config(tmp_path, *VECTORISED, *overrides[1:])) if clipped_sgd \
        else None
    for client_id, (trained, took) in zip(clients, together, strict=True):
        kept = {name: value.copy() for name, value in trained.arrays.items()}
        one = train_client(resources, client_id, 3, round_content(3), arrays, RecordDict())
        assert kept.keys() == one.arrays.keys() and took > 0
        for name in kept:
            np.testing.assert_allclose(kept[name], one.arrays[name], atol=1e-5, rtol=0)
        for key in ("num-examples", "examples-seen", "num-steps", "partition-id"):
            assert trained.metrics[key] == one.metrics[key], key
        assert trained.metrics["train-loss"] == pytest.approx(one.metrics["train-loss"],
                                                              rel=1e-5)
        steps.append(one.metrics["num-steps"])
        if clipped_sgd:  # the bound bites
            unclipped = train_client(plain, client_id, 3, round_content(3), arrays, RecordDict())
            assert max(np.abs(kept[n] - unclipped.arrays[n]).max() for n in kept) > 1e-3
    if "data.partitioner=dirichlet" in overrides:  # the case it is for: groups by step count,
        group_sizes = [steps.count(count) for count in set(steps)]  # two of the same size
        assert len(group_sizes) > 1 and len(set(group_sizes)) < len(group_sizes)


@pytest.mark.parametrize("overrides", [
    [],
    ["strategy.name=fedprox", "strategy.proximal_mu=0.5"],
    # FedNova's reply metric (Wang et al. 2020) and its server's normalised aggregate of the
    # updates kept one by one
    ["strategy.name=fednova", "client.optimizer=sgd", "client.momentum=0.5"],
    # each client's own state: SCAFFOLD's control variate c_i (Karimireddy et al. 2020) and
    # FedDyn's gradient g_k (Acar et al. 2021), read before a chunk trains, written after
    ["strategy.name=scaffold", "client.optimizer=sgd", "client.lr=0.1"],
    ["strategy.name=feddyn", "strategy.feddyn_alpha=0.1", "client.optimizer=sgd"],
    # under an attack the honest clients train together and each attacker alone (run_block)
    ["attack.name=sign_flip", "attack.count=3"],
    ["attack.name=label_flip", "attack.count=3", "attack.start_round=2"],
    ["attack.name=alie", "attack.count=3", "attack.collude=3"],
], ids=["fedavg", "fedprox", "fednova", "scaffold", "feddyn", "sign-flip", "label-flip",
        "alie"])
def test_a_run_with_clients_together_matches_the_loop(tmp_path, overrides, one_torch_thread):
    """The whole round (screening, sums, server): the same statuses and metrics, the same model
    to float rounding."""
    runs = {}
    for flag in ("false", "true"):
        config = tiny_config(tmp_path, *VECTORISED, *overrides,
                             f"engine.vectorise_clients={flag}", "run.rounds=3",
                             f"run.dir={tmp_path / flag}")
        assert (one_at_a_time_because(config) is None) == (flag == "true")
        runs[flag] = run_inprocess(config).path
    clients = {flag: [(r["round"], r["client_id"], r["status"], r["num_examples"])
                      for r in rows_of(path / "clients.csv")] for flag, path in runs.items()}
    assert clients["true"] == clients["false"] and len(clients["true"]) >= 36
    for ours, theirs in zip(rows_of(runs["true"] / "metrics.csv"),
                            rows_of(runs["false"] / "metrics.csv"), strict=True):
        for column in ("train_loss", "eval_loss", "eval_accuracy"):
            assert float(ours[column]) == pytest.approx(float(theirs[column]), rel=1e-4)
    ours, theirs = (load_file(str(runs[f] / "model" / "model.safetensors")) for f in runs)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("strategy", "extra"), [
    ("fedper", []), ("fedbabu", []), ("fedrep", []),
    # dropout: each client's generator goes on from the head's pass to the body's
    ("fedrep", ["model.dropout=0.3"]), ("ditto", ["strategy.ditto_lambda=0.5"])],
    ids=["fedper", "fedbabu", "fedrep", "fedrep-dropout", "ditto"])
def test_a_shared_body_run_with_clients_together_matches_the_loop(tmp_path, strategy, extra,
                                                                   one_torch_thread):
    """FedPer (Arivazhagan et al. 2019) batched: each client starts from its own head, keeps
    the trained one and replies the global head; FedBABU (Oh et al. 2022): the head does not
    train and every reply carries it as received; FedRep (Collins et al. 2021): two passes, the
    client's own head alone for strategy.fedrep_head_epochs, then the body under that head;
    Ditto (Li et al. 2021): each client's personal model pulled towards the global one, then
    the global model, the reply - as one at a time: the same statuses, metrics and personal evaluation (FedBABU's fine-tunes
    the head) to float rounding, and every FedPer and FedRep client's head (Ditto's model) in
    the state store;
    FedBABU's global head never moves."""
    from fedtune.client.app import app as fedtune_client_app
    from fedtune.config import to_run_config
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.server.app import run_federated

    runs, heads = {}, {}
    for flag in ("false", "true"):
        config = tiny_config(tmp_path, *VECTORISED, f"strategy.name={strategy}", *extra,
                             f"engine.vectorise_clients={flag}", "run.rounds=3",
                             f"run.dir={tmp_path / flag}")
        assert (one_at_a_time_because(config) is None) == (flag == "true")
        grid = InProcessGrid(fedtune_client_app, to_run_config(config), 12)
        runs[flag] = run_federated(grid, config).path
        heads[flag] = {client: protocol.to_numpy(grid.client_states.get(client)[PERSONAL_STATE])
                       for client in grid.client_states.clients()
                       if PERSONAL_STATE in grid.client_states.get(client)}
    clients = {flag: [(r["round"], r["client_id"], r["status"], r["num_examples"])
                      for r in rows_of(path / "clients.csv")] for flag, path in runs.items()}
    assert clients["true"] == clients["false"] and len(clients["true"]) == 36
    for ours, theirs in zip(rows_of(runs["true"] / "metrics.csv"),
                            rows_of(runs["false"] / "metrics.csv"), strict=True):
        for column in ("train_loss", "eval_loss", "eval_accuracy"):
            assert float(ours[column]) == pytest.approx(float(theirs[column]), rel=1e-4)
    personal = {flag: rows_of(path / "personal.csv") for flag, path in runs.items()}
    assert len(personal["true"]) == len(personal["false"]) >= 24
    for ours, theirs in zip(personal["true"], personal["false"], strict=True):
        assert [ours[k] for k in ("round", "client_id", "model", "examples")] == [
            theirs[k] for k in ("round", "client_id", "model", "examples")]
        for column in ("accuracy", "loss"):
            if theirs[column]:
                assert float(ours[column]) == pytest.approx(float(theirs[column]), abs=1e-4)
    assert heads["true"].keys() == heads["false"].keys() == (
        set() if strategy == "fedbabu" else set(range(12)))
    for client, theirs in heads["false"].items():
        assert heads["true"][client].keys() == theirs.keys() and theirs
        for name in theirs:
            np.testing.assert_allclose(heads["true"][client][name], theirs[name], atol=1e-5,
                                       rtol=0)
    ours, theirs = (load_file(str(runs[f] / "model" / "model.safetensors")) for f in runs)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-5, rtol=0)
    if strategy == "fedbabu":
        resources = task_resources(config)
        initial, head = initial_arrays(resources), head_names(resources.model)
        assert head  # every reply carried the initial head: the mean of equal heads is it
        for name in head:
            np.testing.assert_array_equal(ours[name], initial[name])
        assert max(np.abs(ours[n] - initial[n]).max() for n in ours if n not in head) > 1e-3


def _content_and_blocks(resources, config, clients):
    act_as_server(1)
    content = DecodedContent.of(RecordDict({ARRAYS: to_array_record(moved_global_arrays(resources)),
                                            CONFIG: ConfigRecord({SERVER_ROUND: 1})}))
    spec = CohortSpec(weighted_mean=True, limits=reply_limits(config, resources.federation))
    blocks = cohort_blocks([BlockClient(1000 + c, c, None) for c in clients], "train", spec,
                           least=4)
    return content, blocks


def test_blocks_give_the_same_bits_in_any_order_and_chunks_do_not_overwrite_each_other(
        tmp_path, monkeypatch, one_torch_thread):
    """What a Ray actor does with a block is what this process does: a block's sum does not
    depend on what ran before it; and a block cut into chunks of equal size (each reusing the
    previous one's stacked copies) sums each client's own update."""
    config = tiny_config(tmp_path, *VECTORISED)
    resources = task_resources(config)
    content, blocks = _content_and_blocks(resources, config, range(12))
    forward = add_blocks([run_block(resources, content, block) for block in blocks])
    backward = add_blocks([run_block(resources, content, block) for block in blocks[::-1]])
    assert forward.total.keys() == backward.total.keys()
    for name in forward.total:
        assert np.array_equal(forward.total[name], backward.total[name])
    one_chunk = forward.total
    # chunks of 2 clients: each block of 4 runs as two chunks of the same size
    per_client = sum(p.numel() * 4 for p in resources.model.parameters())
    monkeypatch.setattr(vectorised, "CHUNK_BYTES", 2 * per_client)
    assert chunk_sizes(4, resources.model) == [2, 2]
    chunked = add_blocks([run_block(resources, content, block) for block in blocks])
    assert [r.status for r in chunked.reports] == ["ok"] * 12
    for name in one_chunk:  # other chunks, other batched arithmetic: float rounding
        np.testing.assert_allclose(chunked.total[name], one_chunk[name], rtol=1e-5, atol=1e-4)


def test_a_cohorts_seeds_derived_at_once_are_the_seeds_its_chunks_derive(
        tmp_path, one_torch_thread):
    """``cohort_clients`` derives a train cohort's round seeds in one call: each client's
    ``client_round_seed``; blocks that carry them train to the bits of blocks whose chunks
    derive their own, and an evaluation gets none."""
    config = tiny_config(tmp_path, *VECTORISED)
    resources = task_resources(config)
    content, blocks = _content_and_blocks(resources, config, range(12))
    ids = [7, 2, 11, 0, 5, 9, 1, 3, 4, 6, 8, 10]
    nodes = {1000 + c: c for c in ids}
    store = ClientStateStore(memory_budget=1 << 20)
    messages = [Message(content=content.records, dst_node_id=1000 + c,
                        message_type=MessageType.TRAIN) for c in ids]
    clients = cohort_clients(messages, nodes, store, config.run.seed)
    assert [c.seed for c in clients] == [client_round_seed(config.run.seed, 1, c) for c in ids]
    seeded = cohort_blocks(clients, "train", blocks[0].spec, least=4)
    assert [[c.client_id for c in b.clients] for b in seeded] == [
        [c.client_id for c in b.clients] for b in blocks]
    derived = add_blocks([run_block(resources, content, block) for block in blocks])
    given = add_blocks([run_block(resources, content, block) for block in seeded])
    for name in derived.total:
        assert np.array_equal(derived.total[name], given.total[name])
    other = cohort_blocks([replace(c, seed=c.seed + 1) for c in clients], "train",
                          blocks[0].spec, least=4)  # the seeds given are the ones used
    moved = add_blocks([run_block(resources, content, block) for block in other])
    assert not all(np.array_equal(derived.total[n], moved.total[n]) for n in derived.total)
    evaluation = [Message(content=content.records, dst_node_id=1000 + c,
                          message_type=MessageType.EVALUATE) for c in ids]
    assert all(c.seed is None
               for c in cohort_clients(evaluation, nodes, store, config.run.seed))


def test_chunks_are_as_large_as_the_budget_allows_and_as_even_as_can_be(tmp_path):
    resources = task_resources(tiny_config(tmp_path, *VECTORISED))
    per_client = sum(p.numel() * 4 for p in resources.model.parameters() if p.requires_grad)
    most = vectorised.CHUNK_BYTES // per_client
    sizes = chunk_sizes(3 * most + 1, resources.model)
    assert sum(sizes) == 3 * most + 1 and len(sizes) == 4
    assert max(sizes) <= most and max(sizes) - min(sizes) <= 1
    assert chunk_sizes(5, resources.model) == [5]


def test_blocks_hold_at_least_a_chunk_when_clients_train_together(tmp_path):
    assert block_size(100, least=VECTOR_BLOCK) == VECTOR_BLOCK
    assert block_size(10_000, least=VECTOR_BLOCK) == 157  # 64 blocks already hold more
    assert least_block(tiny_config(tmp_path, *VECTORISED)) == VECTOR_BLOCK
    assert least_block(tiny_config(tmp_path, "engine.vectorise_clients=false")) == 1


def test_fedprox_clients_trained_together_match_one_at_a_time(tmp_path, one_torch_thread):
    """FedProx's proximal term (Li et al. 2020) added to the stacked gradients, as the loop
    adds it to one client's: the same weights to float rounding, and (mu large) other weights
    than plain training."""
    resources = task_resources(tiny_config(tmp_path, *VECTORISED, "strategy.name=fedprox",
                                           "strategy.proximal_mu=2.0", "client.lr=0.2",
                                           "client.optimizer=sgd"))
    assert vectorisable(resources)
    arrays = moved_global_arrays(resources)
    content = RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 2, PROXIMAL_KEY: 2.0})})
    (chunk,) = list(train_chunks(resources, 2, content, arrays, range(6)))
    kept = [{n: v.copy() for n, v in trained.arrays.items()} for trained in chunk.trained]
    plain = [{n: v.copy() for n, v in trained.arrays.items()} for trained in next(
        train_chunks(resources, 2, round_content(2), arrays, range(6))).trained]
    for client_id, ours, without in zip(range(6), kept, plain, strict=True):
        one = train_client(resources, client_id, 2, content, arrays, RecordDict())
        for name in one.arrays:
            np.testing.assert_allclose(ours[name], one.arrays[name], atol=1e-5, rtol=0)
        assert max(np.abs(ours[n] - without[n]).max() for n in ours) > 1e-3


def _stateful_block(resources, config, strategy):
    """A round-3 train block of 12 clients under SCAFFOLD, FedDyn or FedPer: the content (a
    random server control variate for SCAFFOLD) and every client's state random (FedPer's: its
    own head), as after earlier rounds, but client 11's (its first round: no state)."""
    rng = np.random.default_rng(1)
    moving = floating(moved_global_arrays(resources))
    if strategy == "fedper":
        moving = {name: moving[name] for name in head_names(resources.model)}

    def noise():
        return to_array_record({name: rng.normal(0, 0.05, value.shape).astype(value.dtype)
                                for name, value in moving.items()})

    records = RecordDict({ARRAYS: to_array_record(moved_global_arrays(resources)),
                          CONFIG: ConfigRecord({SERVER_ROUND: 3})})
    if strategy == "scaffold":
        records[scaffold.CONTROL_KEY], key = noise(), SCAFFOLD_STATE
    elif strategy == "fedper":
        key = PERSONAL_STATE
    else:
        records[CONFIG][feddyn.ALPHA_KEY], key = 0.1, FEDDYN_STATE
    clients = [BlockClient(1000 + c, c, state_to_bytes(RecordDict({key: noise()}))
                           if c < 11 else None) for c in range(12)]
    spec = CohortSpec(weighted_mean=False, limits=reply_limits(config, resources.federation))
    return DecodedContent.of(records), BlockTask(0, "train", clients, spec), key


@pytest.mark.parametrize("strategy", ["scaffold", "feddyn", "fedper"])
def test_client_states_after_a_batched_round_match_one_at_a_time(tmp_path, monkeypatch,
                                                                 strategy, one_torch_thread):
    """SCAFFOLD's control variates (Karimireddy et al. 2020, option II) and FedDyn's gradients
    (Acar et al. 2021): each client of a chunk corrects its gradients by its own state (a
    stacked tensor, cut to the clients of each step count) and updates it after, as one client
    at a time does; FedPer's clients (Arivazhagan et al. 2019) start from their own heads and
    keep the trained ones, replying the global head: the same new states and replies to float
    rounding, over chunks of 4; the states matter (other weights than from empty states); a
    client that timed out keeps its old state."""
    config = tiny_config(tmp_path, *VECTORISED, f"strategy.name={strategy}",
                         "client.optimizer=sgd", "client.lr=0.1", "client.local_steps=0",
                         "client.local_epochs=1", "client.batch_size=16",
                         "data.partitioner=dirichlet", "data.alpha=1.0")
    resources = task_resources(config)
    assert vectorisable(resources)
    per_client = sum(p.numel() * 4 for p in resources.model.parameters() if p.requires_grad)
    monkeypatch.setattr(vectorised, "CHUNK_BYTES", 4 * per_client)
    content, task, key = _stateful_block(resources, config, strategy)
    together = run_block(resources, content, task)
    loop = run_block(resources, content, task, train=lambda *args: train_client(*args))
    empty = run_block(resources, content, replace(task, clients=[
        replace(client, state=None) for client in task.clients]))
    assert [r.status for r in together.reports] == [r.status for r in loop.reports]
    assert sum(r.status == "ok" for r in loop.reports) >= 10
    assert together.states.keys() == loop.states.keys()
    assert len(loop.states) == sum(r.status == "ok" for r in loop.reports)
    for client_id in loop.states:
        ours, theirs = (protocol.to_numpy(state_from_bytes(r.states[client_id])[key])
                        for r in (together, loop))
        for name in theirs:
            np.testing.assert_allclose(ours[name], theirs[name], atol=1e-4, rtol=0)
    for ours, theirs, unstated in zip(together.reports, loop.reports, empty.reports,
                                      strict=True):
        if theirs.status != "ok":
            continue
        assert ours.update.keys() == theirs.update.keys()
        for record, arrays in theirs.update.items():
            for name in arrays:
                np.testing.assert_allclose(ours.update[record][name], arrays[name],
                                           atol=1e-4 if record != ARRAYS else 1e-5, rtol=0)
        if strategy == "fedper":  # the head sent back exactly as received
            for name in head_names(resources.model):
                np.testing.assert_array_equal(ours.update[ARRAYS][name],
                                              content.arrays[ARRAYS][name])
        if ours.client_id < 11:
            assert max(np.abs(ours.update[ARRAYS][n] - unstated.update[ARRAYS][n]).max()
                       for n in arrays) > 1e-3
    late = run_block(resources, content, task, client_limit_s=0.0)  # the server never heard
    assert {r.status for r in late.reports} == {"timeout"} and not late.states


@pytest.mark.parametrize("overrides", [
    ["strategy.name=apfl"],  # a local model mixed with the global one by a learnt alpha
    # Opacus' draws seeded from run.seed (the golden runs' bits)
    ["privacy.mode=local", "privacy.target_epsilon=2", "privacy.delta=1e-3",
     "privacy.insecure_reproducible_noise=true"],
    ["faults.nan_fraction=0.25"],
    ["client.precision=bf16"],
    ["engine.vectorise_clients=false"],
], ids=["apfl", "local-dp-seeded", "faults", "bf16", "off"])
def test_clients_that_need_their_own_loop_train_one_at_a_time(tmp_path, overrides):
    resources = task_resources(tiny_config(tmp_path, *VECTORISED, *overrides))
    assert not vectorisable(resources)


def test_only_fedtunes_own_runtimes_train_clients_together(tmp_path):
    with pytest.raises(ConfigError, match=r"engine.vectorise_clients = False is not allowed "
                                          r"with engine.backend = 'flower'.*ray, inprocess"):
        load_config(None, ["engine.backend=flower", "engine.vectorise_clients=false"])
    assert "one ClientApp per client" in one_at_a_time_because(
        tiny_config(tmp_path, "engine.backend=flower"))


def test_clients_train_together_by_default_where_they_may(tmp_path):
    """The default: together wherever the tables' facts allow, one at a time (with the
    reason) elsewhere; blocks of a chunk's size only where clients train together."""
    config = tiny_config(tmp_path)
    assert one_at_a_time_because(config) is None and vectorisable(task_resources(config))
    assert least_block(config) == VECTOR_BLOCK
    for overrides, reason in [
        (["strategy.name=apfl"], "has its own client side"),
        (["privacy.mode=local", "privacy.target_epsilon=2", "privacy.delta=1e-3",
          "privacy.insecure_reproducible_noise=true"], "Opacus' seeded draws"),
        (["privacy.mode=central", "privacy.target_epsilon=2", "privacy.delta=1e-3"],
         "trains with its own mechanism"),
        (["engine.vectorise_clients=false"], "engine.vectorise_clients = false"),
    ]:
        other = tiny_config(tmp_path, *overrides)
        assert reason in one_at_a_time_because(other)
        assert least_block(other) == 1


def test_heads_on_frozen_features_train_together(tmp_path, tiny_bert_path, one_torch_thread):
    config = tiny_config(tmp_path, base=[
        "data.dataset=rotten_tomatoes", "data.max_examples=240", "data.num_clients=6",
        "data.partitioner=iid", f"model.path={tiny_bert_path}", "model.max_length=24",
        # dropout, and steps into a second epoch: the DataLoader draws its base seed from
        # torch's default generator at each epoch's start, before that step's masks
        "model.transfer=frozen", "model.dropout=0.3", "client.local_steps=7",
        "client.batch_size=8", "client.lr=0.02", "engine.backend=inprocess",
        "engine.vectorise_clients=true"])
    resources = task_resources(config)
    assert resources.spec.features and vectorisable(resources)
    arrays = moved_global_arrays(resources)
    clients = list(range(6))
    (chunk,) = list(train_chunks(resources, 2, round_content(2), arrays, clients))
    for client_id, trained in zip(clients, chunk.trained, strict=True):
        one = train_client(resources, client_id, 2, round_content(2), arrays, RecordDict())
        for name in one.arrays:
            np.testing.assert_allclose(trained.arrays[name], one.arrays[name], atol=1e-5,
                                       rtol=0)


@pytest.mark.parametrize("overrides", [
    [],  # every client takes as many steps: the chunk is one group, its stacked copies
    # shards of other sizes take other numbers of steps: groups copied into the chunk's stack
    ["client.local_steps=0", "client.local_epochs=1", "client.batch_size=16",
     "data.partitioner=dirichlet", "data.alpha=1.0"],
], ids=["one-group", "groups"])
def test_kept_stacks_are_the_callers_and_hold_the_same_bits(tmp_path, overrides,
                                                            one_torch_thread):
    """``keep_stacks``: a chunk's stacked arrays own their memory, C-contiguous, and no later
    chunk of as many clients (FedBuff's next training call, which trains in the same stacked
    copies) writes them; their bits are those of the stacks a weighted mean reads in place."""
    resources = task_resources(tiny_config(tmp_path, *VECTORISED, *overrides))
    arrays = moved_global_arrays(resources)

    def stacks(clients, keep):
        (chunk,) = list(train_chunks(resources, 3, round_content(3), arrays, clients,
                                     keep_stacks=keep))
        return chunk.stacked

    kept = stacks(range(6), True)
    values = {name: value.copy() for name, value in kept.items()}
    later = stacks(range(6, 12), True)
    for name, value in kept.items():
        np.testing.assert_array_equal(value, values[name])  # the later chunk wrote elsewhere
        assert value.base is None and value.flags.c_contiguous
        assert not np.shares_memory(value, later[name])
    shared = stacks(range(6), False)
    for name, value in shared.items():
        np.testing.assert_array_equal(value, values[name])
    reused = {name: value.copy() for name, value in stacks(range(6, 12), False).items()}
    assert all(np.array_equal(shared[n], reused[n]) for n in shared) == (overrides == [])


@pytest.mark.parametrize("overrides", [
    ["client.local_steps=3"],
    # one epoch of batches of 16 (a smaller last batch, padded) with two dropout layers
    ["client.local_steps=0", "client.local_epochs=1", "client.batch_size=16",
     "model.hidden_sizes=[16,8]", "client.optimizer=sgd", "client.lr=0.5"],
], ids=["steps", "epochs-two-layers"])
def test_with_dropout_clients_drop_what_they_drop_one_at_a_time(tmp_path, overrides,
                                                                one_torch_thread):
    """Each client's masks come from its own round seed, as one client at a time: the same
    weights to float rounding (other masks would move them by far more), and other masks in
    another round."""
    resources = task_resources(tiny_config(tmp_path, *VECTORISED, "model.dropout=0.5",
                                           *overrides))
    assert vectorisable(resources)
    arrays = moved_global_arrays(resources)

    def together(server_round):
        (chunk,) = list(train_chunks(resources, server_round, round_content(server_round), arrays,
                                     range(4)))
        return [{n: v.copy() for n, v in trained.arrays.items()} for trained in chunk.trained]

    first, other_round = together(2), together(3)
    for client_id, ours in enumerate(first):
        one = train_client(resources, client_id, 2, round_content(2), arrays, RecordDict())
        for name in one.arrays:
            np.testing.assert_allclose(ours[name], one.arrays[name], atol=1e-5, rtol=0)
    name = next(iter(first[0]))
    assert not np.array_equal(first[0][name], other_round[0][name])
    assert all(layer.training for layer in resources.model.modules())  # dropout restored


@pytest.mark.parametrize("dropout", ["0", "0.3"])
def test_the_first_step_over_the_shared_weights_gives_the_stacked_copies_bits(
        tmp_path, dropout, one_torch_thread):
    """A group's first step runs its forward and backward over the one global copy of the
    weights; the same clients started from stacked copies of the same values (``start``, as
    FedPer's heads start from each client's own) end with the same weights and losses, bit for
    bit, over three steps."""
    import torch

    from fedtune.client.app import client_shard
    from fedtune.client.dropout_masks import ClientMasks
    from fedtune.models.weights import load_shared_state
    from fedtune.train import local_batches

    config = tiny_config(tmp_path, *VECTORISED, "client.local_steps=3",
                         f"model.dropout={dropout}")
    resources = task_resources(config)
    model = resources.model
    global_arrays = moved_global_arrays(resources)
    ids = list(range(5))

    def trained(start):
        load_shared_state(model, global_arrays)
        model.train()
        loaders = [resources.client_train_row_batches(client_shard(config, c), 100 + c)
                   for c in ids]
        rows = [list(local_batches(loader, resources.train_settings)) for loader in loaders]
        masks = ClientMasks(model, [torch.Generator().manual_seed(100 + c) for c in ids],
                            [loader.epoch_draws for loader in loaders],
                            [len(loader) for loader in loaders])
        arrays, results = vectorised._train_group(resources, model, rows, None, masks, start)
        return {name: value.copy() for name, value in arrays.items()}, results

    shared, shared_results = trained(None)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    stacked, stacked_results = trained(
        {name: np.stack([global_arrays[name]] * len(ids)) for name in names})
    assert [r.loss for r in shared_results] == [r.loss for r in stacked_results]
    for name, value in stacked.items():
        assert np.array_equal(shared[name], value), name
        assert not np.array_equal(value[0], global_arrays[name]), name  # they trained
