"""Transfer modes: what trains is what travels, frozen weights stay bit-identical, LoRA merges,
the bytes counted are the bytes serialised."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedtune.client.app import app as client_app
from fedtune.config import ConfigError, load_config, to_run_config
from fedtune.engine.inprocess import run_inprocess
from fedtune.models.build import (
    build_model,
    load_saved_model,
    model_spec,
    save_model,
)
from fedtune.models.hf import MeanPoolingClassifier
from fedtune.models.transfer import plain_model, shared_buffer_names, travelling_names
from fedtune.models.weights import shared_state
from fedtune.protocol import to_array_record
from fedtune.server.app import run_federated
from fedtune.task import task_resources
from fedtune.train import logits_of
from tests.conftest import tiny_config
from tests.integration.test_end_to_end import RecordingGrid

MODES = ["scratch", "full", "frozen", "top_k", "lora"]
LABELS = ("neg", "pos")


def _spec(tiny_bert_path: str, *overrides: str):
    config = load_config(None, [f"model.path={tiny_bert_path}", *overrides])
    return model_spec(config, LABELS, None)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _text_config(tmp_path, tiny_bert_path, *overrides):
    return tiny_config(tmp_path, *overrides, base=[
        "data.dataset=rotten_tomatoes", "data.max_examples=240", "data.num_clients=3",
        "data.partitioner=natural", f"model.path={tiny_bert_path}", "model.max_length=24",
        "run.rounds=2", "client.local_steps=2", "client.lr=0.01", "engine.backend=inprocess",
        "strategy.fraction_train=1.0", "strategy.fraction_evaluate=1.0",
    ])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("mode", MODES)
def test_what_travels_is_exactly_what_trains(tiny_bert_path, mode, pooling):
    model = build_model(_spec(tiny_bert_path, f"model.transfer={mode}",
                              f"model.pooling={pooling}", "model.top_k_layers=1"), seed=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    travelling = set(shared_state(model))
    assert travelling == trainable | set(shared_buffer_names(model)) == set(travelling_names(model))
    assert shared_buffer_names(model) == []  # transformers hold no running statistics
    everything = {name for name, _ in model.named_parameters()}
    pooler = {name for name in everything if ".pooler." in name}
    head = {name for name in everything if "classifier" in name}
    if mode in ("scratch", "full"):
        # mean pooling never reads BERT's [CLS] pooler, so it does not train
        assert travelling == (everything - pooler if pooling == "mean" else everything)
    elif mode == "frozen":
        assert travelling == head
    elif mode == "top_k":  # the last of the two layers, the cls pooler after it, the head
        assert {n for n in travelling if "layer.1." in n} and not any(
            "layer.0." in n or "embeddings" in n for n in travelling)
        assert travelling - head == {n for n in everything - head
                                     if "layer.1." in n or (pooling == "cls" and n in pooler)}
    else:
        adapters = {n for n in travelling if ".lora_A." in n or ".lora_B." in n}
        assert len(adapters) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
        assert travelling == adapters | head


def test_scratch_is_the_same_architecture_with_random_weights(tiny_bert_path):
    pretrained = build_model(_spec(tiny_bert_path, "model.transfer=full", "model.pooling=mean"),
                             seed=0)
    scratch = build_model(_spec(tiny_bert_path, "model.transfer=scratch", "model.pooling=mean"),
                          seed=0)
    on_disk = load_file(f"{tiny_bert_path}/model.safetensors")
    shapes = {n: p.shape for n, p in pretrained.named_parameters()}
    assert shapes == {n: p.shape for n, p in scratch.named_parameters()}
    name = "encoder.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(pretrained.state_dict()[name], on_disk[name.removeprefix("encoder.")])
    assert not torch.equal(scratch.state_dict()[name], pretrained.state_dict()[name])


def test_running_statistics_are_declared_shared_buffers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    assert shared_buffer_names(model) == ["1.running_mean", "1.running_var"]
    assert set(travelling_names(model)) == (
        {n for n, _ in model.named_parameters()} | {"1.running_mean", "1.running_var"})


@pytest.mark.parametrize("overrides, message", [
    (["model.kind=mlp", "data.dataset=digits", "model.transfer=lora"],
     "model.transfer = 'lora' is not allowed with model.kind = 'mlp': must be 'scratch' or"),
    (["model.lora_targets=' , '"], "model.lora_targets = ' , ' is not allowed"),
    (["client.precision=fp16", "client.device=cpu"],
     "client.precision = 'fp16' is not allowed with client.device = 'cpu'"),
    (["client.device=cuda", "engine.client_gpus=0"],
     "client.device = 'cuda' is not allowed with engine.client_gpus = 0"),
])
def test_transfer_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.transfer=top_k", "model.top_k_layers=3"],
     "model.top_k_layers = 3 is not allowed: must be <= 2"),
    (["model.transfer=lora", "model.lora_targets=nope"],
     "model.lora_targets = 'nope' is not allowed: must name linear layers"),
])
def test_model_dependent_transfer_errors(tiny_bert_path, overrides, message):
    with pytest.raises(ConfigError, match="^" + message) as err:
        build_model(_spec(tiny_bert_path, *overrides), seed=0)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_lora_merges_into_a_plain_model_that_predicts_the_same(tmp_path, tiny_bert_path,
                                                               pooling):
    spec = _spec(tiny_bert_path, "model.transfer=lora", f"model.pooling={pooling}")
    model = build_model(spec, seed=0).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # adapters start with B = 0 (a no-op); give them a real update
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.5)
    inputs = _inputs()
    with torch.no_grad():
        adapted = logits_of(model, inputs)
        merged = plain_model(model)
        assert merged is not model and not any("lora" in n for n in merged.state_dict())
        torch.testing.assert_close(logits_of(merged, inputs), adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits_of(model, inputs), adapted, atol=0, rtol=0)
    save_model(model, spec, tmp_path / "saved")
    loaded, _ = load_saved_model(tmp_path / "saved")
    expected_class = MeanPoolingClassifier if pooling == "mean" else type(merged)
    assert type(loaded) is expected_class
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, inputs), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["frozen", "top_k", "lora"])
def test_frozen_weights_stay_bit_identical_and_never_travel(tmp_path, tiny_bert_path, mode):
    # the token path (the feature path: tests/models/test_feature_cache.py)
    config = _text_config(tmp_path, tiny_bert_path, f"model.transfer={mode}",
                          "model.top_k_layers=1", "model.feature_cache=false")
    resources = task_resources(config)
    resident = resources.model
    grid = RecordingGrid(client_app, to_run_config(config), config.data.num_clients)
    run_dir = run_federated(grid, config).path
    assert resources.model is resident  # resident across rounds, wrapped once
    reference = build_model(resources.spec, config.run.seed)  # what every process builds
    names = travelling_names(reference)
    assert len(grid.train_replies) == 2 * 3
    for reply in grid.train_replies:  # clients return exactly the trainable tensors
        assert list(reply.content["arrays"]) == names
    # client side: the resident model's frozen tensors are untouched after two rounds,
    # the trainable ones moved
    fresh = dict(reference.named_parameters())
    for name, parameter in resident.named_parameters():
        if name in names:
            assert not torch.equal(parameter, fresh[name]), name
        else:
            assert torch.equal(parameter, fresh[name]), name
    # server side: the saved global model keeps every frozen pretrained weight bit for bit
    # (LoRA's targeted layers are saved merged: W + scale * B @ A)
    def plain_name(name: str) -> str:  # peft's name of a tensor -> its name in the plain model
        return name.removeprefix("base_model.model.").replace(".base_layer", "")

    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    plain_reference = plain_model(reference).state_dict()
    trained = {plain_name(n) for n in names} | {plain_name(n) for n in fresh
                                                if ".base_layer." in n}
    frozen = set(saved) - trained
    assert len(frozen) > 10
    for name in frozen:
        assert torch.equal(saved[name], plain_reference[name]), name


def _npy_size(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getbuffer().nbytes


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_bytes_counted_are_the_serialised_sizes(tmp_path, tiny_bert_path, mode):
    config = _text_config(tmp_path, tiny_bert_path, f"model.transfer={mode}", "run.rounds=1")
    run_dir = run_inprocess(config).path
    with (run_dir / "metrics.csv").open() as handle:
        row = next(csv.DictReader(handle))
    # independently: every travelling tensor of a freshly built model as an .npy file + its name
    model = build_model(task_resources(config).spec, 0)
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    one_update = sum(_npy_size(t.detach().numpy()) + len(n) for n, t in tensors.items())
    assert one_update >= 4 * sum(t.numel() for t in tensors.values())
    assert int(row["bytes_up"]) == 3 * one_update  # 3 training replies (evaluation: none)
    assert int(row["bytes_down"]) == 6 * one_update  # 3 train + 3 evaluate messages


def test_minilm_lora_update_is_over_100x_smaller_than_full():
    def update_bytes(mode: str) -> int:
        spec = model_spec(load_config(None, [f"model.transfer={mode}"]), LABELS, None)
        return to_array_record(shared_state(build_model(spec, seed=0))).count_bytes()

    full, lora = update_bytes("full"), update_bytes("lora")
    assert full > 90e6 and full / lora > 100


@pytest.mark.slow
def test_lora_under_ray_matches_inprocess(tmp_path, tiny_bert_path):
    """Ray clients build their frozen backbone in their own processes: the federation must reach
    the same global model as the in-process runtime, where everything shares one model."""
    from fedtune.engine.flower_sim import run_flower_simulation

    overrides = ("model.transfer=lora", "run.rounds=1", "strategy.fraction_evaluate=0.0")
    ray_config = _text_config(tmp_path, tiny_bert_path, *overrides, "engine.backend=flower",
                              "run.dir=" + str(tmp_path / "ray"))
    run_flower_simulation(ray_config)
    local = run_inprocess(_text_config(tmp_path, tiny_bert_path, *overrides,
                                       "run.dir=" + str(tmp_path / "local"))).path
    ray_model = load_file(str(tmp_path / "ray/model/model.safetensors"))
    for name, value in load_file(str(local / "model/model.safetensors")).items():
        torch.testing.assert_close(ray_model[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transfer", ["full", "lora"])
def test_bf16_autocast_trains_a_hugging_face_model_close_to_fp32(tmp_path, tiny_bert_path,
                                                                transfer, one_torch_thread):
    """client.precision = 'bf16' on CPU: the same client's update under autocast differs from
    fp32's (the forward ran in bf16) but only within bf16's rounding (relative distance < 5 %),
    with the same loss to 2 %. SGD: its step is the gradient (Adam's normalised steps turn the
    rounding of near-zero gradients into full-size steps)."""
    from flwr.app import ConfigRecord, RecordDict

    from fedtune.client.app import train_client
    from fedtune.models.weights import shared_state
    from fedtune.protocol import CONFIG, SERVER_ROUND, TRAIN_LOSS
    from fedtune.task import task_resources

    trained = {}
    for precision in ("fp32", "bf16"):
        config = tiny_config(tmp_path / precision, base=[
            "data.dataset=rotten_tomatoes", "data.max_examples=200", "data.num_clients=2",
            "data.partitioner=iid", f"model.path={tiny_bert_path}", "model.max_length=24",
            f"model.transfer={transfer}", "model.dropout=0", "client.local_steps=4",
            "client.batch_size=8", "client.optimizer=sgd", "client.lr=0.05",
            "engine.backend=inprocess",
            f"client.precision={precision}"])
        resources = task_resources(config)
        start = {k: v.copy() for k, v in shared_state(resources.model).items()}
        one = train_client(resources, 0, 1, RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 1})}),
                           start, RecordDict())
        trained[precision] = (start, {k: v.copy() for k, v in one.arrays.items()},
                              one.metrics[TRAIN_LOSS])
    (start, fp32, fp32_loss), (_, bf16, bf16_loss) = trained["fp32"], trained["bf16"]
    assert fp32.keys() == bf16.keys()
    update32 = np.concatenate([(fp32[k] - start[k]).ravel() for k in fp32])
    update16 = np.concatenate([(bf16[k] - start[k]).ravel() for k in bf16])
    assert all(bf16[k].dtype == np.float32 for k in bf16)  # fp32 weights travel
    distance = np.linalg.norm(update16 - update32) / np.linalg.norm(update32)
    assert 0 < distance < 0.05, distance
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.02)
