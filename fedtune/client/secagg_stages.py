"""The client side of SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, CCS 2020).

Three stages arrive as messages of type ``protocol.SECAGG_MESSAGE_TYPE`` (``secagg_stage``):

- **setup**: draw this round's key pairs and self-mask seed, compute the neighbours from the
  public graph seed (``fedtune.secagg.graph``), answer with the two public keys;
- **share-keys**: Shamir-split the self-mask seed and the mask key's seed among the neighbours
  the server names (``fedtune.secagg.keys``), seal each neighbour's shares for it (a key per
  direction), answer with the ciphertexts, a commitment to the self-mask seed and, per peer,
  commitments to the keys of both directions;
- **unmask**: hand back the self-mask seed shares of the neighbours whose input arrived and the
  key shares of those that dropped - never both for one neighbour, and only once.

The masked input is the train message itself: ``secagg_train_mod`` (a Flower client mod around
the ClientApp's train function) opens the forwarded shares, lets the client train, and replaces
the reply's summed ArrayRecords by one masked vector (``fedtune.secagg.masking``). A share that
does not open is left out - no mask with its sender, none of its shares kept - and the reply
names the sender and reveals that direction's key, so the server can tell who is at fault. Under
distributed DP it first clips the update to the server's L2 bound and adds this client's share
of the Gaussian noise, drawn from ``strategies.noise.SecureRandom`` (ChaCha20 keyed by OS
entropy; the server knows the run's seed, so seeded noise could be subtracted again). Its
reply metrics (training loss, example counts) still reach the server in clear: the DP
guarantee covers the update only (docs/privacy.md). Only with
``privacy.insecure_reproducible_noise``, and a node config that allows it, is the noise seeded
from the client's round seed (not private).

A client refuses - raises, so the runtime answers with an error reply - a stage out of order, a
message of another session (a replay), neighbours it did not compute itself, fewer neighbours
than the threshold, a threshold not above half its neighbours, a peer key that is not a P-384
point, fewer shares that open than the threshold, a non-finite update, and an unmask request
that names a neighbour both alive and dead or comes a second time. Its keys live in
``Context.state`` for one round and are wiped when it hands over its shares (or crashes).

Flower's ``secaggplus_mod`` was the guide for the stages; it is not used because it reads the
legacy record layout (``FitRes``), masks with a 32-bit-seeded Mersenne Twister and neither binds
shares to a round nor checks the neighbour graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedtune import protocol
from fedtune.faults import FaultPlan
from fedtune.secagg import graph, keys, masking
from fedtune.tables.strategies import STRATEGIES
from fedtune.task import client_round_seed, parsed_run_config
from strategies.noise import SecureRandom

# fields of the client's state record (its own business, never sent)
_MASK_SEED = "mask-seed"
_SEAL_PRIVATE = "seal-private"
_SELF_SEED = "self-seed"
_NEIGHBOURS = "neighbours"
_PEER_MASK_KEYS = "peer-pk-mask"
_SEAL_KEYS = "seal-keys"  # the key each peer seals its shares for this client with
_SEED_SHARES = "seed-shares"
_KEY_SHARES = "key-shares"
_SECRETS = (_MASK_SEED, _SEAL_PRIVATE, _SELF_SEED, _SEAL_KEYS, _SEED_SHARES, _KEY_SHARES)
_SETTINGS = (protocol.SA_ROUND, protocol.SA_THRESHOLD, protocol.SA_BITS,
             protocol.SA_RING_BITS, protocol.SA_CLIP_RANGE, protocol.SA_DP_CLIP,
             protocol.SA_DP_STD, protocol.SA_WEIGHT, protocol.SA_RECORDS, protocol.SA_DELTAS,
             protocol.SA_KEPT, protocol.SA_GRAPH_SEED)
_NOISE_STREAM = 0x5EC  # seed stream of the noise share in the insecure reproducible mode


class ProtocolViolation(ValueError):
    """A SecAgg+ message this client refuses to act on."""


def _ids(values: Any) -> list[int]:
    return [int(v) for v in values]


def _node_ids(values: list[int]) -> list[str]:
    return [str(v) for v in values]


def _state(context: Context) -> ConfigRecord:
    if protocol.SECAGG_STATE not in context.state:
        context.state[protocol.SECAGG_STATE] = ConfigRecord()
    return context.state[protocol.SECAGG_STATE]


def _wipe(state: ConfigRecord) -> None:
    for name in _SECRETS:
        state.pop(name, None)


def _expect(state: ConfigRecord, config: ConfigRecord, previous: str) -> None:
    """The message continues this client's session right after ``previous``."""
    session = config.get(protocol.SA_SESSION)
    if state.get(protocol.SA_SESSION) != session:
        raise ProtocolViolation(f"message of session {session!r}, but this client is in "
                                f"{state.get(protocol.SA_SESSION)!r} (replayed or stale)")
    if state.get(protocol.SA_STAGE) != previous:
        raise ProtocolViolation(f"stage {config.get(protocol.SA_STAGE)!r} after "
                                f"{state.get(protocol.SA_STAGE)!r} instead of after {previous!r}")


