"""Train many plain clients at once: ``torch.func`` over stacked copies of the model.

For clients that train the plain local objective (a FedAvg-family client side, no privacy
mode, no injected faults, fp32 on CPU, no gradient clipping) of a model that reads dense
features (the MLP on hashed features, a head on cached pooled features), a chunk of clients'
steps is one batched computation: the model's trainable parameters are stacked, one copy per
client; one ``torch.func.vmap(torch.func.grad_and_value(loss))`` over the stacked copies and
the clients' stacked batches gives every client's own gradient and loss; and one optimizer step
over the stacked tensors is every client's own step (Adam, AdamW and SGD update each element
from that element's gradient and state alone). FedJAX (Ro, Suresh and Wu 2021, "FedJAX:
Federated learning simulation with JAX") trains clients with ``jax.vmap`` the same way; the
stacking is torch.func's model-ensembling recipe (``functional_call`` over stacked weights).

Each client trains on exactly the batches its own loader gives
(``TaskResources.client_train_loader`` with its round seed), as ``fedtune.client.app.
train_client`` would; a client whose batch at a step is smaller than the others' is padded and
the padding is masked out of its loss. The arithmetic is batched, so weights agree with
one-client-at-a-time training to float rounding, not bit for bit. Dropout draws a separate mask
per client (``randomness="different"``) from torch's generator seeded with the chunk's first
client's round seed. What a chunk may hold is fixed by the block and the model's size
(``chunk_sizes``), so every runtime that vectorises gives the same bits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedtune import protocol
from fedtune.client.algorithms import ClientSide
from fedtune.client.app import TrainedClient, client_shard, train_metrics
from fedtune.data.encode import Batch
from fedtune.models.weights import load_shared_state, travelling_tensors
from fedtune.tables.model_kinds import MODEL_KINDS
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.strategies import STRATEGIES
from fedtune.task import TaskResources, client_round_seed, seed_torch
from fedtune.train import (
    TrainResult,
    TrainSettings,
    local_batches,
    make_optimizer,
    reset_optimizer,
)

# the most stacked trainable parameters trained at once (their gradients and the optimizer's
# moments take as much again each); larger chunks stop paying once they leave the caches
CHUNK_BYTES = 16 * 2**20
KEPT_SIZES = 4  # stacked copies (and their optimizers) kept per model, by chunk size
STEPPED_MODULES = (nn.modules.batchnorm._BatchNorm,)  # update buffers in place while training


def vectorisable(resources: TaskResources) -> bool:
    """Whether this run's training clients may be trained together (see the module doc)."""
    config = resources.config
    settings = resources.train_settings
    return (config.engine.vectorise_clients
            and not STRATEGIES[config.strategy.name].client
            and not PRIVACY_MODES[config.privacy.mode].mechanism
            and not resources.faults.active and not resources.attack.active
            and resources.device.type == "cpu"
            and settings.precision == "fp32" and not settings.max_grad_norm
            and (MODEL_KINDS[resources.spec.kind].vectorisable or resources.spec.features)
            and _stackable(resources.model))


def _stackable(model: nn.Module) -> bool:
    """No module steps buffers while training, and every trainable parameter travels (the
    stacked copies are all a client sends back)."""
    travelling = travelling_tensors(model)
    return (not any(isinstance(m, STEPPED_MODULES) for m in model.modules())
            and all(name in travelling
                    for name, p in model.named_parameters() if p.requires_grad))


