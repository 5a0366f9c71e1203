"""A collusion group's update formed once a round on the Ray engine, not once per actor.

An attack whose colluders see their group's honest updates (ALIE, IPM, min-max, min-sum:
``fedtune.client.attacking``) has each colluder train every member of its group and derive
the update they all send. A process forms a group's update once a round; on the Ray engine a
train phase's blocks are spread over the actors, and a group of attackers drawn from the whole
federation has members in nearly every block, so every actor would train the whole group (and
min-max's statistics) itself. Instead, when the driver hands out a train phase
(``RayGrid.run_cohort``), the groups with an attacker in the cohort (``colluding_groups``) are
dealt over the actors, one call each before any of the phase's blocks (``start_forming``:
that actor forms them exactly as ``run_block`` would, ``fedtune.engine.cohort
.colluders_updates``), and every block call carries the calls' object refs. An actor that meets
a colluder of a group it did not form fetches the group's update from Ray's object store then
(``receive``); blocks do not wait for it before that. Whoever forms a group's update forms the
same bits (the members' round seeds, the attack's context drawn for the group's first member),
so a run's results do not depend on which actor formed it, nor on the runtime; where the
update cannot be fetched (its actor died), the actor forms it itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import ray
from flwr.app import MessageType, RecordDict

from fedtune import protocol
from fedtune.attacks.plan import AttackPlan
from fedtune.client.attacking import Group, Update, receive_group_updates
from fedtune.engine.cohort import BlockClient, DecodedContent
from fedtune.task import TaskResources

# the groups one actor forms and the object ref of its call
Forming = tuple[list[Group], ray.ObjectRef]


def colluding_groups(plan: AttackPlan, clients: list[BlockClient], message_type: str,
                     content: RecordDict) -> list[Group]:
    """The collusion groups whose update attackers among ``clients`` send in the phase of
    ``content``: none outside a train phase or for an attack that needs no honest updates."""
    if (message_type != MessageType.TRAIN or not plan.active
            or not plan.entry.needs_benign):
        return []
    server_round = int(content[protocol.CONFIG].get(protocol.SERVER_ROUND, 0))
    attacking = {c.client_id for c in clients if plan.attacks(c.client_id, server_round)}
    return [group for group in plan.groups if attacking.intersection(group)]


def start_forming(actors: list[ray.actor.ActorHandle], content: ray.ObjectRef,
                  groups: list[Group]) -> list[Forming]:
    """Deal ``groups`` over ``actors`` (the least busy first) and ask each to form its share
    from the phase's records ``content`` before its blocks: one call per actor."""
    if not actors:
        return []  # each actor forms the groups it meets
    shares: list[list[Group]] = [[] for _ in actors]
    for i, group in enumerate(groups):
        shares[i % len(actors)].append(group)
    return [(share, actor.colluders.remote((content,), share))
            for actor, share in zip(actors, shares, strict=True) if share]


def receive(resources: TaskResources, content: DecodedContent, forming: list[Forming]) -> None:
    """Let the colluders of this actor's blocks take the groups' updates formed elsewhere
    (fetched once, when one first needs them)."""
    for groups, ref in forming:
        receive_group_updates(resources, content.server_round, content.records,
                              content.arrays[protocol.ARRAYS], groups,
                              lambda ref=ref: _fetched(ref))


def _fetched(ref: ray.ObjectRef) -> Mapping[Group, Update] | None:
    """What another actor formed, or None where it cannot be had (that actor died)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError:
        return None
