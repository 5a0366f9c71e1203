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
  first: a process computes a group's update once per round and keeps the round's (one model's
  floating tensors in float64 per group) until the next round. No colluder sees an honest
  client's update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
from flwr.app import RecordDict

from fedtune import protocol
from fedtune.attacks.plan import update_context
from fedtune.client.algorithms import ClientSide
from fedtune.models.weights import load_shared_state, shared_state
from fedtune.task import TaskResources, client_round_seed, seed_torch

# (resources, round, global model digest) -> group -> the update its colluders send; one round
_GROUP_UPDATES: dict[tuple, dict[tuple[int, ...], dict[str, np.ndarray]]] = {}
# (resources, group, round, train message's records, global model) -> the members' honest updates
GroupTrainer = Callable[[TaskResources, tuple[int, ...], int, RecordDict, dict[str, np.ndarray]],
                        list[dict[str, np.ndarray]]]


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


def colluders_update(resources: TaskResources, client_id: int, server_round: int,
                     content: RecordDict, global_arrays: dict[str, np.ndarray],
                     honest: dict[str, np.ndarray],
                     train_group: GroupTrainer = group_updates) -> dict[str, np.ndarray]:
    """What every colluder of ``client_id``'s group sends this round (computed once)."""
    plan = resources.attack
    group = plan.group_of(client_id)
    key = (id(resources), server_round, _digest(global_arrays))
    if key not in _GROUP_UPDATES:
        _GROUP_UPDATES.clear()
        _GROUP_UPDATES[key] = {}
    known = _GROUP_UPDATES[key]
    if group not in known:
        benign = train_group(resources, group, server_round, content, global_arrays)
        context = update_context(resources.config, plan, server_round, client_id, benign)
        known[group] = plan.entry.load()(context, honest)
    return known[group]


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
        sent = colluders_update(resources, client_id, server_round, content, global_arrays,
                                honest, train_group)
    elif entry.acts_on == "update":
        context = update_context(resources.config, plan, server_round, client_id, [])
        sent = entry.load()(context, honest)
    else:
        boost = float(plan.settings["boost"]) if "boost" in entry.keys else 1.0
        sent = {name: boost * value for name, value in honest.items()}
    return {name: (global_arrays[name] + sent[name]).astype(value.dtype) if name in sent
            else value.copy() for name, value in local_arrays.items()}
