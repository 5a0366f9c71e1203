"""The attacking clients' side (``[attack]``, ``fedtune.attacks``): what an attacker trains on
and what it sends, played inside ``train_client`` so that every runtime plays it alike.

- A data attack (``acts_on = "data"``) trains on the attacker's poisoned rows
  (``TaskResources.poisoned``); a backdoor's ``attack.boost`` then scales its update (model
  replacement, Bagdasaryan et al. 2020).
- An update attack (``acts_on = "update"``) replaces the honest update ``y - x`` by its own,
  computed in float64 and sent in the model's dtypes.
- An attack whose colluders see the round's honest updates (the entry's ``sees``) gets the
  honest updates of the attacker's collusion group: the attacker trains every member's data
  from the round's global model with plain local training and the member's own round seed
  (together where the cohort engine trains plain clients together: its ``train_group``), so
  every member derives the same statistics, and sends the same update, whoever computes it
  first (``formed_update``: the attack's context is drawn for the group's first member): a
  process forms a group's update once per round and keeps the round's (one model's floating
  tensors in float64 per group) until the next round. Where several processes serve one round
  (the Ray engine's actors), one of them forms it and the others receive it
  (``receive_group_updates``, ``fedtune.engine.colluders``), so a group is formed once a round
  in the whole run. No colluder sees an honest client's update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import RecordDict
from threadpoolctl import threadpool_limits

from fedtune import protocol
from fedtune.attacks.plan import update_context
from fedtune.client.algorithms import ClientSide
from fedtune.models.weights import load_shared_state, shared_state
from fedtune.task import TaskResources, client_round_seed, seed_torch

Group = tuple[int, ...]
Update = dict[str, np.ndarray]
# (resources, group, round, train message's records, global model) -> the members' honest updates
GroupTrainer = Callable[[TaskResources, Group, int, RecordDict, dict[str, np.ndarray]],
                        list[Update]]
# gives the updates of some groups formed elsewhere, or None where they could not be had
GroupSource = Callable[[], Mapping[Group, Update] | None]


@dataclass
class _RoundUpdates:
    """The colluders' updates of this process's current round."""

    resources: int  # id of the TaskResources
    server_round: int
    dispatch: int | None  # the asynchronous training call (its members' seeds derive from it)
    digest: bytes  # of the round's global model
    model: dict[str, np.ndarray]  # the global model last seen (skips the digest when it recurs)
    updates: dict[Group, Update] = field(default_factory=dict)
    sources: dict[Group, GroupSource] = field(default_factory=dict)  # not fetched yet


_ROUND: _RoundUpdates | None = None  # the current round's


def training_data(resources: TaskResources, client_id: int, shard: int,
                  server_round: int) -> AbstractContextManager[None]:
    """Where ``client_id`` trains this round: its poisoned rows while a data attack is on."""
    plan = resources.attack
    if plan.attacks(client_id, server_round) and plan.entry.acts_on == "data":
        return resources.poisoned(shard)
    return nullcontext()


def _floating(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def _digest(arrays: dict[str, np.ndarray]) -> bytes:
    hasher = hashlib.blake2b(digest_size=16)
    for name, value in arrays.items():
        hasher.update(name.encode())
        hasher.update(np.ascontiguousarray(value).view(np.uint8).ravel())
    return hasher.digest()


def group_updates(resources: TaskResources, group: tuple[int, ...], server_round: int,
                  content: RecordDict, global_arrays: dict[str, np.ndarray]
                  ) -> list[dict[str, np.ndarray]]:
    """The honest updates (float64) of every member of ``group`` this round, one at a time."""
    model, updates = resources.model, []
    for member in group:
        seed = client_round_seed(resources.config.run.seed, server_round, member,
                                 protocol.message_dispatch(content))
        seed_torch(seed)
        load_shared_state(model, global_arrays)
        plain = ClientSide(content, RecordDict(), global_arrays, resources.train_settings)
        resources.privacy.train(resources, member, seed, RecordDict(), plain.objective(model))
        trained = shared_state(model, copy=False)
        updates.append({name: trained[name].astype(np.float64) - value
                        for name, value in global_arrays.items() if _floating(value)})
    return updates


def _round_updates(resources: TaskResources, server_round: int, content: RecordDict,
                   global_arrays: dict[str, np.ndarray]) -> _RoundUpdates:
    """This round's colluders' updates (a new round or dispatch, or another run's resources
    or global model, forgets the last)."""
    global _ROUND
    current, dispatch = _ROUND, protocol.message_dispatch(content)
    if (current is not None and current.resources == id(resources)
            and current.server_round == server_round and current.dispatch == dispatch
            and (current.model is global_arrays or current.digest == _digest(global_arrays))):
        current.model = global_arrays
        return current
    _ROUND = _RoundUpdates(id(resources), server_round, dispatch, _digest(global_arrays),
                           global_arrays)
    return _ROUND


def formed_update(resources: TaskResources, group: Group, server_round: int,
                  content: RecordDict, global_arrays: dict[str, np.ndarray],
                  train_group: GroupTrainer = group_updates) -> Update:
    """What every colluder of ``group`` sends this round, from the members' honest updates
    (``train_group``); the attack's context is drawn for the group's first member, so every
    process that forms it forms the same."""
    plan = resources.attack
    benign = train_group(resources, group, server_round, content, global_arrays)
    context = update_context(resources.config, plan, server_round, group[0], benign)
    shapes = {name: value for name, value in global_arrays.items() if _floating(value)}
    # numpy's BLAS with the threads torch has here (a client's share): at its default of a
    # thread per core it spins against the other processes (min-max: 6x the wall time at load 10)
    with threadpool_limits(torch.get_num_threads(), user_api="blas"):
        return plan.entry.load()(context, shapes)


def group_update(resources: TaskResources, group: Group, server_round: int,
                 content: RecordDict, global_arrays: dict[str, np.ndarray],
                 train_group: GroupTrainer = group_updates) -> Update:
    """``group``'s update this round: known, received (``receive_group_updates``) or formed
    here (``formed_update``), once a round in this process."""
    current = _round_updates(resources, server_round, content, global_arrays)
    source = current.sources.get(group)
    if group not in current.updates and source is not None:
        for other in [g for g, s in current.sources.items() if s is source]:
            del current.sources[other]
        current.updates.update(source() or {})
    if group not in current.updates:
        current.updates[group] = formed_update(resources, group, server_round, content,
                                               global_arrays, train_group)
    return current.updates[group]


def receive_group_updates(resources: TaskResources, server_round: int, content: RecordDict,
                          global_arrays: dict[str, np.ndarray], groups: list[Group],
                          source: GroupSource) -> None:
    """The updates of ``groups`` this round (``content``: the train message's records) are
    formed in another process: ``source`` gives them when a colluder of one first needs them
    (where it gives None, they are formed here)."""
    current = _round_updates(resources, server_round, content, global_arrays)
    for group in groups:
        if group not in current.updates:
            current.sources[group] = source


def attacked_update(resources: TaskResources, client_id: int, server_round: int,
                    content: RecordDict, global_arrays: dict[str, np.ndarray],
                    local_arrays: dict[str, np.ndarray],
                    train_group: GroupTrainer = group_updates) -> dict[str, np.ndarray]:
    """What attacker ``client_id`` sends instead of its honest model ``local_arrays``
    (``train_group``: how its collusion group's honest updates are trained)."""
    plan = resources.attack
    entry = plan.entry
    honest = {name: local_arrays[name].astype(np.float64) - value
              for name, value in global_arrays.items() if _floating(value)}
    if entry.needs_benign:
        sent = group_update(resources, plan.group_of(client_id), server_round, content,
                            global_arrays, train_group)
    elif entry.acts_on == "update":
        context = update_context(resources.config, plan, server_round, client_id, [])
        sent = entry.load()(context, honest)
    else:
        boost = float(plan.settings["boost"]) if "boost" in entry.keys else 1.0
        sent = {name: boost * value for name, value in honest.items()}
    return {name: (global_arrays[name] + sent[name]).astype(value.dtype) if name in sent
            else value.copy() for name, value in local_arrays.items()}