def _reply(msg: Message, stage: str, session: str, values: dict[str, Any],
           content: RecordDict | None = None) -> Message:
    out = content if content is not None else RecordDict()
    out[protocol.SECAGG] = ConfigRecord({protocol.SA_STAGE: stage, protocol.SA_SESSION: session,
                                         **values})
    return Message(out, reply_to=msg)


def _crash(context: Context, stage: str, server_round: int) -> None:
    """The ``[faults]`` crash injection, at a protocol stage; a crashed client forgets."""
    config = parsed_run_config(context.run_config)
    client_id = int(context.node_config[protocol.PARTITION_ID])
    plan = FaultPlan.from_config(config)
    if plan.crashes_at(client_id, server_round, stage):
        _wipe(_state(context))
        plan.check_crash(client_id, server_round, stage)


# --- setup, share-keys, unmask --------------------------------------------------------------

def secagg_stage(msg: Message, context: Context) -> Message:
    """Answer one SecAgg+ stage message (registered for ``protocol.SECAGG_MESSAGE_TYPE``)."""
    config = msg.content[protocol.SECAGG]
    stage = config.get(protocol.SA_STAGE)
    state = _state(context)
    server_round = int(config.get(protocol.SA_ROUND, state.get(protocol.SA_ROUND, 0)))
    _crash(context, str(stage), server_round)
    node = msg.metadata.dst_node_id
    if stage == protocol.STAGE_SETUP:
        values = _setup(state, config, node, context)
    elif stage == protocol.STAGE_SHARE_KEYS:
        values = _share_keys(state, config, node)
    elif stage == protocol.STAGE_UNMASK:
        values = _unmask(state, config)
    else:
        raise ProtocolViolation(f"unknown SecAgg+ stage {stage!r}")
    state[protocol.SA_STAGE] = stage
    return _reply(msg, str(stage), str(config[protocol.SA_SESSION]), values)


