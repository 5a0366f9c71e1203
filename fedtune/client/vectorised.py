"""Train many plain clients at once: ``torch.func`` over stacked copies of the model.

For clients that train the plain local objective (a FedAvg-family client side, no injected
faults, fp32 on CPU) of a model that reads dense features (the MLP on hashed features, a head
on cached pooled features), a chunk of clients' steps is one batched computation: the model's
trainable parameters are stacked, one copy per client; one
``torch.func.vmap(torch.func.grad_and_value(loss))`` over the stacked copies and the clients'
stacked batches gives every client's own gradient and loss; and one optimizer step
over the stacked tensors is every client's own step (Adam, AdamW and SGD update each element
from that element's gradient and state alone). FedJAX (Ro, Suresh and Wu 2021, "FedJAX:
Federated learning simulation with JAX") trains clients with ``jax.vmap`` the same way; the
stacking is torch.func's model-ensembling recipe (``functional_call`` over stacked weights).

Each client trains on exactly the batches its own loader gives
(``TaskResources.client_train_loader`` with its round seed), as ``fedtune.client.app.
train_client`` would; a client whose batch at a step is smaller than the others' is padded and
the padding is masked out of its loss. The arithmetic is batched, so weights agree with
one-client-at-a-time training to float rounding, not bit for bit. Dropout drops what it drops
one client at a time: each client's masks come from a generator seeded with its round seed
(``fedtune.client.dropout_masks``). What a chunk may hold is fixed by the block and the model's size
(``chunk_sizes``), so every runtime that vectorises gives the same bits.

``client.max_grad_norm`` clips every client's stacked gradients by that client's own total
norm, as ``torch.nn.utils.clip_grad_norm_`` clips one client's (``clip_stacked``: the same
formula and eps, one reduction over the stack). Under ``privacy.mode = "local"`` clients train
together too, by DP-SGD with per-example gradients (``fedtune.client.private_chunks``), unless
``privacy.insecure_reproducible_noise`` keeps Opacus' seeded draws one client at a time
(``one_at_a_time_because`` names every reason a run's clients train alone).

A strategy whose entry is ``client_together`` trains its clients' objective here too: its
client side's extra terms are added to the stacked gradients (``_adjust_stacked``), the round's
(FedProx's proximal term) broadcast over the chunk, or each client's own from its state
(SCAFFOLD's ``c - c_i``, FedDyn's ``g_k``) stacked over it (``chunk_objective``); each client's
reply and new state come from its own row and state (``chunk_sides``). A side with a
personal part (``ClientSide.personal_part``: FedPer's head, Arivazhagan et al. 2019) starts
each client's row of those tensors from its own values, keeps the trained row in its state and
sets the reply's row back to the global values; that part is read from and written into the
state's bytes (``fedtune.state.arrays``), never a Flower ``RecordDict``, which would cost more
per client than its share of the training (``personal_starts``, ``keep_personal``). A side
may train in passes (``ClientSide.together_passes``, ``fedtune.train.TrainPass``), each with
some tensors fixed and maybe its own schedule: FedBABU's head never trains (Oh et al. 2022);
FedRep trains each client's own head alone, then the body under it (Collins et al. 2021), the
fixed heads going through vmap as one value per client (``_train_group``'s ``start``); Ditto
trains each client's personal model with a proximal pull towards the global one, then the
global model from the global values, its reply (Li et al. 2021).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedtune import protocol
from fedtune.client.algorithms import ClientSide, parameter_tensors
from fedtune.client.app import TrainedClient, client_shard, train_metrics
from fedtune.client.dropout_masks import ClientMasks
from fedtune.client.objective import LocalObjective
from fedtune.config import Config
from fedtune.data.encode import Encoded
from fedtune.data.loaders import ShuffledRows, first_epoch_batches
from fedtune.faults import FaultPlan
from fedtune.models.hf import uses_feature_cache
from fedtune.models.weights import load_shared_state, travelling_tensors
from fedtune.privacy.stacked_dp_sgd import private_one_at_a_time_because
from fedtune.state.arrays import read_arrays, with_arrays
from fedtune.state.codec import state_from_bytes, state_to_bytes
from fedtune.tables.model_kinds import MODEL_KINDS
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.runtimes import RUNTIMES
from fedtune.tables.strategies import STRATEGIES
from fedtune.task import TaskResources, client_round_seeds, resolve_device
from fedtune.train import (
    TrainPass,
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
VECTORISE_KEY = "vectorise_clients"  # the runtimes' key (fedtune.tables.runtimes)
STEPPED_MODULES = (nn.modules.batchnorm._BatchNorm,)  # update buffers in place while training


def one_at_a_time_because(config: Config) -> str | None:
    """Why this run's clients train one at a time (None: they train together), from the config
    and the facts of the tables' entries: the runtime's ``vectorise_clients`` key, the model
    kind's ``vectorisable`` (or a head on cached pooled features), the strategy's client side
    and the privacy mode's mechanism (each changes a client's objective or steps; local DP-SGD
    trains together where ``fedtune.privacy.stacked_dp_sgd`` allows it), and faults and
    precision, which the loop alone plays. Under an [attack] the honest clients and update
    attackers train together and a data attacker alone (``fedtune.engine.cohort.run_block``)."""
    engine, client = config.engine, config.client
    private = (private_one_at_a_time_because(config)
               if PRIVACY_MODES[config.privacy.mode].mechanism else None)
    reasons = [
        (VECTORISE_KEY not in RUNTIMES[engine.backend].keys,
         f"engine.backend = {engine.backend!r} runs one ClientApp per client"),
        (not getattr(engine, VECTORISE_KEY, False), "engine.vectorise_clients = false"),
        (not (MODEL_KINDS[config.model.kind].vectorisable or uses_feature_cache(config)),
         (f"model.kind = {config.model.kind!r} trains whole (not a dense MLP or a head on "
          "cached features)")),
        (bool(STRATEGIES[config.strategy.name].client)
         and not STRATEGIES[config.strategy.name].client_together,
         f"strategy.name = {config.strategy.name!r} has its own client side"),
        (private is not None, private or ""),
        (FaultPlan.from_config(config).active, "[faults] are played"),
        (client.precision != "fp32", f"client.precision = {client.precision!r}"),
        (resolve_device(client.device).type != "cpu", "clients train on a GPU"),
    ]
    return next((reason for refused, reason in reasons if refused), None)


def vectorisable(resources: TaskResources) -> bool:
    """Whether this run's training clients may be trained together (see the module doc):
    decided once per ``resources`` (kept in ``TaskResources.together``; every block of a
    round asks, and the answer took ~0.1 ms a block)."""
    if resources.together is None:
        resources.together = (one_at_a_time_because(resources.config) is None
                               and resources.device.type == "cpu"
                               and _stackable(resources.model))
    return resources.together


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
    return even_chunks(clients, max(1, CHUNK_BYTES // max(size, 1)))


def even_chunks(clients: int, most: int) -> list[int]:
    """``clients`` consecutive clients in as few chunks of at most ``most`` as can be, their
    sizes as equal as can be (the larger first)."""
    count = -(-clients // most)
    base, extra = divmod(clients, count)
    return [base + (i < extra) for i in range(count)]


@dataclass
class TrainedChunk:
    """A chunk of clients trained together: in client order, each client's ``TrainedClient``
    (its arrays: rows of ``stacked``) and the chunk's time shared out per client."""

    trained: list[TrainedClient]
    # travelling tensor name -> the chunk's clients' values stacked (client i: row i), valid
    # until the next chunk trains (``train_chunks``' keep_stacks: the caller's); None when no
    # client of the chunk took a step
    stacked: dict[str, np.ndarray] | None
    share: float
    states: list[bytes]  # each client's state after it trained (``fedtune.state.codec``)


