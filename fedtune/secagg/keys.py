"""SecAgg+ key material, built from Flower's vetted primitives.

Each client draws, every round, two ECDH key pairs on P-384 (``flwr.supercore.primitives``):
the *mask* pair agrees a pairwise mask seed with each neighbour, the *seal* pair agrees the key
that encrypts the shares it hands that neighbour through the server (HKDF-SHA256 of the ECDH
secret, Flower's ``generate_shared_key``). Shares are sealed with Fernet (AES-CBC with
HMAC-SHA256, Flower's ``symmetric_encryption``), so the server relays them without reading
them, and a share altered on the way is refused; the plaintext names the session, the source
and the destination, so a share replayed from another round or re-addressed is refused too.
The self-mask seed and the mask key's seed are split with Shamir's scheme (Flower's ``shamir``,
over GF(2^128) chunks).

Two choices differ from Flower's legacy SecAgg+ mod, on purpose:

- the mask key pair is derived from a 32-byte seed and the *seed* is what gets shared (Flower
  shares the 306-byte DER private key): Flower's Shamir works 16-byte chunk by chunk in pure
  Python, so a 48-byte padded seed combines about 7x faster, and a reconstructed seed is
  checked against the public key the server already holds;
- the self-mask seed is committed to (SHA-256) before any share of it leaves the client, so a
  reconstruction is checked too. A reconstruction that fails its check is retried on other
  subsets of the shares; shares that disagree with the verified secret are reported as
  tampered, never used.

A share that does not open must be pinned on its sender or on the receiver who says so, and the
server cannot open it. So each direction of a pair has a key of its own (``direction_key``: HKDF
of the pair's agreed key, bound to the session, the source and the destination), and both ends
commit to both directions' keys (``key_commitment``, SHA-256) before any share is forwarded; the
server forwards shares only between two clients whose commitments agree. A receiver that cannot
open a share reveals that one direction's key: the server checks it against the commitments and
opens the share itself. It does not open: the sender is at fault; it opens: the receiver lied.
The key opens nothing but what that sender sealed for that receiver.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from itertools import combinations, islice
from math import comb

import numpy as np
from cryptography.exceptions import InvalidKey
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

SEED_BYTES = 32
SESSION_BYTES = 16
# the order of P-384 (SEC 2, section 2.5.1): a private key is an integer in [1, order - 1]
_P384_ORDER = int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
                  "581a0db248b0a77aecec196accc52973", 16)
MAX_SUBSETS = 256  # reconstruction attempts on other share subsets before giving up


class ShareRejected(ValueError):
    """A sealed share that does not open, or opens to the wrong session, source or
    destination."""


class RecoveryFailed(ValueError):
    """Too few shares, or none of their subsets reconstructs a secret that passes its check."""


def new_seed() -> bytes:
    """A fresh secret seed from the operating system (never from the run's seed: the server
    knows that one)."""
    return os.urandom(SEED_BYTES)


def new_session() -> str:
    """A fresh session id (hex) for one run of the protocol."""
    return os.urandom(SESSION_BYTES).hex()


def mask_private_key(seed: bytes) -> ec.EllipticCurvePrivateKey:
    """The mask key pair's private key, derived from ``seed`` (HKDF-SHA256 to 512 bits, reduced
    into [1, order - 1]; the bias is below 2^-128)."""
    material = HKDF(algorithm=hashes.SHA256(), length=64, salt=None,
                    info=b"fedtune secagg+ mask key").derive(seed)
    value = int.from_bytes(material, "big") % (_P384_ORDER - 1) + 1
    return ec.derive_private_key(value, ec.SECP384R1())


def public_bytes(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    return public_key_to_bytes(private_key.public_key())


def new_seal_key() -> tuple[bytes, bytes]:
    """(private, public) key bytes of a fresh key pair for sealing shares."""
    private_key, public_key = generate_key_pairs()
    return private_key_to_bytes(private_key), public_key_to_bytes(public_key)


def pairwise_seed(private_key: ec.EllipticCurvePrivateKey, peer_public: bytes) -> bytes:
    """The 32-byte pairwise mask seed two neighbours agree on."""
    return base64.urlsafe_b64decode(generate_shared_key(private_key,
                                                        bytes_to_public_key(peer_public)))


def seal_keys(private_bytes: bytes, peer_publics: list[bytes]) -> list[bytes]:
    """The Fernet keys a client agrees with each of its peers for sealing shares (its private
    key parsed once: parsing costs about half an ECDH)."""
    private_key = bytes_to_private_key(private_bytes)
    return [generate_shared_key(private_key, bytes_to_public_key(peer)) for peer in peer_publics]


def direction_key(pair_key: bytes, session: str, src: int, dst: int) -> bytes:
    """The Fernet key ``src`` seals its shares for ``dst`` with, from the key the pair agreed
    (``seal_keys``): one key per direction and session, so revealing it opens nothing else."""
    info = (b"fedtune secagg+ seal" + bytes.fromhex(session) + src.to_bytes(8, "little")
            + dst.to_bytes(8, "little"))
    material = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=info).derive(base64.urlsafe_b64decode(pair_key))
    return base64.urlsafe_b64encode(material)


def key_commitment(session: str, src: int, dst: int, key: bytes) -> bytes:
    """SHA-256 commitment to the direction key ``src`` -> ``dst`` (both ends send it)."""
    return hashlib.sha256(b"fedtune secagg+ seal key" + bytes.fromhex(session)
                          + src.to_bytes(8, "little") + dst.to_bytes(8, "little")
                          + key).digest()


COMMITMENT_BYTES = 32  # a SHA-256 digest
SHARE_BYTES = 52  # a Shamir share of a 32-byte secret: 4 index bytes, 3 chunks of 16


@lru_cache(maxsize=1)
def sealed_length() -> int:
    """The length of every sealed pair of shares (Fernet: version, time, IV, the padded
    plaintext of session, source, destination and two shares, HMAC; base64url)."""
    share = bytes(SHARE_BYTES)
    return len(seal(Fernet.generate_key(), bytes(SESSION_BYTES).hex(), 0, 0, share, share))


def is_sealed_form(ciphertext: object) -> bool:
    """Whether ``ciphertext`` has the form of a sealed pair of shares (its length, base64url,
    Fernet's version byte): what the server can check of it before forwarding it."""
    if not isinstance(ciphertext, bytes) or len(ciphertext) != sealed_length():
        return False
    try:
        return base64.urlsafe_b64decode(ciphertext)[:1] == b"\x80"
    except ValueError:
        return False


def is_public_key(data: object) -> bool:
    """Whether ``data`` is a P-384 public key (a point on the curve), as a peer must parse it."""
    if not isinstance(data, bytes):
        return False
    try:
        key = bytes_to_public_key(data)
    except (ValueError, TypeError):
        return False
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)


