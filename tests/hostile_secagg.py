"""SecAgg+ clients that run fedtune's client side and then send what an attacker would.

``tamper(attack, msg, reply, context)`` changes one client's reply to a SecAgg+ stage (``msg``
is what it received, ``context`` its own state); ``hostile_secagg_app({client: attack})`` is
fedtune's ClientApp with those clients tampering. The deployment test loads the same attacks
into one SuperNode (``tests/integration/hostile_node/sitecustomize.py``). A client's plan is one
attack (every round) or one per round ("bad-mask-key@1,bad-share@2", ``strikes``).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtune import protocol
from fedtune.client import app as fedtune_client
from fedtune.client.secagg_stages import secagg_stage, secagg_train_mod

# setup
BAD_MASK_KEY = "bad-mask-key"  # a mask public key that is no P-384 point
BAD_SEAL_KEY = "bad-seal-key"  # a seal public key that is no P-384 point
IMPERSONATE = "impersonate"  # claims partition-id 0 in its setup reply
# share-keys
SHORT_COMMITMENT = "short-commitment"  # a commitment of 5 bytes
WRONG_COMMITMENT = "wrong-commitment"  # 32 bytes, but not the commitment to its seed
BAD_SHARE = "bad-share"  # the share for its first peer altered (of the right form)
TRUNCATED_SHARE = "truncated-share"  # the share for its first peer cut short
DISAGREE = "disagree"  # a key commitment for its first peer that is not its key's
# masked input
RANDOM_INPUT = "random-input"  # a masked vector of random ring elements
SHIFTED_INPUT = "shifted-input"  # its masked vector + 2^62 (2^30 in a 32-bit ring)
FALSE_REFUSAL = "false-refusal"  # says its first source's share did not open (true key)
FALSE_KEY = "false-key"  # says so, revealing a made-up key
NOT_A_POINT = b"\x04" + b"\x01" * 96  # the length of a P-384 point, on no curve


def _record(reply: Message):
    return reply.content.config_records.get(protocol.SECAGG) if not reply.has_error() else None


def _alter_first(values, change):
    values = list(values)
    values[0] = change(values[0])
    return values


def _flip_inside(token: bytes) -> bytes:
    """A Fernet token with one ciphertext byte flipped: same form, its HMAC fails."""
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[40] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw))


def tamper(attack: str, msg: Message, reply: Message, context: Context) -> Message:
    """The reply a client running ``attack`` sends instead of its honest ``reply`` to
    ``msg``."""
    record = _record(reply)
    if record is None:
        return reply
    stage = record[protocol.SA_STAGE]
    if stage == protocol.STAGE_SETUP:
        if attack == BAD_MASK_KEY:
            record[protocol.SA_PK_MASK] = NOT_A_POINT
        elif attack == BAD_SEAL_KEY:
            record[protocol.SA_PK_SEAL] = NOT_A_POINT
        elif attack == IMPERSONATE:
            record[protocol.PARTITION_ID] = 0
    elif stage == protocol.STAGE_SHARE_KEYS:
        if attack == SHORT_COMMITMENT:
            record[protocol.SA_COMMITMENT] = b"short"
        elif attack == WRONG_COMMITMENT:
            record[protocol.SA_COMMITMENT] = bytes(32)
        elif attack == BAD_SHARE:
            record[protocol.SA_CIPHERTEXTS] = _alter_first(record[protocol.SA_CIPHERTEXTS],
                                                           _flip_inside)
        elif attack == TRUNCATED_SHARE:
            record[protocol.SA_CIPHERTEXTS] = _alter_first(record[protocol.SA_CIPHERTEXTS],
                                                           lambda token: token[:100])
        elif attack == DISAGREE:
            record[protocol.SA_SEAL_OUT] = _alter_first(record[protocol.SA_SEAL_OUT],
                                                        lambda c: bytes(32))
    elif stage == protocol.STAGE_MASKED_INPUT:
        if attack in (RANDOM_INPUT, SHIFTED_INPUT):
            vector = reply.content[protocol.SECAGG_MASKED][protocol.MASKED].numpy().copy()
            if attack == RANDOM_INPUT:
                vector = np.random.default_rng(0).integers(
                    0, np.iinfo(vector.dtype).max, vector.size, dtype=vector.dtype,
                    endpoint=True)
            else:
                vector += vector.dtype.type(1 << (8 * vector.dtype.itemsize - 2))
            reply.content[protocol.SECAGG_MASKED] = ArrayRecord({protocol.MASKED:
                                                                 Array(vector)})
        elif attack in (FALSE_REFUSAL, FALSE_KEY):
            forwarded = msg.content[protocol.SECAGG]
            source = str(forwarded[protocol.SA_PEERS][0])
            state = context.state[protocol.SECAGG_STATE]
            incoming = dict(zip(state[protocol.SA_PEERS], state["seal-keys"], strict=True))
            key = bytes(incoming[source]) if attack == FALSE_REFUSAL else bytes(44)
            record[protocol.SA_REFUSED] = [source]
            record[protocol.SA_REVEALED] = [key]
            record[protocol.SA_RECEIVED] = [bytes(forwarded[protocol.SA_CIPHERTEXTS][0])]
    return reply


def strikes(plan: str, server_round: int) -> str | None:
    """The attack to play in ``server_round``: ``plan`` names one ("x": every round) or
    several by round ("x@1,y@2")."""
    for part in plan.split(","):
        name, _, only = part.strip().partition("@")
        if name and (not only or int(only) == server_round):
            return name
    return None


def secagg_round(context: Context) -> int:
    """The round of this client's SecAgg+ session (0: none yet)."""
    state = context.state.get(protocol.SECAGG_STATE)
    return int(state.get(protocol.SA_ROUND, 0)) if state is not None else 0


def hostile_secagg_app(attacks: Mapping[int, str]) -> ClientApp:
    """fedtune's ClientApp, except that each client in ``attacks`` tampers with its SecAgg+
    replies."""
    app = ClientApp()

    def attack_of(msg: Message, context: Context) -> str | None:
        planned = attacks.get(int(context.node_config[protocol.PARTITION_ID]))
        return None if planned is None else strikes(planned, secagg_round(context))

    @app.query(protocol.SECAGG_ACTION)
    def stage(msg: Message, context: Context) -> Message:
        reply = secagg_stage(msg, context)
        attack = attack_of(msg, context)
        return reply if attack is None else tamper(attack, msg, reply, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = secagg_train_mod(msg, context, fedtune_client.train)
        attack = attack_of(msg, context)
        return reply if attack is None else tamper(attack, msg, reply, context)

    app.evaluate()(fedtune_client.evaluate_local)
    return app