def train_chunks(resources: TaskResources, server_round: int, content: RecordDict,
                 global_arrays: dict[str, np.ndarray], client_ids: Sequence[int],
                 states: Sequence[bytes] | None = None, seeds: Sequence[int] | None = None,
                 keep_stacks: bool = False) -> Iterator[TrainedChunk]:
    """Train the clients ``client_ids`` on their training splits from ``global_arrays``
    (``content``: the train message's records), a chunk at a time (``chunk_sizes``).
    ``states``: each client's Context.state as bytes (``fedtune.state.codec``; b"": empty),
    which a client side with its own state (SCAFFOLD's control variate, FedDyn's gradient,
    FedPer's head) reads before the chunk trains and updates after, as one client at a time
    does (None: every client's state is empty); each chunk's ``states`` are the new ones.
    ``seeds``: each client's round seed (``fedtune.task.client_round_seeds`` of this round and
    message, derived for a whole cohort at once by ``fedtune.engine.cohort.cohort_clients``;
    None: derived here, a chunk at a time). ``keep_stacks``: each chunk's ``stacked`` arrays
    are the caller's to keep (no later chunk writes them: a strategy that keeps every update
    holds them without a copy); else they are valid until the next chunk trains."""
    first = 0
    for size in chunk_sizes(len(client_ids), resources.model):
        yield _train_chunk(resources, server_round, content, global_arrays,
                           client_ids[first:first + size],
                           [b""] * size if states is None else states[first:first + size],
                           None if seeds is None else seeds[first:first + size], keep_stacks)
        first += size