def seal(key: bytes, session: str, src: int, dst: int, seed_share: bytes,
         key_share: bytes) -> bytes:
    """Encrypt ``src``'s shares for ``dst`` in ``session``."""
    plaintext = bytes.fromhex(session) + share_keys_plaintext_concat(src, dst, seed_share,
                                                                     key_share)
    return encrypt(key, plaintext)


def open_sealed(key: bytes, ciphertext: bytes, session: str, src: int, dst: int
                ) -> tuple[bytes, bytes]:
    """(seed share, key share) that ``src`` sealed for ``dst`` in ``session``; raises
    ``ShareRejected`` when the ciphertext was altered or belongs elsewhere."""
    try:
        plaintext = decrypt(key, ciphertext)
    except (InvalidToken, ValueError, TypeError):
        raise ShareRejected(f"the share from node {src} does not open: altered, or sealed "
                            "for another key") from None
    if plaintext[:SESSION_BYTES] != bytes.fromhex(session):
        raise ShareRejected(f"the share from node {src} belongs to another session (replayed)")
    sealed_src, sealed_dst, seed_share, key_share = share_keys_plaintext_separate(
        plaintext[SESSION_BYTES:])
    if (sealed_src, sealed_dst) != (src, dst):
        raise ShareRejected(f"the share relayed as {src} -> {dst} was sealed as {sealed_src} -> "
                            f"{sealed_dst}")
    return seed_share, key_share


