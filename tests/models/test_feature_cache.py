"""Frozen-feature fast path: the frozen encoder's pooled output computed once per text and
cached on disk; the head trains on it with the same results as the token path, and the saved
model is still the whole classifier, predicting on text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedtune.data.encode import PooledFeatures, cached_pooled_features, tokenize
from fedtune.data.sources import build_text_data
from fedtune.engine.inprocess import run_inprocess
from fedtune.models.build import build_model, load_saved_model
from fedtune.models.hf import PooledFeatureHead
from fedtune.task import task_resources
from fedtune.train import logits_of
from tests.conftest import rows_of, tiny_config


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random BERT without dropout: the token path then computes exactly what the
    feature path computes (with dropout, the token path also drops inside the frozen
    encoder while training)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedtune.models.hf import default_model_path

    folder = tmp_path_factory.mktemp("bert-no-dropout")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory):
    """One feature cache for the module's runs (the pooled features of the 12.7k Rotten
    Tomatoes texts are computed once per pooling)."""
    folder = tmp_path_factory.mktemp("feature-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDTUNE_CACHE", str(folder))
        yield folder


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _config(tmp_path, model_path, name, *overrides):
    return tiny_config(tmp_path, *overrides, base=[
        "data.dataset=rotten_tomatoes", "data.max_examples=240", "data.num_clients=3",
        "data.partitioner=natural", f"model.path={model_path}", "model.max_length=24",
        "model.transfer=frozen", "model.dropout=0", "run.rounds=3", "client.local_steps=3",
        "client.batch_size=8", "client.lr=0.02", "engine.backend=inprocess",
        "strategy.fraction_train=1.0", "strategy.fraction_evaluate=1.0",
        f"run.dir={tmp_path / name}",
    ])


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_the_feature_path_trains_what_the_token_path_trains(tmp_path, module_cache,
                                                          bert_without_dropout, pooling):
    slow = run_inprocess(_config(tmp_path, bert_without_dropout, "slow", "model.feature_cache="
                                 "false", f"model.pooling={pooling}")).path
    fast_config = _config(tmp_path, bert_without_dropout, "fast", f"model.pooling={pooling}")
    fast = run_inprocess(fast_config).path
    assert isinstance(task_resources(fast_config).encoded, PooledFeatures)
    assert isinstance(task_resources(fast_config).model, PooledFeatureHead)
    for slow_row, fast_row in zip(rows_of(slow / "metrics.csv"), rows_of(fast / "metrics.csv"),
                                  strict=True):
        for column in ("train_loss", "eval_loss", "eval_accuracy", "federated_eval_loss",
                       "bytes_up", "bytes_down"):
            assert float(fast_row[column]) == pytest.approx(float(slow_row[column]), rel=1e-4)
    slow_model = load_file(str(slow / "model" / "model.safetensors"))
    fast_model = load_file(str(fast / "model" / "model.safetensors"))
    assert slow_model.keys() == fast_model.keys() and len(fast_model) > 20  # the whole model
    for name, value in slow_model.items():
        torch.testing.assert_close(fast_model[name], value, atol=2e-5, rtol=1e-4)
    start = build_model(task_resources(fast_config).spec, 0)
    assert not torch.allclose(fast_model["classifier.weight"], start.classifier.weight)


def test_the_saved_model_of_the_feature_path_predicts_on_text(tmp_path, module_cache,
                                                            bert_without_dropout):
    config = _config(tmp_path, bert_without_dropout, "fast", "run.rounds=1")
    run_dir = run_inprocess(config).path
    resources = task_resources(config)
    whole, spec = load_saved_model(run_dir / "model")
    assert spec.features and not isinstance(whole, PooledFeatureHead)
    rows = resources.federation.test_rows[:16]
    tokens = tokenize(resources.federation.data, resources.spec.path, 24)
    head = resources.model.eval()
    with torch.no_grad():
        from_text = logits_of(whole.eval(), tokens.pad(rows))
        from_features = head(torch.from_numpy(resources.encoded.values[rows]))
    torch.testing.assert_close(from_text, from_features, atol=1e-4, rtol=1e-4)


def test_pooled_features_are_computed_once_and_keyed_by_max_length_and_pooling(own_cache):
    data = build_text_data("tiny", ["a b", "c d e", "f"], ["x", "y", "x"])
    tokens = tokenize(data, _minilm_tokenizer(), 8)
    calls = []

    def compute(width: int):
        def run():
            calls.append(width)
            return np.arange(3 * width, dtype=np.float32).reshape(3, width)
        return run

    first = cached_pooled_features(data, tokens, _minilm_tokenizer(), 8, "mean", compute(4))
    again = cached_pooled_features(data, tokens, _minilm_tokenizer(), 8, "mean", compute(4))
    assert calls == [4] and np.array_equal(first.values, again.values)
    assert first.lengths.tolist() == [4, 5, 3]  # [CLS] ... [SEP] token counts
    cached_pooled_features(data, tokens, _minilm_tokenizer(), 8, "cls", compute(5))
    cached_pooled_features(data, tokens, _minilm_tokenizer(), 16, "mean", compute(6))
    assert calls == [4, 5, 6]
    assert len(list((own_cache / "features").glob("*.npy"))) == 3


def _minilm_tokenizer() -> str:
    from fedtune.models.hf import default_model_path

    return default_model_path()


def test_a_head_that_is_not_linear_over_the_pooled_output_is_refused(tmp_path, own_cache):
    """RoBERTa's classification head is dense + tanh + projection on the first token."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    from fedtune.config import ConfigError
    from fedtune.models.hf import default_model_path

    folder = tmp_path / "roberta"
    RobertaModel(RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=64, pad_token_id=0)
                 ).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(str(folder))
    config = _config(tmp_path, str(folder), "roberta", "model.pooling=cls")
    with pytest.raises(ConfigError, match="model.feature_cache = true is not allowed for a "
                                          "RobertaForSequenceClassification"):
        task_resources(config)