def group_updates_together(resources: TaskResources, group: tuple[int, ...], server_round: int,
                           content: RecordDict, global_arrays: dict[str, np.ndarray]
                           ) -> list[dict[str, np.ndarray]]:
    """``fedtune.client.attacking.group_updates`` for a run whose plain clients train together:
    the collusion group's members trained as chunks, their float64 updates."""
    moving = {name: value for name, value in global_arrays.items()
              if np.issubdtype(value.dtype, np.floating)}
    updates = []
    for chunk in train_chunks(resources, server_round, content, global_arrays, list(group)):
        for trained in chunk.trained:  # a member without a step sends the global model back
            arrays = trained.arrays or moving
            updates.append({name: arrays[name].astype(np.float64) - value
                            for name, value in moving.items()})
    return updates


def chunk_sides(resources: TaskResources, content: RecordDict,
                global_arrays: dict[str, np.ndarray], states: Sequence[bytes],
                clients: int) -> list[ClientSide]:
    """The client side of each of a chunk's ``clients``: plain, or the strategy's
    ``client_together`` one; a side that reads no ``RecordDict`` state (FedProx's proximal
    term, FedNova's reply metric, FedPer's, whose personal part ``_train_chunk`` keeps) is one
    side serving the whole chunk, a side with its own state (``ClientSide.own_state``:
    SCAFFOLD, FedDyn) one per client over that client's state (``states``, decoded)."""
    entry = STRATEGIES[resources.config.strategy.name]
    side_class = entry.load_client() if entry.client else ClientSide
    if not side_class.own_state:
        return [side_class(content, RecordDict(), global_arrays,
                           resources.train_settings)] * clients
    if len(states) != clients:
        raise ValueError(f"{len(states)} client states for a chunk of {clients} clients")
    return [side_class(content, state_from_bytes(state) if state else RecordDict(),
                       global_arrays, resources.train_settings)
            for state in states]