def chunk_sizes(clients: int, model: nn.Module) -> list[int]:
    """How ``clients`` consecutive clients are cut into chunks trained together: as many as
    ``CHUNK_BYTES`` of stacked parameters hold, in equal-as-possible consecutive chunks."""
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    most = max(1, CHUNK_BYTES // max(size, 1))
    count = -(-clients // most)
    base, extra = divmod(clients, count)
    return [base + (i < extra) for i in range(count)]


def train_chunks(resources: TaskResources, server_round: int, content: RecordDict,
                 global_arrays: dict[str, np.ndarray], clients: Sequence[tuple[int, RecordDict]]
                 ) -> Iterator[list[tuple[TrainedClient, float]]]:
    """Train ``clients`` (client id, Context.state) on their training splits from
    ``global_arrays``, a chunk at a time (``chunk_sizes``); for each chunk, in client order,
    each client's ``TrainedClient`` and its share of the chunk's time. A client's arrays are
    views of the stacked copies, valid until the next chunk trains."""
    first = 0
    for size in chunk_sizes(len(clients), resources.model):
        yield _train_chunk(resources, server_round, content, global_arrays,
                           clients[first:first + size])
        first += size


def _train_chunk(resources: TaskResources, server_round: int, content: RecordDict,
                 global_arrays: dict[str, np.ndarray], clients: Sequence[tuple[int, RecordDict]]
                 ) -> list[tuple[TrainedClient, float]]:
    started = time.perf_counter()
    config = resources.config
    model = resources.model
    load_shared_state(model, global_arrays)
    model.train()
    dispatch = protocol.message_dispatch(content)
    seeds = [client_round_seed(config.run.seed, server_round, client_id, dispatch)
             for client_id, _ in clients]
    shards = [client_shard(config, client_id) for client_id, _ in clients]
    batches = [list(local_batches(resources.client_train_loader(shard, seed),
                             resources.train_settings))
               for shard, seed in zip(shards, seeds, strict=True)]
    seed_torch(seeds[0])  # dropout's masks
    steps = {len(b) for b in batches}
    results: dict[int, tuple[dict[str, np.ndarray], TrainResult]] = {}
    for count in sorted(steps):  # clients with as many steps train together
        members = [i for i, b in enumerate(batches) if len(b) == count]
        trained = _train_group(resources, model, [batches[i] for i in members])
        if len(steps) > 1:  # a later group of as many clients trains in the same stacked copies
            trained = [({name: value.copy() for name, value in arrays.items()}, result)
                       for arrays, result in trained]
        results.update(zip(members, trained, strict=True))
    share = (time.perf_counter() - started) / len(clients)
    out = []
    for i, (client_id, state) in enumerate(clients):
        arrays, result = results[i]
        trained = TrainedClient(arrays=None)
        extra: dict[str, float] = {}
        if result.num_steps:
            side = ClientSide(content, state, global_arrays, resources.train_settings)
            trained.records, extra = side.reply(arrays, result.num_steps)
            trained.arrays = arrays
        trained.metrics = train_metrics(resources, shards[i], client_id,
                                        TrainResult(result.loss, result.num_examples,
                                                    result.num_steps, share), {}, extra)
        out.append((trained, share))
    return out


def _train_group(resources: TaskResources, model: nn.Module, batches: list[list[Batch]]
                 ) -> list[tuple[dict[str, np.ndarray], TrainResult]]:
    """Clients that take the same number of steps, trained together: each one's travelling
    arrays and its training result (duration 0: the caller shares the chunk's time)."""
    travelling = travelling_tensors(model)
    steps = len(batches[0])
    if steps == 0:
        return [({}, TrainResult(float("nan"), 0, 0, 0.0)) for _ in batches]
    clients = len(batches)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    fixed = {name: t for name, t in (*model.named_parameters(), *model.named_buffers())
             if name not in names}
    stacked, optimizer = _stacked_copies(model, names, clients, resources.train_settings)
    with torch.no_grad():  # every client starts from the global weights
        torch._foreach_copy_(stacked, [travelling[name].detach().expand_as(copy)
                                       for name, copy in zip(names, stacked, strict=True)])

    def loss(params: tuple[torch.Tensor, ...], inputs: dict[str, torch.Tensor],
             labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **dict(zip(names, params, strict=True))},
                              args=(), kwargs=inputs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        per_example = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        return (per_example * mask).sum() / mask.sum()

    step = vmap(grad_and_value(loss), randomness="different")
    loss_sums = np.zeros(clients)
    seen = np.zeros(clients, dtype=np.int64)
    for s in range(steps):
        inputs, labels, mask, counts = _stack_step([client[s] for client in batches])
        grads, losses = step(tuple(stacked), inputs, labels, mask)
        for param, gradient in zip(stacked, grads, strict=True):
            param.grad = gradient
        optimizer.step()
        loss_sums += losses.detach().double().numpy() * counts
        seen += counts
    stacked_arrays = dict(zip(names, (p.detach().numpy() for p in stacked), strict=True))
    out = []
    for i in range(clients):
        arrays = {name: stacked_arrays[name][i] if name in stacked_arrays
                  else travelling[name].detach().numpy().copy() for name in travelling}
        out.append((arrays, TrainResult(float(loss_sums[i] / seen[i]), int(seen[i]), steps,
                                        0.0)))
    return out


def _stacked_copies(model: nn.Module, names: list[str], clients: int, settings: TrainSettings
                    ) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """``clients`` stacked copies of the trainable parameters ``names`` and an optimizer over
    them, reset (as new). Kept on the model for the next chunk of as many clients: fresh
    tensors of a chunk's size are zero-filled page by page on first write, which costs more
    than the chunk's optimizer step."""
    kept: dict[int, tuple[list[torch.Tensor], torch.optim.Optimizer]] = model.__dict__.setdefault(
        "_fedtune_stacked", {})
    if clients not in kept:
        if len(kept) >= KEPT_SIZES:
            kept.pop(next(iter(kept)))
        params = dict(model.named_parameters())
        stacked = [params[name].detach().expand(clients, *params[name].shape).clone()
                   for name in names]
        kept[clients] = stacked, make_optimizer(stacked, settings)
    stacked, optimizer = kept[clients]
    return stacked, reset_optimizer(optimizer)


def _stack_step(batches: list[Batch]
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, np.ndarray]:
    """The clients' batches of one step stacked (inputs, labels, mask of real examples,
    examples per client); smaller batches are padded with zeros the mask leaves out."""
    counts = np.array([labels.shape[0] for _, labels in batches])
    width = int(counts.max())
    keys = batches[0][0].keys()
    if (counts == width).all():
        inputs = {key: torch.stack([b[0][key] for b in batches]) for key in keys}
        labels = torch.stack([b[1] for b in batches])
        return inputs, labels, torch.ones(len(batches), width), counts
    inputs = {key: batches[0][0][key].new_zeros((len(batches), width,
                                                 *batches[0][0][key].shape[1:]))
              for key in keys}
    labels = batches[0][1].new_zeros((len(batches), width))
    mask = torch.zeros(len(batches), width)
    for i, (values, target) in enumerate(batches):
        n = int(counts[i])
        for key in keys:
            inputs[key][i, :n] = values[key]
        labels[i, :n] = target
        mask[i, :n] = 1.0
    return inputs, labels, mask, counts

