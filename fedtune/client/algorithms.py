"""The client side of the strategies that have one (``client`` in ``fedtune.tables.strategies``).

==========  ==================================================================================
strategy    the client
==========  ==================================================================================
fedprox     adds ``mu / 2 ||theta - x||^2`` to its objective (``mu``: config ``proximal-mu``)
scaffold    steps along ``g - c_i + c`` (``c``: record ``scaffold-control``); replies
            ``delta c_i``; keeps ``c_i`` in ``context.state``
fednova     reports ``||a_i||_1`` of its local steps (when the config asks: ``fednova``)
feddyn      adds ``alpha / 2 ||theta - x||^2 - <g_k, theta>``; keeps ``g_k`` in
            ``context.state`` (``alpha``: config ``feddyn-alpha``)
==========  ==================================================================================

Per-client state lives in the Flower ``Context.state`` (a RecordDict), so it survives across
rounds in every runtime. The update rules themselves come from ``strategies/``; the extra
terms of the objective are a ``LocalObjective``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedtune.client.objective import LocalObjective
from fedtune.protocol import CONFIG, FEDDYN_STATE, SCAFFOLD_STATE
from fedtune.train import TrainPass, TrainSettings
from strategies import feddyn, fednova, scaffold
from strategies.records import NDArray, floating, to_numpy, to_record, zeros_like

if TYPE_CHECKING:
    from fedtune.privacy.mode import LocalTraining
    from fedtune.task import TaskResources

PROXIMAL_KEY = "proximal-mu"  # what Flower's FedProx sends


# the last sent ArrayRecord decoded (kept with the record, so its identity is not reused): a
# round's clients trained in one process all receive the same one (SCAFFOLD's control variate)
_last_decoded: list[tuple[ArrayRecord, dict[str, NDArray]]] = []


def _decoded(record: ArrayRecord) -> dict[str, NDArray]:
    """``to_numpy(record)``, read-only, decoded once for every client that receives it."""
    if not _last_decoded or _last_decoded[0][0] is not record:
        arrays = to_numpy(record)
        for value in arrays.values():
            value.flags.writeable = False  # shared by the round's clients
        _last_decoded[:] = [(record, arrays)]
    return _last_decoded[0][1]


def parameter_tensors(arrays: dict[str, NDArray], model: nn.Module) -> dict[str, torch.Tensor]:
    """Arrays of the model's trainable parameters, as tensors beside those parameters."""
    return {name: torch.as_tensor(arrays[name]).to(param.device, param.dtype)
            for name, param in model.named_parameters()
            if param.requires_grad and name in arrays}


class ClientSide:
    """What a train message asks of a client beyond plain local training; the base class asks
    nothing. ``content`` is the message, ``state`` the client's Context.state."""

    # a ``client_together`` side whose objective or reply reads or writes ``state``: clients
    # trained together each have their own (``fedtune.client.vectorised``); otherwise one side
    # serves a whole chunk
    own_state = False

    def __init__(self, content: RecordDict, state: RecordDict,
                 global_arrays: dict[str, NDArray], settings: TrainSettings) -> None:
        self.content = content
        self.state = state
        self.global_arrays = global_arrays
        self.settings = settings
        self._stored: dict[str, tuple[ArrayRecord, dict[str, NDArray]]] = {}

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.content[CONFIG]) if CONFIG in self.content else {}

    def stored(self, key: str, like: dict[str, NDArray]) -> dict[str, NDArray]:
        """Per-client arrays kept across rounds (zeros before this client's first round),
        decoded once while ``state[key]`` is the same record (objective and reply both read
        it)."""
        if key not in self.state:
            return zeros_like(like)
        record = self.state[key]
        if key not in self._stored or self._stored[key][0] is not record:
            self._stored[key] = record, to_numpy(record)
        return self._stored[key][1]

    def objective(self, model: nn.Module) -> LocalObjective | None:
        """Extra terms of the local objective (None: plain cross-entropy)."""
        return None

    def train(self, resources: TaskResources, shard: int, seed: int) -> LocalTraining | None:
        """The client's own training of the resident model, which holds the global one
        (None: the privacy mode's plain training with ``objective``)."""
        return None

    def reply(self, local_arrays: dict[str, NDArray], num_steps: int
              ) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
        """Extra reply records and metrics; may update ``state``."""
        return {}, {}

    def personal_part(self, resources: TaskResources) -> list[str]:
        """For clients trained together (``fedtune.client.vectorised``): the travelling
        tensors each client trains from its own values in place of the global ones and keeps
        to itself, in its state under ``protocol.PERSONAL_STATE``, its reply carrying their
        global values (FedPer's head; []: none)."""
        return []

    def together_passes(self, resources: TaskResources) -> list[TrainPass]:
        """For clients trained together: the passes of local training, in order (one of
        everything; FedBABU's and FedRep's fix part of the model, ``TrainPass``)."""
        return [TrainPass()]