def _setup(state: ConfigRecord, config: ConfigRecord, node: int, context: Context
           ) -> dict[str, Any]:
    session, server_round = str(config[protocol.SA_SESSION]), int(config[protocol.SA_ROUND])
    if state.get(protocol.SA_SESSION) == session:
        raise ProtocolViolation(f"session {session!r} was set up already (replayed)")
    if server_round < int(state.get(protocol.SA_ROUND, 0)):
        raise ProtocolViolation(f"set-up for round {server_round} after round "
                                f"{state.get(protocol.SA_ROUND)} (replayed)")
    nodes = _ids(config[protocol.SA_NODES])
    if node not in nodes:
        raise ProtocolViolation(f"node {node} is not among the sampled nodes")
    neighbours = graph.neighbours(nodes, int(config[protocol.SA_DEGREE]),
                                  int(config[protocol.SA_GRAPH_SEED]))[node]
    threshold = int(config[protocol.SA_THRESHOLD])
    if not len(neighbours) < 2 * threshold <= 2 * len(neighbours):
        raise ProtocolViolation(f"threshold {threshold} with {len(neighbours)} neighbours: must "
                                "be above half of them (and at most all)")
    bits, ring_bits = int(config[protocol.SA_BITS]), int(config[protocol.SA_RING_BITS])
    if not 1 <= bits <= 30 or ring_bits not in masking.RING_BITS:
        raise ProtocolViolation(f"bits = {bits}, ring bits = {ring_bits}: must be 1..30 and "
                                f"one of {masking.RING_BITS}")
    _wipe(state)
    state.clear()
    state[protocol.SA_SESSION] = session
    state[_NEIGHBOURS] = _node_ids(sorted(neighbours))
    for name in _SETTINGS:
        state[name] = config[name]
    mask_seed = keys.new_seed()
    seal_private, seal_public = keys.new_seal_key()
    state[_MASK_SEED], state[_SEAL_PRIVATE] = mask_seed, seal_private
    state[_SELF_SEED] = keys.new_seed()
    return {protocol.SA_PK_MASK: keys.public_bytes(keys.mask_private_key(mask_seed)),
            protocol.SA_PK_SEAL: seal_public,
            protocol.PARTITION_ID: int(context.node_config[protocol.PARTITION_ID])}


def _share_keys(state: ConfigRecord, config: ConfigRecord, node: int) -> dict[str, Any]:
    _expect(state, config, protocol.STAGE_SETUP)
    session = str(state[protocol.SA_SESSION])
    peers = _ids(config[protocol.SA_PEERS])
    mask_keys, seal_keys = list(config[protocol.SA_PK_MASK]), list(config[protocol.SA_PK_SEAL])
    neighbours = set(_ids(state[_NEIGHBOURS]))
    threshold = int(state[protocol.SA_THRESHOLD])
    if len(set(peers)) != len(peers) or not set(peers) <= neighbours:
        raise ProtocolViolation(f"the server names peers {sorted(set(peers) - neighbours)} that "
                                "are not this client's neighbours, or names one twice")
    if len(peers) < threshold or len(mask_keys) != len(peers) or len(seal_keys) != len(peers):
        raise ProtocolViolation(f"{len(peers)} peers with keys, {threshold} needed")
    if len(set(mask_keys) | set(seal_keys)) != 2 * len(peers):
        raise ProtocolViolation("two peers share a public key")
    if not all(map(keys.is_public_key, mask_keys + seal_keys)):
        raise ProtocolViolation("a peer's public key is not a P-384 point")
    seed_shares = keys.split(bytes(state[_SELF_SEED]), threshold, len(peers))
    key_shares = keys.split(bytes(state[_MASK_SEED]), threshold, len(peers))
    sealing = keys.seal_keys(bytes(state[_SEAL_PRIVATE]), seal_keys)
    outgoing = [keys.direction_key(pair, session, node, peer)
                for peer, pair in zip(peers, sealing, strict=True)]
    incoming = [keys.direction_key(pair, session, peer, node)
                for peer, pair in zip(peers, sealing, strict=True)]
    ciphertexts = [keys.seal(key, session, node, peer, seed_share, key_share)
                   for peer, key, seed_share, key_share
                   in zip(peers, outgoing, seed_shares, key_shares, strict=True)]
    state[protocol.SA_PEERS] = _node_ids(peers)
    # the keys that open the peers' shares at the next stage; secrets, wiped with the rest
    state[_PEER_MASK_KEYS], state[_SEAL_KEYS] = mask_keys, incoming
    return {protocol.SA_PEERS: _node_ids(peers), protocol.SA_CIPHERTEXTS: ciphertexts,
            protocol.SA_COMMITMENT: keys.commitment(session, node, bytes(state[_SELF_SEED])),
            protocol.SA_SEAL_OUT: [keys.key_commitment(session, node, peer, key)
                                   for peer, key in zip(peers, outgoing, strict=True)],
            protocol.SA_SEAL_IN: [keys.key_commitment(session, peer, node, key)
                                  for peer, key in zip(peers, incoming, strict=True)]}


