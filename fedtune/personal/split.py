"""What is shared and what stays personal: a model's head and body, from its transfer mode.

The **body** is what the model kind calls its encoder (``base_model``: a transformer's encoder,
the MLP's hidden layers); the **head** is every travelling tensor outside it (the classifier).
What travels at all is the transfer mode's (``fedtune.models.transfer``): with ``frozen`` the
body's travelling part is empty, with ``top_k`` it is the top layers, with ``lora`` it is the
adapters (so a LoRA model's "body" is its adapters and its "head" the classifier).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from fedtune.models.transfer import encoder_of
from fedtune.models.weights import travelling_tensors


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model under peft's adapters (peft keeps the original classifier inside)."""
    peft = sys.modules.get("peft")  # a model with adapters was built by peft, so it is loaded
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def head_names(model: nn.Module) -> list[str]:
    """The travelling tensors outside the model's encoder: its head (kept on the model, as
    ``travelling_tensors`` is: what trains never changes after the model is built)."""
    names = model.__dict__.get("_fedtune_head")
    if names is None:
        encoder = encoder_of(_unwrapped(model))
        inside = {id(t) for t in encoder.parameters()} | {id(t) for t in encoder.buffers()}
        names = [name for name, tensor in travelling_tensors(model).items()
                 if id(tensor) not in inside]
        model.__dict__["_fedtune_head"] = names
    return list(names)


def body_names(model: nn.Module) -> list[str]:
    """The travelling tensors inside the encoder: what a shared-body algorithm shares."""
    head = set(head_names(model))
    return [name for name in travelling_tensors(model) if name not in head]


def lora_names(model: nn.Module, matrix: str) -> list[str]:
    """The travelling LoRA ``A`` or ``B`` matrices (peft names them ``...lora_A.<adapter>...``)."""
    return [name for name in travelling_tensors(model) if f".lora_{matrix}." in name]


def part_names(model: nn.Module, part: str) -> list[str]:
    """``head``, ``body``, ``lora_A``, ``lora_B`` or ``full`` (every travelling tensor)."""
    if part == "head":
        return head_names(model)
    if part == "body":
        return body_names(model)
    if part in ("lora_A", "lora_B"):
        return lora_names(model, part[-1])
    return list(travelling_tensors(model))


def kept_names(model: Callable[[], nn.Module], personal_part: str, shared_part: str
               ) -> list[str]:
    """The travelling tensors a client keeps to itself, so that its reply carries them exactly
    as they were sent (a strategy entry's ``personal_part``; none where it keeps nothing, or
    where its personal part is a whole model beside the global one it trains and shares:
    Ditto, APFL). ``model`` gives the run's model, asked for only where there is a part."""
    if not personal_part or personal_part == shared_part:
        return []
    return part_names(model(), personal_part)