def personal_starts(states: Sequence[bytes], names: Sequence[str],
                    global_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each client's own values of the personal tensors ``names`` (kept in its state under
    ``protocol.PERSONAL_STATE``; the global ones before its first round), stacked (client i:
    row i)."""
    starts = {name: np.empty((len(states), *global_arrays[name].shape),
                             global_arrays[name].dtype) for name in names}
    for i, state in enumerate(states if names else ()):
        own = read_arrays(state, protocol.PERSONAL_STATE) or {}
        for name in names:
            starts[name][i] = own.get(name, global_arrays[name])
    return starts


def keep_personal(states: Sequence[bytes], own: dict[str, np.ndarray],
                  stacked: dict[str, np.ndarray] | None, trained: np.ndarray,
                  names: Sequence[str], global_arrays: dict[str, np.ndarray]) -> list[bytes]:
    """Each client's state with its personal tensors (row i of ``own``: its values, as its
    passes trained them), in ``protocol.PERSONAL_STATE`` as
    ``fedtune.personal.base.store_arrays`` keeps them; the rows of ``stacked`` (which the
    replies view) where ``trained``, of the personal tensors the last pass trained
    (``names``), are set back to the global values."""
    kept = [with_arrays(state, protocol.PERSONAL_STATE, {name: own[name][i] for name in own})
            for i, state in enumerate(states)]
    if stacked is not None:
        for name in names:
            stacked[name][trained] = global_arrays[name]
    return kept


@dataclass
class StackedObjective(LocalObjective):
    """A chunk's clients' extra terms (``chunk_objective``): the round's quadratic weight and
    anchor, each client's linear and shift tensors stacked (client i: row i)."""

    def rows(self, members: np.ndarray) -> StackedObjective:
        """The terms of the chunk's clients ``members`` alone."""
        index = torch.from_numpy(members)
        return StackedObjective(
            quadratic=self.quadratic, anchor=self.anchor,
            linear={name: value[index] for name, value in self.linear.items()},
            shift={name: value[index] for name, value in self.shift.items()})


def chunk_objective(sides: Sequence[ClientSide], model: nn.Module) -> LocalObjective | None:
    """The extra terms of a chunk's clients' objectives as one ``LocalObjective`` over their
    stacked copies: one side's terms as they are (broadcast over the clients); sides of their
    own (``chunk_sides``) share the round's quadratic weight and anchor (the global model) and
    have their own linear and shift tensors (FedDyn's gradient state ``g_k``, Acar et al.
    2021; SCAFFOLD's ``c - c_i``, Karimireddy et al. 2020), stacked (client i: row i) so that
    ``_adjust_stacked`` adds each client's own."""
    if all(side is sides[0] for side in sides):
        return sides[0].objective(model)
    objectives = [side.objective(model) for side in sides]
    first = objectives[0]
    if first is None:
        if any(objective is not None for objective in objectives):
            raise ValueError("the clients of a chunk have extra terms and none, in one round")
        return None
    if any(objective is None or objective.quadratic != first.quadratic
           or objective.anchor.keys() != first.anchor.keys()
           or objective.linear.keys() != first.linear.keys()
           or objective.shift.keys() != first.shift.keys() for objective in objectives):
        raise ValueError("the clients of a chunk have other extra terms in one round")
    return StackedObjective(
        quadratic=first.quadratic, anchor=first.anchor,
        linear={name: torch.stack([o.linear[name] for o in objectives]) for name in first.linear},
        shift={name: torch.stack([o.shift[name] for o in objectives]) for name in first.shift})


def _train_chunk(resources: TaskResources, server_round: int, content: RecordDict,
                 global_arrays: dict[str, np.ndarray], ids: Sequence[int],
                 states: Sequence[bytes], seeds: Sequence[int] | None = None,
                 keep_stacks: bool = False) -> TrainedChunk:
    started = time.perf_counter()
    config = resources.config
    model = resources.model
    load_shared_state(model, global_arrays)
    model.train()
    sides = chunk_sides(resources, content, global_arrays, states, len(ids))
    objective = chunk_objective(sides, model)
    personal = sides[0].personal_part(resources)
    own = personal_starts(states, personal, global_arrays)  # trained in place, pass by pass
    if seeds is None:
        seeds = client_round_seeds(config.run.seed, server_round, ids,
                                   protocol.message_dispatch(content))
    shards = [client_shard(config, client_id) for client_id in ids]
    # each client's dropout generator, drawn on across its passes as its own default one is
    generators = ClientMasks.generators(model, seeds)
    passes = sides[0].together_passes(resources)
    for number, train_pass in enumerate(passes):
        last = number == len(passes) - 1
        stacked, results, steps = _train_pass(
            resources, train_pass, shards, seeds, generators, objective, own, global_arrays,
            keep_stacks and last)
        for name in train_pass.kept(own) if stacked is not None else ():
            own[name][steps > 0] = stacked[name][steps > 0]  # without a step: its values
    share = (time.perf_counter() - started) / len(ids)
    trained = []
    for i, client_id in enumerate(ids):
        result = results[i]
        client = TrainedClient(arrays=None)
        extra: dict[str, float] = {}
        if result.num_steps:
            client.arrays = {name: value[i] for name, value in stacked.items()}
            client.records, extra = sides[i].reply(client.arrays, result.num_steps)
        client.metrics = train_metrics(resources, shards[i], client_id,
                                       TrainResult(result.loss, result.num_examples,
                                                   result.num_steps, share), {}, extra)
        trained.append(client)
    if personal:  # its trained personal part kept, the reply's the global values
        states = keep_personal(states, own, stacked, steps > 0, passes[-1].kept(own),
                               global_arrays)
    elif sides[0].own_state:
        states = [state_to_bytes(side.state) for side in sides]
    return TrainedChunk(trained, stacked, share, list(states))