def _unmask(state: ConfigRecord, config: ConfigRecord) -> dict[str, Any]:
    _expect(state, config, protocol.STAGE_MASKED_INPUT)
    alive, dead = _ids(config[protocol.SA_ALIVE]), _ids(config[protocol.SA_DEAD])
    owners = _ids(state[protocol.SA_OWNERS])
    if set(alive) & set(dead):
        raise ProtocolViolation(f"nodes {sorted(set(alive) & set(dead))} named both alive and "
                                "dead: that would reveal both of their secrets")
    if len(set(alive)) + len(set(dead)) != len(alive) + len(dead) or not set(
            alive + dead) <= set(owners):
        raise ProtocolViolation("the unmask request names a node twice, or one whose shares "
                                "this client does not hold")
    if len(alive) + 1 < int(state[protocol.SA_THRESHOLD]):
        raise ProtocolViolation(f"only {len(alive)} neighbours alive: the sum would cover fewer "
                                f"than the threshold {state[protocol.SA_THRESHOLD]}")
    index = {owner: i for i, owner in enumerate(owners)}
    seed_shares, key_shares = list(state[_SEED_SHARES]), list(state[_KEY_SHARES])
    shares = ([seed_shares[index[v]] for v in alive] + [key_shares[index[v]] for v in dead])
    _wipe(state)
    return {protocol.SA_OWNERS: _node_ids(alive + dead), protocol.SA_SHARES: shares}


# --- the masked input: a mod around the train function ------------------------------------------

def _open_shares(state: ConfigRecord, config: ConfigRecord, node: int
                 ) -> tuple[list[int], dict[str, Any]]:
    """Open the shares the server forwarded; returns the sources whose shares opened (this
    client's pairwise set) and, for the others, the refusal its reply carries: their ids and
    the keys they did not open with and the shares as they arrived (``SA_REFUSED``,
    ``SA_REVEALED``, ``SA_RECEIVED``)."""
    session, threshold = str(state[protocol.SA_SESSION]), int(state[protocol.SA_THRESHOLD])
    sources = _ids(config[protocol.SA_PEERS])
    ciphertexts = list(config[protocol.SA_CIPHERTEXTS])
    peers = _ids(state[protocol.SA_PEERS])
    if (len(set(sources)) != len(sources) or not set(sources) <= set(peers)
            or len(ciphertexts) != len(sources)):
        raise ProtocolViolation("forwarded shares come from a node that is not a peer, or twice")
    incoming = dict(zip(peers, state[_SEAL_KEYS], strict=True))
    opened, seed_shares, key_shares, refused, received = [], [], [], [], []
    for source, ciphertext in zip(sources, ciphertexts, strict=True):
        try:
            seed_share, key_share = keys.open_sealed(incoming[source], ciphertext, session,
                                                     source, node)
        except keys.ShareRejected:
            refused.append(source)
            received.append(bytes(ciphertext))
            continue
        opened.append(source)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    if len(opened) < threshold:
        raise ProtocolViolation(f"shares that open from {len(opened)} peers, {threshold} needed"
                                + (f" (those of {refused} do not open)" if refused else ""))
    state[protocol.SA_OWNERS] = _node_ids(opened)
    state[_SEED_SHARES], state[_KEY_SHARES] = seed_shares, key_shares
    refusal: dict[str, Any] = {}
    if refused:  # a key per direction: it opens only what that sender sealed for this client
        refusal = {protocol.SA_REFUSED: _node_ids(refused),
                   protocol.SA_REVEALED: [bytes(incoming[source]) for source in refused],
                   protocol.SA_RECEIVED: received}
    return opened, refusal


