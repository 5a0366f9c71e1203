"""The weights that travel between server and clients, as named numpy arrays.

``shared_state`` holds what travels: the trainable parameters and the declared shared buffers
(``fedtune.models.transfer.travelling_names``). With full fine-tuning that is every parameter;
frozen, top-k and LoRA modes narrow it to what trains.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedtune.models.transfer import travelling_names


def travelling_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The travelling tensors by name. Walking a model's modules costs more than a small
    client's step, so the result is kept on the model: what trains is fixed when the model is
    built (``fedtune.models.transfer.apply_transfer``) and never changes afterwards."""
    travelling = model.__dict__.get("_fedtune_travelling")
    if travelling is None:
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        travelling = {name: tensors[name] for name in travelling_names(model)}
        model.__dict__["_fedtune_travelling"] = travelling
    return travelling


def shared_state(model: nn.Module, copy: bool = True) -> dict[str, np.ndarray]:
    """The tensors that travel (``travelling_names``), as CPU numpy arrays: copies, or with
    ``copy=False`` views of a CPU model's own tensors (valid until the model changes)."""
    tensors = travelling_tensors(model).items()
    if copy:
        return {name: t.detach().cpu().numpy().copy() for name, t in tensors}
    return {name: t.detach().cpu().numpy() for name, t in tensors}


def load_shared_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite the travelling tensors in place; names and shapes must match exactly."""
    own = travelling_tensors(model)
    if own.keys() != arrays.keys():
        missing = sorted(set(own) - set(arrays))
        unexpected = sorted(set(arrays) - set(own))
        raise ValueError(f"weights do not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    values = [torch.from_numpy(np.asarray(arrays[name])) for name in own]
    for (name, tensor), value in zip(own.items(), values, strict=True):
        if value.shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(tensor.shape)}")
    with torch.no_grad():
        torch._foreach_copy_(list(own.values()), values)
