"""A saved Hugging Face model loads with transformers' own loaders and predicts what fedtune's
loader predicts: the trained weights, not a fresh head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.config import load_config
from fedtune.models.build import build_model, load_saved_model, model_spec, save_model
from fedtune.models.hf import HFKind
from fedtune.train import logits_of

SENTENCES = ["a warm, funny and beautifully acted film",
             "dull, lifeless and far too long",
             "the plot is thin but the actors carry it with charm and energy to spare"]
LABELS = ("rotten", "fresh")


def _trained_copy(tiny_bert_path: str, pooling: str, folder):
    """A model of ``pooling`` whose every weight moved away from what any loader could
    initialise on its own, saved by fedtune into ``folder``."""
    config = load_config(None, [f"model.path={tiny_bert_path}", f"model.pooling={pooling}",
                                "model.max_length=32"])
    spec = model_spec(config, LABELS, None)
    model = build_model(spec, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    save_model(model, spec, folder)
    return spec


def _fedtune_logits(folder, texts):
    model, spec = load_saved_model(folder)
    inputs = HFKind().encode_texts(folder, spec, texts)
    with torch.no_grad():
        return logits_of(model, inputs)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_transformers_from_pretrained_and_pipeline_give_fedtune_predictions(
        tmp_path, tiny_bert_path, pooling):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    _trained_copy(tiny_bert_path, pooling, tmp_path)
    remote = pooling == "mean"  # a head transformers does not have: its code is in the folder
    ours = _fedtune_logits(tmp_path, SENTENCES)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path,
                                                               trust_remote_code=remote)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=32,
                      return_tensors="pt")
    with torch.no_grad():
        theirs = model.eval()(**batch).logits
    np.testing.assert_allclose(theirs.numpy(), ours.numpy(), rtol=1e-4, atol=1e-5)
    assert model.config.id2label == {0: "rotten", 1: "fresh"}

    classify = pipeline("text-classification", model=str(tmp_path), trust_remote_code=remote,
                        top_k=None)
    probabilities = torch.softmax(ours, dim=-1).numpy()
    for sentence_scores, expected in zip(classify(SENTENCES), probabilities, strict=True):
        scores = {entry["label"]: entry["score"] for entry in sentence_scores}
        np.testing.assert_allclose([scores["rotten"], scores["fresh"]], expected, rtol=1e-4)


def test_mean_pooling_model_is_never_loaded_silently_into_the_wrong_head(tmp_path,
                                                                         tiny_bert_path):
    from transformers import AutoModelForSequenceClassification

    _trained_copy(tiny_bert_path, "mean", tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=False)