def _train_pass(resources: TaskResources, train_pass: TrainPass, shards: Sequence[int],
                seeds: Sequence[int], generators: list[torch.Generator] | None,
                objective: LocalObjective | None, own: dict[str, np.ndarray],
                global_arrays: dict[str, np.ndarray], keep_stack: bool
                ) -> tuple[dict[str, np.ndarray] | None, list[TrainResult], np.ndarray]:
    """One pass of a chunk's training (``TrainPass``): its clients grouped by their number of
    steps, each group trained together from the clients' ``own`` values of their personal
    tensors where the pass says so (the global ones elsewhere); the chunk's stacked arrays
    (None: no client took a step), each client's result and its steps."""
    model, clients = resources.model, len(shards)
    if train_pass.proximal:  # Ditto's pull towards the global model, as ``LocalObjective``
        if objective is not None:
            raise ValueError("a pass's proximal pull and the client side's objective, together")
        objective = LocalObjective(quadratic=train_pass.proximal,
                                   anchor=parameter_tensors(global_arrays, model))
    settings = train_pass.settings or resources.train_settings
    rows, epoch_draws, epoch_batches = _client_batches(resources, shards, seeds, settings)
    steps = np.array([len(r) for r in rows])
    travelling = travelling_tensors(model)
    stacked: dict[str, np.ndarray] | None = None
    results = [TrainResult(float("nan"), 0, 0, 0.0)] * clients
    for count in np.unique(steps[steps > 0]):  # clients with as many steps train together
        members = np.flatnonzero(steps == count)
        masks = ClientMasks(model, [generators[i] for i in members] if generators else [],
                            [epoch_draws[i] for i in members],
                            [epoch_batches[i] for i in members])
        group_objective = (objective.rows(members) if isinstance(objective, StackedObjective)
                           and len(members) < clients else objective)
        start = ({name: value[members] for name, value in own.items()}
                 if train_pass.from_own else {})
        # a group of the whole chunk is its stack; another's rows are copied into one
        arrays, group = _train_group(resources, model, [rows[i] for i in members],
                                     group_objective, masks, start,
                                     keep_stack and len(members) == clients, train_pass.fixed)
        stacked = into_chunk(stacked, arrays, members, clients, travelling)
        for i, result in zip(members, group, strict=True):
            results[i] = result
    return stacked, results, steps


def into_chunk(stacked: dict[str, np.ndarray] | None, arrays: dict[str, np.ndarray],
               members: np.ndarray, clients: int, travelling: dict[str, torch.Tensor]
               ) -> dict[str, np.ndarray]:
    """A chunk's stacked replies once a group of its clients (rows ``members`` of
    ``clients``) has trained into ``arrays``: ``arrays`` itself for the whole chunk, else
    ``stacked`` (made at the first group, every row at the global values ``travelling``: a
    client without a step sends nothing, and its row stays finite for the chunk's norms) with
    the group's rows copied in (a later group of as many clients trains in the same stacked
    copies)."""
    if len(members) == clients:
        return arrays
    if stacked is None:
        stacked = {name: _repeated_rows(value, clients) for name, value in travelling.items()}
    for name, value in arrays.items():
        stacked[name][members] = value
    return stacked


