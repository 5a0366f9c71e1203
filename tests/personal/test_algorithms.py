"""Each personalisation algorithm against a hand computation of its rule, on the tiny MLP:
one local SGD step (``client.local_steps = 1``) from known weights, checked against torch's
autograd gradients of a separate copy of the model combined by the paper's formula."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedtune.models.weights import load_shared_state, shared_state
from fedtune.personal.apfl import APFL
from fedtune.personal.base import personalisation_of, store_arrays, stored_arrays
from fedtune.personal.split import body_names, head_names
from fedtune.protocol import PERSONAL_MIX_STATE, PERSONAL_STATE
from fedtune.task import task_resources
from tests.conftest import tiny_config

LR = 0.1
SEED = 7
SHARD = 1
ONE_STEP = ["client.optimizer=sgd", f"client.lr={LR}", "client.local_steps=1",
            "model.dropout=0"]


def _resources(tmp_path, name: str, *extra: str):
    config = tiny_config(tmp_path, f"strategy.name={name}", *ONE_STEP, *extra)
    resources = task_resources(config)
    return resources, personalisation_of(config)


def _global(resources) -> dict[str, np.ndarray]:
    """Known global weights: the initial model, its tensors moved off their initial values."""
    rng = np.random.default_rng(0)
    return {name: (value + rng.normal(0, 0.05, value.shape)).astype(value.dtype)
            for name, value in shared_state(resources.model).items()}


def _first_batch(resources):
    inputs, labels = next(iter(resources.client_train_loader(SHARD, SEED)))
    return inputs, labels


def _gradient(resources, arrays) -> dict[str, np.ndarray]:
    """Autograd's gradient of the mean cross-entropy on the first batch at ``arrays``."""
    model = copy.deepcopy(resources.model)
    load_shared_state(model, arrays)
    model.zero_grad()
    inputs, labels = _first_batch(resources)
    torch.nn.functional.cross_entropy(model(**inputs), labels).backward()
    return {name: param.grad.numpy().copy() for name, param in model.named_parameters()}


def _train(resources, algorithm, state: RecordDict, global_arrays):
    load_shared_state(resources.model, global_arrays)
    algorithm.train(resources, SHARD, SEED, state, global_arrays)
    return shared_state(resources.model)


def test_mlp_head_is_its_classifier_and_body_its_hidden_layers(tmp_path):
    resources, _ = _resources(tmp_path, "fedper")
    assert head_names(resources.model) == ["classifier.weight", "classifier.bias"]
    assert body_names(resources.model) == ["body.0.weight", "body.0.bias"]


