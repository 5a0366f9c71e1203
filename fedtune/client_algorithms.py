"""The client side of each strategy, switched on by what the strategy sends in a train message.

============================  ===============================================================
the strategy sends            the client
============================  ===============================================================
config ``proximal-mu``        FedProx: adds ``mu / 2 ||theta - x||^2`` to its objective
record ``scaffold-control``   SCAFFOLD: steps along ``g - c_i + c``; replies ``delta c_i``;
                              keeps ``c_i`` in ``context.state``
config ``fednova``            FedNova: reports ``||a_i||_1`` of its local steps
config ``feddyn-alpha``       FedDyn: adds ``alpha / 2 ||theta - x||^2 - <g_k, theta>``; keeps
                              ``g_k`` in ``context.state``
============================  ===============================================================

Per-client state lives in the Flower ``Context.state`` (a RecordDict), so it survives across
rounds in every runtime. The update rules themselves come from ``strategies/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedtune.objective import LocalObjective
from fedtune.train import TrainSettings
from strategies import feddyn, fednova, scaffold
from strategies.records import NDArray, floating, to_numpy, to_record, zeros_like

PROXIMAL_KEY = "proximal-mu"  # Flower's FedProx
SCAFFOLD_STATE = "scaffold-client-control"
FEDDYN_STATE = "feddyn-gradient"


def _tensors(arrays: dict[str, NDArray], model: nn.Module) -> dict[str, torch.Tensor]:
    """Arrays of the model's trainable parameters, as tensors beside those parameters."""
    return {name: torch.as_tensor(arrays[name]).to(param.device, param.dtype)
            for name, param in model.named_parameters()
            if param.requires_grad and name in arrays}


@dataclass
class ClientAlgorithm:
    """What one train message asks of this client beyond plain local training."""

    content: RecordDict
    state: RecordDict
    global_arrays: dict[str, NDArray]
    settings: TrainSettings

    @property
    def _config(self) -> dict:
        return dict(self.content["config"]) if "config" in self.content else {}

    def _stored(self, key: str, like: dict[str, NDArray]) -> dict[str, NDArray]:
        """Per-client arrays kept across rounds (zeros before this client's first round)."""
        return to_numpy(self.state[key]) if key in self.state else zeros_like(like)

    def objective(self, model: nn.Module) -> LocalObjective | None:
        config = self._config
        mu = float(config.get(PROXIMAL_KEY, 0.0))
        alpha = float(config.get(feddyn.ALPHA_KEY, 0.0))
        if mu and alpha:
            raise ValueError(f"a train message asked for both '{PROXIMAL_KEY}' and "
                             f"'{feddyn.ALPHA_KEY}'")
        objective = LocalObjective()
        if mu or alpha:
            objective.quadratic = mu or alpha
            objective.anchor = _tensors(self.global_arrays, model)
        if alpha:
            gradient = self._stored(FEDDYN_STATE, floating(self.global_arrays))
            objective.linear = _tensors(gradient, model)
        if scaffold.CONTROL_KEY in self.content:
            server = to_numpy(self.content[scaffold.CONTROL_KEY])
            client = self._stored(SCAFFOLD_STATE, server)
            objective.shift = _tensors({name: server[name] - client[name] for name in server},
                                       model)
        if not (objective.quadratic or objective.shift):
            return None
        return objective

    def reply(self, local_arrays: dict[str, NDArray], num_steps: int
              ) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
        """Extra reply records and metrics; updates this client's state in ``context.state``."""
        records: dict[str, ArrayRecord] = {}
        metrics: dict[str, float] = {}
        config = self._config
        if scaffold.CONTROL_KEY in self.content:
            server = to_numpy(self.content[scaffold.CONTROL_KEY])
            client, delta = scaffold.client_control_update(
                self._stored(SCAFFOLD_STATE, server), server, self.global_arrays, local_arrays,
                num_steps, self.settings.lr)
            self.state[SCAFFOLD_STATE] = to_record(client, client)
            records[scaffold.CONTROL_DELTA_KEY] = to_record(delta, delta)
        if feddyn.ALPHA_KEY in config:
            gradient = feddyn.client_gradient_update(
                self._stored(FEDDYN_STATE, floating(self.global_arrays)), local_arrays,
                self.global_arrays, float(config[feddyn.ALPHA_KEY]))
            self.state[FEDDYN_STATE] = to_record(gradient, gradient)
        if config.get(fednova.REQUEST_KEY):
            metrics[fednova.NORMALIZER_KEY] = fednova.local_normalizer(num_steps,
                                                                       self.settings.momentum)
        return records, metrics