def _client_batches(resources: TaskResources, shards: Sequence[int], seeds: Sequence[int],
                    settings: TrainSettings
                    ) -> tuple[list[list[np.ndarray]], list[int], list[int]]:
    """Each client's batches this round (row numbers: ``local_batches`` over its
    ``TaskResources.client_train_row_batches``), and its loader's draws from torch's default
    generator and batches per epoch (``ClientMasks``); drawn by ``first_epoch_batches`` where
    it can."""
    first = first_epoch_batches(resources.encoded,
                                [resources.client_train_rows(shard) for shard in shards],
                                resources.config.client.batch_size, seeds, settings.local_steps)
    if first is not None:
        rows, per_epoch = first
        return rows, [ShuffledRows.epoch_draws] * len(rows), per_epoch
    loaders = [resources.client_train_row_batches(shard, seed)
               for shard, seed in zip(shards, seeds, strict=True)]
    return ([list(local_batches(loader, settings)) for loader in loaders],
            [loader.epoch_draws for loader in loaders], [len(loader) for loader in loaders])


def _train_group(resources: TaskResources, model: nn.Module, rows: list[list[np.ndarray]],
                 objective: LocalObjective | None, masks: ClientMasks,
                 start: dict[str, np.ndarray] | None = None, hand_over: bool = False,
                 fixed_part: Sequence[str] = ()
                 ) -> tuple[dict[str, np.ndarray], list[TrainResult]]:
    """Clients that take the same number of steps (at least one), trained together: their
    travelling arrays stacked (client i: row i) and each one's training result (duration 0:
    the caller shares the chunk's time). ``objective``'s terms are added to every client's
    gradient, as ``LocalObjective.adjust_gradients`` adds them to one client's; dropout drops
    what each client's own generator draws (``masks``). Every client starts from the global
    weights but for the tensors of ``start``: its own values (row i: client i's; FedPer's
    personal head, and FedRep's, trained or fixed). The trainable tensors of ``fixed_part`` do
    not train (FedBABU's head; FedRep's head, then its body), as
    ``fedtune.personal.base.train_part`` trains one client. ``hand_over``: the arrays are the
    caller's (``stacked_arrays``)."""
    travelling = travelling_tensors(model)
    steps = len(rows[0])
    clients = len(rows)
    names = [name for name, p in model.named_parameters()
             if p.requires_grad and name not in fixed_part]
    # fixed tensors with a value per client: through vmap beside the trained ones
    own_fixed = {name: torch.from_numpy(values) for name, values in (start or {}).items()
                 if name not in names}
    fixed = {name: t for name, t in (*model.named_parameters(), *model.named_buffers())
             if name not in names and name not in own_fixed}
    copies = stacked_copies(model, names, clients, resources.train_settings)
    stacked, optimizer = copies.tensors, copies.optimizer
    with torch.no_grad():  # every client starts from the global weights
        torch._foreach_copy_(stacked, [travelling[name].detach().expand_as(copy)
                                       for name, copy in zip(names, stacked, strict=True)])
        for name, values in (start or {}).items():
            if name in names:
                stacked[names.index(name)].copy_(torch.from_numpy(values))
    per_client = tuple(own_fixed.values())

    def loss(params: tuple[torch.Tensor, ...], own: tuple[torch.Tensor, ...],
             inputs: dict[str, torch.Tensor], labels: torch.Tensor, mask: torch.Tensor,
             dropped: tuple[torch.Tensor, ...]) -> torch.Tensor:
        masks.current = dropped  # this client's dropout masks (``ClientMasks.applied``)
        out = functional_call(model, {**fixed, **dict(zip(own_fixed, own, strict=True)),
                                      **dict(zip(names, params, strict=True))},
                              args=(), kwargs=inputs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        per_example = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        return (per_example * mask).sum() / mask.sum()

    step = vmap(grad_and_value(loss))
    # the first step's weights are the global ones for every client (unless some start from
    # their own, ``start``): one unbatched copy, so the forward pass is one matrix product over
    # the chunk's batches instead of a batched one that reads every client's copy (the same
    # gradients bit for bit with one thread: tests/engine/test_vectorised.py and the golden
    # runs check it; the stacked copies still take the optimizer's step)
    shared = None if start else tuple(travelling[name].detach() for name in names)
    first_step = vmap(grad_and_value(loss), in_dims=(None, 0, 0, 0, 0, 0))
    loss_sums = np.zeros(clients)
    seen = np.zeros(clients, dtype=np.int64)
    encoded, labels = resources.encoded, resources.federation.data.labels
    with masks.applied():
        for s in range(steps):
            inputs, target, mask, counts = _gather_step(encoded, labels, [r[s] for r in rows])
            if masks and not masks.shapes:
                masks.probe(inputs)
            dropped = masks.draw(s, counts, mask.shape[1]) if masks else ()
            if s == 0 and shared is not None:
                grads, losses = first_step(shared, per_client, inputs, target, mask, dropped)
            else:
                grads, losses = step(tuple(stacked), per_client, inputs, target, mask, dropped)
            for param, gradient in zip(stacked, grads, strict=True):
                param.grad = gradient
            if objective is not None:
                _adjust_stacked(objective, names, stacked)
            if resources.train_settings.max_grad_norm:
                clip_stacked(stacked, resources.train_settings.max_grad_norm)
            optimizer.step()
            loss_sums += losses.detach().double().numpy() * counts
            seen += counts
    arrays = stacked_arrays(copies, names, travelling, clients, hand_over)
    return arrays, [TrainResult(float(loss_sums[i] / seen[i]), int(seen[i]), steps, 0.0)
                    for i in range(clients)]


def _adjust_stacked(objective: LocalObjective, names: list[str],
                    stacked: list[torch.Tensor]) -> None:
    """``LocalObjective.adjust_gradients`` for stacked copies: the same terms, in the same
    order, with the round's anchor, linear and shift tensors broadcast over the clients."""
    for name, param in zip(names, stacked, strict=True):
        objective.adjust_gradient(name, param)


def client_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each client's (row's) total 2-norm over ``tensors`` stacked (client i: row i): the
    norm of its tensors' norms, as ``torch.nn.utils.get_total_norm`` takes it of one
    client's."""
    norms = [torch.linalg.vector_norm(t.flatten(1), 2, dim=1) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms, dim=1), 2, dim=1)


