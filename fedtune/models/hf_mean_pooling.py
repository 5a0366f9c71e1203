"""A Hugging Face encoder with masked mean pooling and a linear head, as a transformers model.

fedtune trains sentence-transformers encoders (all-MiniLM-L6-v2, the default) with the pooling
they were trained with: the mean of the token vectors under the attention mask (Reimers &
Gurevych 2019), then dropout and a linear head. No class in transformers has that head on a
BERT-family encoder (``BertForSequenceClassification`` classifies the [CLS] pooler, which
these models never trained), so ``AutoModelForSequenceClassification`` alone would load the
saved weights into the wrong head. A saved model therefore carries this file beside its
weights, named in its config.json's ``auto_map``: transformers' own mechanism for an
architecture it lacks. Then, offline::

    AutoModelForSequenceClassification.from_pretrained(run_dir / "model", trust_remote_code=True)
    pipeline("text-classification", model=str(run_dir / "model"), trust_remote_code=True)

give the trained model. The file imports only torch and transformers (never fedtune), so the
folder works without fedtune installed; fedtune's own ``MeanPoolingClassifier`` pools with the
same ``masked_mean``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "fedtune_mean_pooling"


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the token vectors ``hidden`` (batch, tokens, dim) where the mask is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MeanPoolingConfig(PretrainedConfig):
    """``encoder``: the encoder's own config as a dict (its ``model_type`` included);
    ``classifier_dropout``: the dropout before the head."""

    model_type = MODEL_TYPE

    def __init__(self, encoder: dict[str, Any] | None = None, classifier_dropout: float = 0.1,
                 **kwargs: Any) -> None:
        self.encoder = dict(encoder or {})
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        """The encoder's config as its own transformers class."""
        values = dict(self.encoder)
        return AutoConfig.for_model(values.pop("model_type"), **values)


class MeanPoolingForSequenceClassification(PreTrainedModel):
    """Encoder -> masked mean of the token vectors -> dropout -> linear head."""

    config_class = MeanPoolingConfig
    base_model_prefix = "encoder"

    def __init__(self, config: MeanPoolingConfig) -> None:
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder_config())
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(self.encoder.config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the saved file; a head missing there starts as in torch."""
        if isinstance(module, nn.Linear) and module is self.classifier:
            module.reset_parameters()

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **encoder_inputs: Any
                ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder_inputs.pop("return_dict", None)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              **encoder_inputs).last_hidden_state
        logits = self.classifier(self.dropout(masked_mean(hidden, attention_mask)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
