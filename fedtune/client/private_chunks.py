"""Local DP-SGD clients trained together: ``privacy.mode = "local"`` for a chunk of clients at
once, where ``fedtune.client.vectorised`` trains plain clients together (the MLP, a head on
cached features; fp32 on CPU).

Each client runs DP-SGD (Abadi et al. 2016) exactly as its one-at-a-time Opacus path
(``fedtune.privacy.dp_sgd.train_private``) plans it, from its accountant history in its state:
the same accounted Poisson rate, noise multiplier, wanted and allowed steps, stop reason and
expected batch size (``plan_steps``, the one rule both paths and the server follow). Clients
whose budgets allow as many steps train together as a group, each for exactly its allowed steps
(a client with fewer never moves after its last one, its optimizer state with it); a client
whose budget allows none sends no update, with the same reason. Every step of a group:

1. one ``SecureRandom`` call draws the Poisson samples of all the group's steps and clients
   (``fedtune.privacy.stacked_dp_sgd.poisson_flips``); the samples are padded to a common
   width with a mask (an empty sample takes a masked example: its client gets noise only);
2. per-example gradients of every sampled example of every client by a nested
   ``torch.func.vmap`` (clients x examples) of ``grad_and_value`` of one example's loss -
   torch.func's per-sample-gradients recipe - over the clients' stacked weights;
3. each example's gradient clipped (Opacus' flat clipping), summed per client, noised from one
   ``SecureRandom`` call for the group and divided by each client's expected batch size
   (``clipped_sums``, ``noised_means``);
4. one optimizer step over the stack (every client's own AdamW/Adam/SGD step).

Each client's reply carries what the Opacus path's carries (noise multiplier, sample rate, ε
where finite; the stop reason as its status) and its new history goes into its state under
``protocol.ACCOUNTANT_STATE``. The draws are secret, so nothing here repeats bit for bit;
``privacy.insecure_reproducible_noise`` keeps clients on the Opacus path
(``private_one_at_a_time_because``). Dropout draws each example's masks as the Opacus path
does (``fedtune.client.dropout_masks``: a generator seeded with the client's round seed, as
its default generator is there, a DataLoader base seed drawn at each pass over its Poisson
batches), so given the same Poisson samples and noise both paths train the same weights
(tests/privacy/test_private_chunks.py); dropout is not secret on either path, nor need it be
(DP-SGD's guarantee holds whatever data-independent randomness the model uses).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedtune import protocol
from fedtune.client.app import TrainedClient, client_shard, train_metrics
from fedtune.client.dropout_masks import ClientMasks
from fedtune.client.vectorised import (
    TrainedChunk,
    even_chunks,
    into_chunk,
    stacked_arrays,
    stacked_copies,
)
from fedtune.data.encode import Encoded
from fedtune.models.weights import load_shared_state, travelling_tensors
from fedtune.privacy.accounting import epsilon, history_from_lists, history_to_lists
from fedtune.privacy.dp_sgd import StepPlan, plan_steps, poisson_steps
from fedtune.privacy.local import local_dp_settings
from fedtune.privacy.stacked_dp_sgd import clipped_sums, noised_means, poisson_flips
from fedtune.state.codec import state_from_bytes, state_to_bytes
from fedtune.task import TaskResources, client_round_seeds
from fedtune.train import TrainResult

# the most per-example gradients a chunk holds at once (a client's: its stacked copy, gradient
# and optimizer moments, and one gradient per example of an average batch)
PRIVATE_CHUNK_BYTES = 64 * 2**20


def private_chunk_sizes(clients: int, resources: TaskResources) -> list[int]:
    """How ``clients`` consecutive DP clients are cut into chunks trained together: as many as
    ``PRIVATE_CHUNK_BYTES`` of their per-example gradients hold (``batch_size`` examples and
    four copies of the trainable parameters each), in equal-as-possible consecutive chunks."""
    size = sum(p.numel() * p.element_size() for p in resources.model.parameters()
               if p.requires_grad)
    per_client = max(size, 1) * (resources.config.client.batch_size + 4)
    return even_chunks(clients, max(1, PRIVATE_CHUNK_BYTES // per_client))


def train_private_chunks(resources: TaskResources, server_round: int, content: RecordDict,
                         global_arrays: dict[str, np.ndarray], client_ids: Sequence[int],
                         states: Sequence[bytes] | None = None,
                         seeds: Sequence[int] | None = None,
                         keep_stacks: bool = False) -> Iterator[TrainedChunk]:
    """``fedtune.client.vectorised.train_chunks`` under local DP: the clients ``client_ids``
    (``states``: their Context.states as bytes, which hold their accountant histories;
    ``seeds``: their round seeds, which seed dropout alone) trained a chunk at a time
    (``private_chunk_sizes``); each chunk's ``states`` carry the new histories;
    ``keep_stacks`` as there."""
    first = 0
    for size in private_chunk_sizes(len(client_ids), resources):
        yield _train_private_chunk(
            resources, server_round, content, global_arrays, client_ids[first:first + size],
            [b""] * size if states is None else states[first:first + size],
            None if seeds is None else seeds[first:first + size], keep_stacks)
        first += size


def _train_private_chunk(resources: TaskResources, server_round: int, content: RecordDict,
                         global_arrays: dict[str, np.ndarray], ids: Sequence[int],
                         states: Sequence[bytes], seeds: Sequence[int] | None,
                         keep_stacks: bool) -> TrainedChunk:
    started = time.perf_counter()
    config = resources.config
    model = resources.model
    load_shared_state(model, global_arrays)
    model.train()
    dp = local_dp_settings(config)
    if seeds is None:
        seeds = client_round_seeds(config.run.seed, server_round, ids,
                                   protocol.message_dispatch(content))
    shards = [client_shard(config, client_id) for client_id in ids]
    rows = [resources.client_train_rows(shard) for shard in shards]
    records = [state_from_bytes(state) if state else RecordDict() for state in states]
    histories = [history_from_lists(record[protocol.ACCOUNTANT_STATE])
                 if protocol.ACCOUNTANT_STATE in record else [] for record in records]
    batch_size = config.client.batch_size
    plans = [plan_steps(len(r), poisson_steps(len(r), batch_size), resources.train_settings,
                        dp, history) for r, history in zip(rows, histories, strict=True)]
    steps = np.array([plan.allowed for plan in plans])
    travelling = travelling_tensors(model)
    stacked: dict[str, np.ndarray] | None = None
    results = [TrainResult(math.nan, 0, 0, 0.0)] * len(ids)
    for count in np.unique(steps[steps > 0]):  # clients allowed as many steps train together
        members = np.flatnonzero(steps == count)
        # dropout as on the Opacus path: torch's generator seeded with the round seed; its
        # DataLoader draws a base seed from it at every pass over the Poisson batches
        masks = ClientMasks.seeded(model, [seeds[i] for i in members], [1] * len(members),
                                   [poisson_steps(len(rows[i]), batch_size) for i in members])
        arrays, group = _train_private_group(resources, model, [rows[i] for i in members],
                                             [plans[i] for i in members], int(count), masks,
                                             dp.max_grad_norm,
                                             keep_stacks and len(members) == len(ids))
        stacked = into_chunk(stacked, arrays, members, len(ids), travelling)
        for i, result in zip(members, group, strict=True):
            results[i] = result
    share = (time.perf_counter() - started) / len(ids)
    trained, new_states = [], []
    for i, client_id in enumerate(ids):
        plan, result = plans[i], results[i]
        history = plan.history_after(histories[i])
        spent = epsilon(history, dp.delta, dp.accountant)
        privacy = {protocol.NOISE_MULTIPLIER: plan.noise_multiplier,
                   protocol.SAMPLE_RATE: plan.sample_rate}
        if math.isfinite(spent):  # replies carry finite numbers; no noise = no ε
            privacy[protocol.EPSILON] = spent
        client = TrainedClient(arrays=None, status=plan.stopped)
        if result.num_steps:
            client.arrays = {name: value[i] for name, value in stacked.items()}
        client.metrics = train_metrics(resources, shards[i], client_id,
                                       TrainResult(result.loss, result.num_examples,
                                                   result.num_steps, share), privacy, {})
        trained.append(client)
        records[i][protocol.ACCOUNTANT_STATE] = ConfigRecord(history_to_lists(history))
        new_states.append(state_to_bytes(records[i]))
    return TrainedChunk(trained, stacked, share, new_states)


def _train_private_group(resources: TaskResources, model: nn.Module, rows: list[np.ndarray],
                         plans: list[StepPlan], steps: int, masks: ClientMasks,
                         max_grad_norm: float, hand_over: bool
                         ) -> tuple[dict[str, np.ndarray], list[TrainResult]]:
    """Clients allowed the same number of ``steps`` (at least one), trained together from the
    global weights by DP-SGD (see the module doc): their travelling arrays stacked (client i:
    row i; ``hand_over``: the caller's, ``vectorised.stacked_arrays``) and each one's training
    result (duration 0: the caller shares the chunk's time)."""
    travelling = travelling_tensors(model)
    clients = len(rows)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    fixed = {name: t for name, t in (*model.named_parameters(), *model.named_buffers())
             if name not in names}
    copies = stacked_copies(model, names, clients, resources.train_settings)
    stacked, optimizer = copies.tensors, copies.optimizer
    with torch.no_grad():
        torch._foreach_copy_(stacked, [travelling[name].detach().expand_as(copy)
                                       for name, copy in zip(names, stacked, strict=True)])
    per_example = per_example_gradients(model, names, fixed, masks)
    sizes = [len(r) for r in rows]
    every_row, owner = np.concatenate(rows), np.repeat(np.arange(clients), sizes)
    flips = poisson_flips(sizes, [plan.sample_rate for plan in plans], steps)
    stds = np.array([plan.noise_multiplier for plan in plans]) * max_grad_norm
    divisors = np.array([plan.expected_batch_size for plan in plans])
    loss_sums = np.zeros(clients)
    seen = np.zeros(clients, dtype=np.int64)
    encoded, labels = resources.encoded, resources.federation.data.labels
    with masks.applied():
        for s in range(steps):
            taken = np.flatnonzero(flips[s])
            inputs, target, mask, counts = sampled_batch(encoded, labels, every_row[taken],
                                                         owner[taken], clients)
            if masks and not masks.shapes:
                masks.probe(inputs)
            dropped = masks.draw(s, counts, mask.shape[1]) if masks else ()
            grads, losses = per_example(tuple(stacked), inputs, target, dropped)
            noised = noised_means(clipped_sums(grads, mask, max_grad_norm), stds, divisors)
            for param, gradient in zip(stacked, noised, strict=True):
                param.grad = gradient
            optimizer.step()
            loss_sums += (losses.detach() * mask).sum(dim=1).double().numpy()
            seen += counts
    arrays = stacked_arrays(copies, names, travelling, clients, hand_over)
    return arrays, [TrainResult(float(loss_sums[i] / seen[i]) if seen[i] else math.nan,
                                int(seen[i]), steps, 0.0) for i in range(clients)]


def per_example_gradients(model: nn.Module, names: list[str], fixed: dict[str, torch.Tensor],
                          masks: ClientMasks) -> Callable[..., tuple[tuple[torch.Tensor, ...],
                                                                     torch.Tensor]]:
    """(stacked weights, inputs, labels, dropout masks) -> every example's gradient of its own
    cross-entropy (clients x examples x the tensor's shape) and its loss (clients x examples):
    ``vmap`` over the clients (their own weights) of ``vmap`` over their examples (the same
    weights) of ``grad_and_value`` of one example's loss - torch.func's per-sample-gradients
    recipe, one level more."""

    def loss(params: tuple[torch.Tensor, ...], inputs: dict[str, torch.Tensor],
             label: torch.Tensor, dropped: tuple[torch.Tensor, ...]) -> torch.Tensor:
        masks.current = dropped  # this example's dropout masks (``ClientMasks.applied``)
        out = functional_call(model, {**fixed, **dict(zip(names, params, strict=True))},
                              args=(), kwargs={k: v.unsqueeze(0) for k, v in inputs.items()})
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return nn.functional.cross_entropy(logits.float(), label.unsqueeze(0))

    return vmap(vmap(grad_and_value(loss), in_dims=(None, 0, 0, 0)))


def sampled_batch(encoded: Encoded, labels: np.ndarray, rows: np.ndarray, owner: np.ndarray,
                  clients: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor,
                                         np.ndarray]:
    """One step's Poisson samples of ``clients`` clients (``rows``: the sampled row numbers,
    ``owner``: each one's client, in client order), gathered in one call and padded to the
    largest sample, at least one example wide (inputs, labels, mask of sampled examples,
    examples per client)."""
    counts = np.bincount(owner, minlength=clients)
    width = max(1, int(counts.max(initial=0)))
    position = torch.from_numpy(np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts,
                                                                  counts))
    client = torch.from_numpy(owner)
    inputs = {}
    for key, value in encoded.pad(rows).items():
        inputs[key] = value.new_zeros((clients, width, *value.shape[1:]))
        inputs[key][client, position] = value
    target = torch.zeros((clients, width), dtype=torch.int64)
    target[client, position] = torch.from_numpy(labels[rows]).long()
    mask = torch.zeros(clients, width)
    mask[client, position] = 1.0
    return inputs, target, mask, counts
