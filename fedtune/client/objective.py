"""What a federated algorithm adds to a client's local objective, as plain tensors (no Flower).

Local training minimises ``f_i(theta)`` plus

    quadratic / 2 * ||theta - anchor||^2 - <linear, theta>

and steps along the gradient of that plus a constant ``shift``. This one form covers

- FedProx (Li et al. 2020): ``quadratic = mu``, ``anchor`` = the global model;
- FedDyn (Acar et al. 2021): ``quadratic = alpha``, ``anchor`` = the global model,
  ``linear`` = the client's gradient state ``g_k``;
- SCAFFOLD (Karimireddy et al. 2020): ``shift = c - c_i`` (server minus client control variate).

The extra terms are added to the gradients after ``backward`` (their gradients are known in
closed form, so no autograd graph is built over every parameter at each step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LocalObjective:
    """Extra terms of the local objective, keyed by parameter name (``model.named_parameters``)."""

    quadratic: float = 0.0
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)
    linear: dict[str, torch.Tensor] = field(default_factory=dict)
    shift: dict[str, torch.Tensor] = field(default_factory=dict)

    def adjust_gradients(self, model: nn.Module) -> None:
        """Add the gradient of the extra terms to every parameter's ``.grad``."""
        for name, param in model.named_parameters():
            if param.grad is not None:
                self.adjust_gradient(name, param)

    @torch.no_grad()
    def adjust_gradient(self, name: str, param: torch.Tensor) -> None:
        """Add the extra terms' gradient to ``param.grad``: the proximal pull towards the
        anchor, minus the linear term, plus the shift, in that order. ``param`` may be a stack
        of clients' copies; the round's tensors broadcast over them."""
        if self.quadratic and name in self.anchor:
            param.grad.add_(param - self.anchor[name], alpha=self.quadratic)
        if name in self.linear:
            param.grad.sub_(self.linear[name])
        if name in self.shift:
            param.grad.add_(self.shift[name])
