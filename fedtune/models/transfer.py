"""Transfer modes (what trains) and the tensors that travel between server and clients.

A mode only ever *freezes* parameters of a built model (``requires_grad = False``) or, for LoRA,
wraps it with peft adapters; what trains afterwards is exactly the parameters with
``requires_grad``. Those, plus the buffers ``shared_buffer_names`` declares, are what a client
receives and returns (``travelling_names``); the frozen rest is built locally from the same
pretrained files (or the same seed) in every process and never sent.

- ``scratch``: the architecture with random weights, everything trains.
- ``full``: pretrained weights, everything trains.
- ``frozen``: the encoder (the model's ``base_model``) is frozen, the head on top of it trains
  (feature extraction; Devlin et al. 2019, sec. 5.3).
- ``top_k``: the last k encoder layers, everything the encoder computes after them, and the head
  train; embeddings and earlier layers are frozen (Howard & Ruder 2018 tune top layers first).
- ``lora``: low-rank adapters on the named linear layers plus the head train; the encoder's
  weights are frozen (Hu et al. 2022, "LoRA"), via peft.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from fedtune.errors import ConfigError

FREEZING_MODES = ("frozen", "top_k", "lora")


@dataclass(frozen=True)
class TransferSpec:
    """The transfer mode and its settings (``model.transfer``, ``model.top_k_layers``, ...)."""

    mode: str = "full"
    top_k_layers: int = 2
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("query", "value")

    @property
    def pretrained(self) -> bool:
        """Whether the encoder starts from the pretrained weights (every mode but scratch)."""
        return self.mode != "scratch"


def encoder_of(model: nn.Module) -> nn.Module:
    """The pretrained encoder inside a classifier: its ``base_model`` (transformers' name, e.g.
    ``bert`` of ``BertForSequenceClassification``; the ``encoder`` of fedtune's mean-pooling
    model)."""
    encoder = getattr(model, "base_model", None)
    if not isinstance(encoder, nn.Module) or encoder is model:
        raise ConfigError(
            f"model.transfer is not allowed to freeze a {type(model).__name__}: it has no "
            "separate encoder (base_model); must be 'scratch' or 'full'"
        )
    return encoder


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer blocks: its largest ``nn.ModuleList`` by parameters
    (``encoder.layer`` in BERT, ``transformer.layer`` in DistilBERT, ``h`` in GPT-2)."""
    stacks = [m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        raise ConfigError(
            f"model.transfer = 'top_k' is not allowed for a {type(encoder).__name__}: no list "
            "of encoder layers found; must be 'scratch', 'full', 'frozen' or 'lora'"
        )
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))


def _freeze_below_top_layers(encoder: nn.Module, k: int) -> None:
    """Freeze the encoder's parameters that come before its last ``k`` layers (in registration
    order: embeddings, then the first layers); the last layers and what follows them train."""
    layers = encoder_layers(encoder)
    if k > len(layers):
        raise ConfigError(
            f"model.top_k_layers = {k} is not allowed: must be <= {len(layers)}, the number of "
            "encoder layers of this model"
        )
    first_trained = {id(p) for p in layers[len(layers) - k].parameters()}
    for parameter in encoder.parameters():
        if id(parameter) in first_trained:
            return
        parameter.requires_grad_(False)


def _add_lora(model: nn.Module, spec: TransferSpec) -> nn.Module:
    """Wrap with peft LoRA adapters on ``spec.lora_targets``; the head stays trainable."""
    from peft import LoraConfig, get_peft_model

    in_encoder = {id(p) for p in encoder_of(model).parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in in_encoder]
    config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha,
                        lora_dropout=spec.lora_dropout, target_modules=list(spec.lora_targets))
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(
            f"model.lora_targets = {','.join(spec.lora_targets)!r} is not allowed: must name "
            f"linear layers of this model ({str(err).splitlines()[0]})"
        ) from None
    for parameter in head:  # peft froze everything but the adapters
        parameter.requires_grad_(True)
    return wrapped


def apply_transfer(model: nn.Module, spec: TransferSpec) -> nn.Module:
    """Freeze (or wrap) ``model`` for ``spec.mode``; returns the model to train."""
    if spec.mode in ("scratch", "full"):
        return model
    if spec.mode == "lora":
        return _add_lora(model, spec)
    encoder = encoder_of(model)
    if spec.mode == "frozen":
        encoder.requires_grad_(False)
    else:
        _freeze_below_top_layers(encoder, spec.top_k_layers)
    return model


def shared_buffer_names(model: nn.Module) -> list[str]:
    """Buffers that travel with the trainable parameters: the running mean and variance of
    batch-norm layers, which training changes in every mode. (Their step counter stays local;
    transformers' position-id buffers are constants and stay local too.)"""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            names += [f"{prefix}.running_mean", f"{prefix}.running_var"]
    return names


def travelling_names(model: nn.Module) -> list[str]:
    """Exactly what a client receives and returns: the parameters with ``requires_grad`` and the
    buffers of ``shared_buffer_names``, in the model's order."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return trainable + shared_buffer_names(model)


def plain_model(model: nn.Module) -> nn.Module:
    """The model without adapters: a LoRA model's merged copy (W + (alpha/r)·B·A), else itself.
    The resident adapter model is left as it is."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model