def _private_values(values: np.ndarray, state: ConfigRecord,
                    rng: np.random.Generator | SecureRandom) -> np.ndarray:
    """Distributed DP: clip to the L2 bound, add this client's share of the noise."""
    bound, std = float(state[protocol.SA_DP_CLIP]), float(state[protocol.SA_DP_STD])
    if bound > 0:
        masking.clip_l2(values, bound)
    if std > 0:
        values += rng.normal(0.0, std, values.shape)
    return values


def _masked(state: ConfigRecord, node: int, sources: list[int], values: np.ndarray,
            weight: int) -> np.ndarray:
    dtype = masking.ring_dtype(int(state[protocol.SA_RING_BITS]))
    offsets = masking.dither(masking.dither_seed(int(state[protocol.SA_GRAPH_SEED]), node),
                             values.size)
    vector = masking.encode(values, weight, float(state[protocol.SA_CLIP_RANGE]),
                            int(state[protocol.SA_BITS]), dtype, offsets)
    masking.add_mask(vector, bytes(state[_SELF_SEED]), 1)
    mask_private = keys.mask_private_key(bytes(state[_MASK_SEED]))
    mask_keys = dict(zip(_ids(state[protocol.SA_PEERS]), state[_PEER_MASK_KEYS], strict=True))
    for source in sources:
        masking.add_mask(vector, keys.pairwise_seed(mask_private, mask_keys[source]),
                         masking.pair_sign(node, source))
    return vector


def secagg_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: a train message that carries ``protocol.SECAGG`` is the masked-input
    stage (others pass through untouched)."""
    if protocol.SECAGG not in msg.content:
        return call_next(msg, context)
    config, state, node = msg.content[protocol.SECAGG], _state(context), msg.metadata.dst_node_id
    _expect(state, config, protocol.STAGE_SHARE_KEYS)
    sources, refusal = _open_shares(state, config, node)
    state[protocol.SA_STAGE] = protocol.STAGE_MASKED_INPUT
    reply = call_next(msg, context)
    run_config = parsed_run_config(context.run_config)
    summed = _summed(state, run_config.strategy.name)
    if reply.has_error() or not any(s.reply in reply.content for s in summed):
        return reply  # failed, or declined (local DP budget spent): no input to mask
    values = masking.flatten(reply.content, msg.content, summed)
    if not np.isfinite(values).all():
        raise ProtocolViolation("the update is not finite: refusing to mask it (the server "
                                "could not screen it)")
    client_id = int(context.node_config[protocol.PARTITION_ID])
    server_round = int(state[protocol.SA_ROUND])
    weight = masking.integer_weight(str(state[protocol.SA_WEIGHT]),
                                    reply.content[protocol.METRICS])
    rng = (np.random.default_rng(np.random.SeedSequence(
        [client_round_seed(run_config.run.seed, server_round, client_id), _NOISE_STREAM]))
        if run_config.privacy.insecure_reproducible_noise else SecureRandom())
    vector = _masked(state, node, sources, _private_values(values, state, rng), weight)
    content = RecordDict({name: record for name, record in reply.content.items()
                          if name not in {s.reply for s in summed}})
    content[protocol.SECAGG_MASKED] = ArrayRecord({protocol.MASKED: Array(vector)})
    return _reply(msg, protocol.STAGE_MASKED_INPUT, str(state[protocol.SA_SESSION]), refusal,
                  content)


def _summed(state: ConfigRecord, strategy_name: str) -> list[masking.SummedRecord]:
    """The summed records the server announced, each with the sent record it refers to."""
    answers = STRATEGIES[strategy_name].answers
    kept = tuple(str(name) for name in state[protocol.SA_KEPT])
    out = []
    for name, delta in zip(state[protocol.SA_RECORDS], state[protocol.SA_DELTAS], strict=True):
        if not delta and name not in answers:
            raise ProtocolViolation(f"record {name!r} answers no sent record")
        out.append(masking.SummedRecord(str(name), str(name) if delta else answers[name],
                                        bool(delta), kept if delta else ()))
    return out
