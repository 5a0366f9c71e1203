"""Models: weight exchange, save/load through safetensors, mean pooling ignores padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.config import load_config
from fedtune.data.encode import DenseFeatures
from fedtune.models.build import (
    build_model,
    load_saved_model,
    model_spec,
    save_model,
)
from fedtune.models.weights import load_shared_state, shared_state
from fedtune.train import logits_of


def _mlp_spec():
    config = load_config(None, ["model.kind=mlp", "model.hidden_sizes=[16, 8]",
                                "data.dataset=digits"])
    return model_spec(config, ("a", "b", "c"), DenseFeatures(np.zeros((1, 12), np.float32)))


def test_mlp_shared_state_round_trip_is_exact():
    spec = _mlp_spec()
    source, target = build_model(spec, seed=1).eval(), build_model(spec, seed=2).eval()
    x = torch.randn(5, 12)
    assert not torch.equal(source(x), target(x))
    load_shared_state(target, shared_state(source))
    assert torch.equal(source(x), target(x))


def test_load_shared_state_rejects_wrong_names_and_shapes():
    model = build_model(_mlp_spec(), seed=0)
    state = shared_state(model)
    with pytest.raises(ValueError, match="missing"):
        load_shared_state(model, {k: v for k, v in state.items() if "classifier" not in k})
    state["classifier.bias"] = np.zeros(7, dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        load_shared_state(model, state)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_model_round_trips_through_safetensors(tmp_path, tiny_bert_path, pooling):
    config = load_config(None, [f"model.path={tiny_bert_path}", f"model.pooling={pooling}"])
    spec = model_spec(config, ("neg", "pos"), None)
    model = build_model(spec, seed=0).eval()
    save_model(model, spec, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    loaded, loaded_spec = load_saved_model(tmp_path / "model")
    assert loaded_spec == spec
    inputs = {"input_ids": torch.randint(1000, 2000, (3, 9)),
              "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, inputs), logits_of(loaded, inputs))


def test_mlp_round_trips_through_safetensors(tmp_path):
    spec = _mlp_spec()
    model = build_model(spec, seed=3).eval()
    save_model(model, spec, tmp_path / "m")
    loaded, _ = load_saved_model(tmp_path / "m")
    x = torch.randn(4, 12)
    assert torch.equal(model(x), loaded(x))


def test_mean_pooling_ignores_padding(tiny_bert_path):
    config = load_config(None, [f"model.path={tiny_bert_path}", "model.pooling=mean"])
    model = build_model(model_spec(config, ("a", "b"), None), seed=0).eval()
    ids = torch.tensor([[101, 2204, 3185, 102]])
    padded = torch.tensor([[101, 2204, 3185, 102, 0, 0, 0]])
    with torch.no_grad():
        short = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        long = model(input_ids=padded, attention_mask=(padded != 0).long())
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


def test_default_model_is_minilm_with_mean_pooling():
    spec = model_spec(load_config(), ("fresh", "rotten"), None)
    assert spec.pooling == "mean"
    assert spec.path.endswith("model")
    model = build_model(spec, seed=0)
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