def commitment(session: str, node: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a client's self-mask seed in one session."""
    return hashlib.sha256(b"fedtune secagg+ commitment" + bytes.fromhex(session)
                          + node.to_bytes(8, "little") + seed).digest()


def split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` Shamir shares of ``secret``, any ``threshold`` of which reconstruct it."""
    return create_shares(secret, threshold, count)


def _combine(shares: list[bytes]) -> bytes | None:
    try:
        return combine_shares(shares)
    except (ValueError, TypeError, IndexError):
        return None


def _passes(check: Callable[[bytes], bool], secret: bytes | None) -> bool:
    if secret is None:
        return False
    try:
        return check(secret)
    except (ValueError, TypeError, InvalidKey):
        return False


def recover(shares: Mapping[int, bytes], threshold: int, check: Callable[[bytes], bool]
            ) -> tuple[bytes, list[int]]:
    """(the secret, holders whose shares disagree with it) from ``shares`` (holder -> share).

    The first ``threshold`` shares (by holder) are combined; when the result fails ``check``,
    other subsets are tried (at most ``MAX_SUBSETS``, or ``threshold + 1``), and every share
    outside the subset that passed is tested against it. Where there are too many subsets to
    try them all, the ``threshold`` subsets of the first ``threshold + 1`` shares come next
    (one bad share among them is left out by one), then subsets drawn at random (a fixed
    seed): in order, one bad share held by the lowest holder would be in the first thousands
    of them. So with more than ``threshold`` shares one tampering holder can never make an
    honest client's secret unrecoverable (and the server never blames its dealer for it).
    """
    holders = sorted(shares)
    if len(holders) < threshold:
        raise RecoveryFailed(f"{len(holders)} shares, {threshold} needed")
    attempts = max(MAX_SUBSETS, threshold + 1)
    for index, subset in enumerate(islice(_subsets(holders, threshold), attempts)):
        secret = _combine([shares[h] for h in subset])
        if not _passes(check, secret):
            continue
        if index == 0:
            return secret, []
        base = [shares[h] for h in subset[:threshold - 1]]
        tampered = [h for h in holders
                    if h not in subset and _combine(base + [shares[h]]) != secret]
        return secret, tampered
    raise RecoveryFailed(f"no {threshold} of the {len(holders)} shares reconstruct a secret "
                         "that passes its check")


def _subsets(holders: list[int], size: int) -> Iterator[tuple[int, ...]]:
    """Every ``size``-subset of ``holders`` when there are few of them (in order), else the
    ``size + 1`` subsets of the first ``size + 1`` holders and then random ones."""
    if comb(len(holders), size) <= MAX_SUBSETS:
        yield from combinations(holders, size)
        return
    first = holders[:size + 1]
    for left_out in reversed(range(size + 1)):  # the first ``size`` holders come first
        yield tuple(holder for i, holder in enumerate(first) if i != left_out)
    rng = np.random.default_rng(len(holders))  # which subsets are tried changes no result
    while True:
        yield tuple(sorted(rng.choice(holders, size, replace=False).tolist()))


def seed_check(session: str, node: int, committed: bytes) -> Callable[[bytes], bool]:
    """Does a reconstructed self-mask seed match ``node``'s commitment?"""
    return lambda seed: commitment(session, node, seed) == committed


def key_check(mask_public: bytes) -> Callable[[bytes], bool]:
    """Does a reconstructed mask-key seed give ``mask_public``?"""
    return lambda seed: len(seed) == SEED_BYTES and public_bytes(
        mask_private_key(seed)) == mask_public