def clip_stacked(stacked: Sequence[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` for every client of the stack at
    once: each client's gradients scaled by ``min(1, max_norm / (its total norm + 1e-6))``
    (``client.max_grad_norm``; the norm over all its trainable tensors, the same formula and
    eps as torch's)."""
    grads = [param.grad for param in stacked]
    coefficient = (max_norm / (client_norms(grads) + 1e-6)).clamp_(max=1.0)
    for gradient in grads:
        gradient.mul_(coefficient.view(-1, *[1] * (gradient.dim() - 1)))


@dataclass
class StackedCopies:
    """A chunk size's stacked copies of the trainable parameters (client i: row i) and an
    optimizer over them: ``tensors``, what the optimizer steps, are views of ``owners``, NumPy
    arrays that own the memory, so a caller that keeps a trained chunk holds those arrays as
    they are (``hand_over``), read-only and without a copy (``fedtune.server.checkpoint``)."""

    tensors: list[torch.Tensor]
    owners: list[np.ndarray]
    optimizer: torch.optim.Optimizer

    def hand_over(self) -> list[np.ndarray]:
        """The trained values, the caller's from now on: the tensors move to fresh memory,
        where the next chunk of this size trains (the optimizer and its moments stay)."""
        trained, self.owners = self.owners, [np.empty_like(owner) for owner in self.owners]
        with torch.no_grad():
            for tensor, owner in zip(self.tensors, self.owners, strict=True):
                tensor.set_(torch.from_numpy(owner))
        return trained


def stacked_copies(model: nn.Module, names: list[str], clients: int, settings: TrainSettings
                   ) -> StackedCopies:
    """``clients`` stacked copies of the trainable parameters ``names`` (their values unwritten:
    the chunk copies its start model in) and an optimizer over them, reset (as new). Kept on
    the model for the next chunk of as many clients and the same tensors, for the
    ``KEPT_SIZES`` sizes used last
    (an asynchronous server's calls come in many sizes): fresh tensors of a chunk's size are
    zero-filled page by page on first write, which costs more than the chunk's optimizer
    step."""
    kept: dict[tuple[int, tuple[str, ...]], StackedCopies] = model.__dict__.setdefault(
        "_fedtune_stacked", {})
    key = clients, tuple(names)
    copies = kept.pop(key, None)  # back in last: the least recently used size goes first
    if copies is None:
        if len(kept) >= KEPT_SIZES:
            kept.pop(next(iter(kept)))
        params = dict(model.named_parameters())
        # C-ordered, unwritten: the chunk copies its start model in before it trains
        owners = [np.empty((clients, *params[name].shape), params[name].detach().numpy().dtype)
                  for name in names]
        tensors = [torch.from_numpy(owner) for owner in owners]
        copies = StackedCopies(tensors, owners, make_optimizer(tensors, settings))
    kept[key] = copies
    reset_optimizer(copies.optimizer)
    return copies


def stacked_arrays(copies: StackedCopies, names: list[str],
                   travelling: dict[str, torch.Tensor], clients: int, hand_over: bool
                   ) -> dict[str, np.ndarray]:
    """A trained group's travelling arrays stacked (client i: row i): the trained copies and
    the frozen tensors broadcast, views valid until the next chunk loads its model and trains
    in these copies; ``hand_over``: arrays of their own, the caller's (no later chunk writes
    them), the frozen tensors repeated."""
    trained = dict(zip(names, copies.hand_over() if hand_over else copies.owners, strict=True))
    return {name: trained[name] if name in trained
            else _repeated_rows(value, clients) if hand_over
            else np.broadcast_to(value.detach().numpy(), (clients, *value.shape))
            for name, value in travelling.items()}


def _repeated_rows(value: torch.Tensor, clients: int) -> np.ndarray:
    """``value`` repeated in ``clients`` rows: a C-ordered array that owns its memory. (NumPy's
    copy of a broadcast keeps its strides, the clients' axis innermost, and torch 2.13's fused
    CPU AdamW steps a tensor of such strides wrongly.)"""
    return np.array(np.broadcast_to(value.detach().numpy(), (clients, *value.shape)), order="C")


def _gather_step(encoded: Encoded, labels: np.ndarray, rows: list[np.ndarray]
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, np.ndarray]:
    """The clients' batches of one step (``rows``: each client's row numbers), gathered in one
    call and stacked (inputs, labels, mask of real examples, examples per client); smaller
    batches are padded with zeros the mask leaves out."""
    counts = np.array([len(r) for r in rows])
    picked = np.concatenate(rows)
    values = encoded.pad(picked)
    target = torch.from_numpy(labels[picked])
    clients, width = len(rows), int(counts.max())
    if (counts == width).all():
        return ({key: value.view(clients, width, *value.shape[1:])
                 for key, value in values.items()},
                target.view(clients, width), torch.ones(clients, width), counts)
    client = torch.from_numpy(np.repeat(np.arange(clients), counts))
    position = torch.from_numpy(np.arange(len(picked)) - np.repeat(np.cumsum(counts) - counts,
                                                                  counts))
    inputs = {}
    for key, value in values.items():
        inputs[key] = value.new_zeros((clients, width, *value.shape[1:]))
        inputs[key][client, position] = value
    stacked_target = target.new_zeros((clients, width))
    stacked_target[client, position] = target
    mask = torch.zeros(clients, width)
    mask[client, position] = 1.0
    return inputs, stacked_target, mask, counts