class FedProxClient(ClientSide):
    """FedProx (Li et al. 2020): a proximal term keeps the local model near the global one."""

    def objective(self, model: nn.Module) -> LocalObjective | None:
        mu = float(self.config.get(PROXIMAL_KEY, 0.0))
        if not mu:
            return None
        return LocalObjective(quadratic=mu, anchor=parameter_tensors(self.global_arrays, model))


class FedDynClient(ClientSide):
    """FedDyn (Acar et al. 2021): a dynamic regulariser with a per-client gradient state."""

    own_state = True

    def objective(self, model: nn.Module) -> LocalObjective | None:
        alpha = float(self.config.get(feddyn.ALPHA_KEY, 0.0))
        if not alpha:
            return None
        gradient = self.stored(FEDDYN_STATE, floating(self.global_arrays))
        return LocalObjective(quadratic=alpha,
                              anchor=parameter_tensors(self.global_arrays, model),
                              linear=parameter_tensors(gradient, model))

    def reply(self, local_arrays: dict[str, NDArray], num_steps: int
              ) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
        config = self.config
        if feddyn.ALPHA_KEY in config:
            gradient = feddyn.client_gradient_update(
                self.stored(FEDDYN_STATE, floating(self.global_arrays)), local_arrays,
                self.global_arrays, float(config[feddyn.ALPHA_KEY]))
            self.state[FEDDYN_STATE] = to_record(gradient, gradient)
        return {}, {}


class ScaffoldClient(ClientSide):
    """SCAFFOLD (Karimireddy et al. 2020): control variates correct the client's drift."""

    own_state = True

    def _server_control(self) -> dict[str, NDArray] | None:
        if scaffold.CONTROL_KEY not in self.content:
            return None
        return _decoded(self.content[scaffold.CONTROL_KEY])

    def objective(self, model: nn.Module) -> LocalObjective | None:
        server = self._server_control()
        if server is None:
            return None
        client = self.stored(SCAFFOLD_STATE, server)
        return LocalObjective(shift=parameter_tensors(
            {name: server[name] - client[name] for name in server}, model))

    def reply(self, local_arrays: dict[str, NDArray], num_steps: int
              ) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
        server = self._server_control()
        if server is None:
            return {}, {}
        client, delta = scaffold.client_control_update(
            self.stored(SCAFFOLD_STATE, server), server, self.global_arrays, local_arrays,
            num_steps, self.settings.lr)
        self.state[SCAFFOLD_STATE] = to_record(client, client)
        return {scaffold.CONTROL_DELTA_KEY: to_record(delta, delta)}, {}


class FedNovaClient(ClientSide):
    """FedNova (Wang et al. 2020): reports how far its local steps reach, ``||a_i||_1``."""

    def reply(self, local_arrays: dict[str, NDArray], num_steps: int
              ) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
        if not self.config.get(fednova.REQUEST_KEY):
            return {}, {}
        return {}, {fednova.NORMALIZER_KEY: fednova.local_normalizer(num_steps,
                                                                     self.settings.momentum)}