def test_ditto_personal_step_is_the_proximal_sgd_formula(tmp_path):
    """v' = v - lr (grad F(v) + lambda (v - w)); the reply is FedAvg's step w - lr grad F(w)."""
    resources, ditto = _resources(tmp_path, "ditto", "strategy.ditto_lambda=0.5")
    w = _global(resources)
    v = {name: value + 0.1 for name, value in w.items()}  # a personal model kept before
    state = RecordDict()
    store_arrays(state, PERSONAL_STATE, v)
    reply = _train(resources, ditto, state, w)
    grad_v, grad_w = _gradient(resources, v), _gradient(resources, w)
    personal = stored_arrays(state, PERSONAL_STATE)
    for name in w:
        expected = v[name] - LR * (grad_v[name] + 0.5 * (v[name] - w[name]))
        np.testing.assert_allclose(personal[name], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(reply[name], w[name] - LR * grad_w[name], rtol=1e-5,
                                   atol=1e-6)
    assert ditto.personal_arrays(resources, SHARD, state, w, SEED).keys() == w.keys()


def test_fedper_trains_body_and_head_together_and_keeps_the_head(tmp_path):
    resources, fedper = _resources(tmp_path, "fedper")
    w = _global(resources)
    own_head = {name: w[name] * 0.5 for name in head_names(resources.model)}
    state = RecordDict()
    store_arrays(state, PERSONAL_STATE, own_head)
    reply = _train(resources, fedper, state, w)
    start = {**w, **own_head}
    grad = _gradient(resources, start)
    kept = stored_arrays(state, PERSONAL_STATE)
    assert kept.keys() == own_head.keys()
    for name in w:
        stepped = start[name] - LR * grad[name]
        if name in own_head:  # the personal head: kept, never sent
            np.testing.assert_allclose(kept[name], stepped, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(reply[name], w[name])
        else:  # the body: sent
            np.testing.assert_allclose(reply[name], stepped, rtol=1e-5, atol=1e-6)
    personal = fedper.personal_arrays(resources, SHARD, state, w, SEED)
    for name in w:
        np.testing.assert_array_equal(personal[name], kept.get(name, w[name]))


def test_fedrep_trains_only_the_head_in_its_head_epochs_then_only_the_body(tmp_path):
    """Head epochs (body fixed) from the client's head on the global body, then one body step
    with the new head fixed; the reply's head is the global one."""
    resources, fedrep = _resources(tmp_path, "fedrep", "strategy.fedrep_head_epochs=1")
    w = _global(resources)
    heads = head_names(resources.model)
    state = RecordDict()
    reply = _train(resources, fedrep, state, w)
    # the reference: plain SGD by hand over the same batches
    model = copy.deepcopy(resources.model)
    load_shared_state(model, w)
    params = dict(model.named_parameters())
    for inputs, labels in resources.client_train_loader(SHARD, SEED):  # one head epoch
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(**inputs), labels).backward()
        with torch.no_grad():
            for name in heads:
                params[name] -= LR * params[name].grad
    head_after = {name: params[name].detach().numpy().copy() for name in heads}
    grad = _gradient(resources, {**w, **head_after})
    kept = stored_arrays(state, PERSONAL_STATE)
    for name in w:
        if name in heads:
            np.testing.assert_allclose(kept[name], head_after[name], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(reply[name], w[name])
        else:
            np.testing.assert_allclose(reply[name], w[name] - LR * grad[name], rtol=1e-5,
                                       atol=1e-6)
    assert any(not np.allclose(kept[name], w[name]) for name in heads)


def test_fedbabu_trains_the_body_under_the_fixed_head_and_fine_tunes_only_the_head(tmp_path):
    resources, babu = _resources(tmp_path, "fedbabu", "strategy.finetune_steps=3",
                                 "strategy.finetune_part=head")
    w = _global(resources)
    reply = _train(resources, babu, RecordDict(), w)
    grad = _gradient(resources, w)
    for name in w:
        if name in head_names(resources.model):
            np.testing.assert_array_equal(reply[name], w[name])
        else:
            np.testing.assert_allclose(reply[name], w[name] - LR * grad[name], rtol=1e-5,
                                       atol=1e-6)
    tuned = babu.personal_arrays(resources, SHARD, None, w, SEED)
    changed = {name for name in w if not np.array_equal(tuned[name], w[name])}
    assert changed == set(head_names(resources.model))


def test_finetune_selects_on_the_validation_split_never_worse_than_the_start(tmp_path):
    """With a validation split the fine-tuned model kept scores at least the global model's
    validation accuracy; 0 steps keep the global model."""
    from fedtune.personal.base import validation_accuracy

    resources, tune = _resources(tmp_path, "finetune", "strategy.finetune_steps=8",
                                 "strategy.finetune_part=full", "data.local_val_fraction=0.3",
                                 "client.lr=0.5")
    w = _global(resources)
    for shard in range(resources.federation.num_clients):
        load_shared_state(resources.model, w)
        start = validation_accuracy(resources, shard)
        tuned = tune.personal_arrays(resources, shard, None, w, SEED)
        load_shared_state(resources.model, tuned)
        assert validation_accuracy(resources, shard) >= start
    zero, _ = _resources(tmp_path / "zero", "finetune", "strategy.finetune_steps=0")
    w0 = _global(zero)
    assert all(np.array_equal(a, w0[n]) for n, a in
               personalisation_of(zero.config).personal_arrays(zero, 0, None, w0, 1).items())


def test_apfl_step_is_the_papers_update_of_w_v_and_alpha(tmp_path):
    """Deng et al. (2020), Algorithm 1, one local step from (w, v, alpha)."""
    resources, apfl = _resources(tmp_path, "apfl", "strategy.apfl_alpha_lr=0.3")
    assert isinstance(apfl, APFL)
    w = _global(resources)
    v = {name: value - 0.2 for name, value in w.items()}
    alpha = 0.4
    state = RecordDict()
    store_arrays(state, PERSONAL_STATE, v)
    from flwr.app import ConfigRecord

    state[PERSONAL_MIX_STATE] = ConfigRecord({"alpha": alpha})
    reply = _train(resources, apfl, state, w)
    mixed = {name: alpha * v[name] + (1 - alpha) * w[name] for name in w}
    grad_mixed, grad_w = _gradient(resources, mixed), _gradient(resources, w)
    kept = stored_arrays(state, PERSONAL_STATE)
    inner = sum(float(np.sum(grad_mixed[name] * (v[name] - w[name]))) for name in w)
    assert float(state[PERSONAL_MIX_STATE]["alpha"]) == pytest.approx(
        float(np.clip(alpha - 0.3 * inner, 0, 1)), rel=1e-5, abs=1e-6)
    for name in w:
        np.testing.assert_allclose(reply[name], w[name] - LR * grad_w[name], rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(kept[name], v[name] - LR * alpha * grad_mixed[name],
                                   rtol=1e-5, atol=1e-6)
    new_alpha = float(state[PERSONAL_MIX_STATE]["alpha"])
    personal = apfl.personal_arrays(resources, SHARD, state, w, SEED)
    for name in w:
        np.testing.assert_allclose(personal[name],
                                   new_alpha * kept[name] + (1 - new_alpha) * w[name], rtol=1e-6)


@pytest.mark.slow
def test_fedsa_lora_keeps_b_and_sends_a_and_the_head(tmp_path, tiny_bert_path):
    """The client's B matrices are trained and kept; its reply carries the trained A matrices
    and head beside the global B it received."""
    from fedtune.personal.split import lora_names

    config = tiny_config(tmp_path, base=[
        "data.dataset=rotten_tomatoes", "data.max_examples=120", "data.num_clients=3",
        "data.partitioner=iid", f"model.path={tiny_bert_path}", "model.max_length=16",
        "model.transfer=lora", "model.lora_dropout=0", "model.dropout=0",
        "strategy.name=fedsa_lora", *ONE_STEP, "engine.backend=inprocess"])
    resources = task_resources(config)
    algorithm = personalisation_of(config)
    a, b = lora_names(resources.model, "A"), lora_names(resources.model, "B")
    assert a and len(a) == len(b) and not set(a) & set(head_names(resources.model))
    w = _global(resources)
    own_b = {name: w[name] + 0.05 for name in b}
    state = RecordDict()
    store_arrays(state, PERSONAL_STATE, own_b)
    reply = _train(resources, algorithm, state, w)
    kept = stored_arrays(state, PERSONAL_STATE)
    assert kept.keys() == set(b)
    for name in b:
        np.testing.assert_array_equal(reply[name], w[name])
        assert not np.array_equal(kept[name], own_b[name])  # trained from the client's own B
    assert all(not np.array_equal(reply[name], w[name]) for name in a)
    with pytest.raises(Exception, match="model.transfer = 'full' is not allowed .* must be 'lora'"):
        from fedtune.config import load_config

        load_config(None, ["strategy.name=fedsa_lora", "model.kind=hf", "model.transfer=full"])
