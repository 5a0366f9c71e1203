"""The federation's publisher key: it signs the app (FAB) every party agrees to run.

Flower 1.41's SuperNode started with ``--trusted-entities`` runs a FAB only if a trusted key
(public key id -> Ed25519 public key) signed it: the signature is over
``signed_at (8 bytes, big endian) || SHA-256(FAB)`` (Flower's ``create_message_to_sign``), and
the SuperLink hands it to the SuperNode beside the FAB. In 1.41 a SuperLink attaches
signatures only to an app it fetches from an app registry (the Flower Hub API, at
``FLWR_SUPERGRID_API_URL``), never to a FAB uploaded with ``flwr run .``: a SuperNode with
trusted entities refuses every uploaded app, a stranger's and the operator's alike.
``fedtune publish`` therefore builds the app's FAB, signs it with the publisher key and puts
both into the federation's own registry folder, which ``fedtune registry``
(``fedtune.deploy.registry``) serves to the SuperLink; ``fedtune superexec``
(``fedtune.deploy.superexec``) starts a ServerApp only for a FAB that is signed the same way.

The primitives (key format, message, signature) are Flower's own
(``flwr.supercore.primitives.asymmetric_ed25519``), so what is signed here is exactly what a
SuperNode checks.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fab_config, get_metadata_from_config
from flwr.supercore.primitives.asymmetric_ed25519 import (
    create_message_to_sign,
    decode_base64url,
    load_private_key,
    sign_message,
    verify_signature,
)

from fedtune.errors import ConfigError

Verification = dict[str, str | int]  # one signature as a registry hands it out


def make_publisher_key() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key) of a new Ed25519 publisher key."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b" fedtune-publisher\n"


def key_id(public_openssh: bytes) -> str:
    """A public key's id in trusted-entities files and signatures: ``fpk_`` and the first 16
    hex digits of the SHA-256 of its key bytes (Flower's ids look like ``fpk_<uuid>``)."""
    key_bytes = public_openssh.split()[1]
    return "fpk_" + hashlib.sha256(key_bytes).hexdigest()[:16]


def trusted_entities_yaml(public_openssh: bytes) -> str:
    """The ``--trusted-entities`` file that trusts exactly this publisher key."""
    entry = public_openssh.decode("ascii").strip()
    return yaml.safe_dump({key_id(public_openssh): entry}, width=1000)


def read_trusted_entities(path: Path) -> dict[str, str]:
    """A trusted-entities YAML file (public key id -> OpenSSH Ed25519 public key)."""
    try:
        entities = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"trusted entities {str(path)!r} cannot be read: {error}") from None
    if not isinstance(entities, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in entities.items()):
        raise ConfigError(f"trusted entities {str(path)!r} must map key ids to public keys")
    return entities


def sign_fab(fab: bytes, private_key_path: Path, signed_at: int | None = None
             ) -> Verification:
    """The publisher's signature of ``fab``, as a registry hands it to a SuperLink."""
    try:
        key = load_private_key(Path(private_key_path))
    except (OSError, ValueError) as error:
        raise ConfigError(f"publisher key {str(private_key_path)!r} cannot be used: {error} "
                          "(must be the Ed25519 key `fedtune certs` made)") from None
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    when = int(datetime.now(UTC).timestamp()) if signed_at is None else signed_at
    signature = sign_message(key, create_message_to_sign(hashlib.sha256(fab).digest(), when))
    return {"public_key_id": key_id(public),
            "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
            "signed_at": when}


def is_signed(fab: bytes, verifications: Sequence[Mapping[str, str | int]],
              trusted: Mapping[str, str]) -> bool:
    """Whether one of ``trusted`` signed ``fab`` (the check a SuperNode makes)."""
    digest = hashlib.sha256(fab).digest()
    for record in verifications:
        public = trusted.get(str(record.get("public_key_id")))
        if public is None:
            continue
        key = serialization.load_ssh_public_key(public.encode("ascii"))
        if not isinstance(key, ed25519.Ed25519PublicKey):
            continue
        message = create_message_to_sign(digest, int(record["signed_at"]))
        if verify_signature(key, message, decode_base64url(str(record["signature"]))):
            return True
    return False


@dataclass(frozen=True)
class Published:
    """What ``publish`` put into a registry."""

    app_id: str  # "@publisher/name", what `flwr run` takes
    version: str
    fab: Path
    fab_hash: str

    @property
    def spec(self) -> str:
        return f"{self.app_id}=={self.version}"


def app_files(registry: Path, app_id: str, version: str) -> tuple[Path, Path]:
    """(FAB, signatures) of an app version in a registry folder."""
    publisher, name = app_id.removeprefix("@").split("/", 1)
    folder = Path(registry) / publisher / name
    return folder / f"{version}.fab", folder / f"{version}.json"


def publish(app_dir: Path, registry: Path, private_key_path: Path) -> Published:
    """Build ``app_dir``'s FAB (as ``flwr run`` would), sign it and store both in
    ``registry``; an app version is never overwritten."""
    fab = build_fab_from_disk(Path(app_dir))
    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    app_id = f"@{fab_id}"
    fab_path, signatures_path = app_files(registry, app_id, version)
    if fab_path.exists():
        raise ConfigError(f"{app_id}=={version} is in {registry} already: raise the version in "
                          "pyproject.toml to publish a change")
    verification = sign_fab(fab, private_key_path)
    fab_path.parent.mkdir(parents=True, exist_ok=True)
    fab_path.write_bytes(fab)
    signatures_path.write_text(json.dumps([verification], indent=1), encoding="utf-8")
    return Published(app_id, version, fab_path, hashlib.sha256(fab).hexdigest())


@dataclass(frozen=True)
class SignedFab:
    """A FAB of the registry that a trusted key signed, named by its own metadata (what is
    signed), never by its file name."""

    app_id: str  # "@publisher/name"
    version: str
    fab_hash: str

    @property
    def spec(self) -> str:
        return f"{self.app_id}=={self.version}"


def signed_fabs(registry: Path, trusted: Mapping[str, str]) -> list[SignedFab]:
    """Every FAB in ``registry`` that a trusted key signed."""
    found = []
    for fab_path in sorted(Path(registry).glob("*/*/*.fab")):
        signatures = fab_path.with_suffix(".json")
        if not signatures.is_file():
            continue
        fab = fab_path.read_bytes()
        try:
            signed = is_signed(fab, json.loads(signatures.read_text(encoding="utf-8")), trusted)
            fab_id, version = get_metadata_from_config(get_fab_config(fab))
        except (ValueError, KeyError, TypeError):  # a damaged file is simply not accepted
            continue
        if signed:
            found.append(SignedFab(f"@{fab_id}", version, hashlib.sha256(fab).hexdigest()))
    return found


def signed_fab_hashes(registry: Path, trusted: Mapping[str, str]) -> set[str]:
    """SHA-256 of every FAB in ``registry`` that a trusted key signed."""
    return {fab.fab_hash for fab in signed_fabs(registry, trusted)}


# --- retiring versions ----------------------------------------------------------------------------
# A signature never expires (a SuperNode checks only that a trusted key made it), so every
# version ever published would stay runnable by whoever reaches the SuperLink's Control API.
# The ServerApp's gate, ``fedtune superexec``, accepts only what the operator still accepts.

@dataclass(frozen=True)
class AcceptPolicy:
    """Which signed versions ``fedtune superexec`` starts: with ``allow`` (spec -> expiry, None
    = none) exactly the listed versions until they expire; otherwise the newest version of each
    app (``newest_only``), or every signed one."""

    newest_only: bool = True
    allow: Mapping[str, datetime | None] | None = None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def accepted_fab_hashes(registry: Path, trusted: Mapping[str, str], policy: AcceptPolicy,
                        now: datetime | None = None) -> set[str]:
    """SHA-256 of every FAB in ``registry`` that a trusted key signed and ``policy`` accepts
    at ``now`` (the current time)."""
    fabs = signed_fabs(registry, trusted)
    if policy.allow is not None:
        moment = now or datetime.now(UTC)
        return {fab.fab_hash for fab in fabs if fab.spec in policy.allow and (
            policy.allow[fab.spec] is None or moment < policy.allow[fab.spec])}
    if not policy.newest_only:
        return {fab.fab_hash for fab in fabs}
    newest: dict[str, SignedFab] = {}
    for fab in fabs:
        if fab.app_id not in newest or (_version_key(fab.version)
                                        > _version_key(newest[fab.app_id].version)):
            newest[fab.app_id] = fab
    return {fab.fab_hash for fab in newest.values()}


def read_allow_list(path: Path) -> dict[str, datetime | None]:
    """An allow-list file: YAML mapping ``"@publisher/app==version"`` to the moment it expires
    (an ISO date or date-time, UTC unless it says otherwise) or ``null`` (no expiry)."""
    try:
        entries = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"allow-list {str(path)!r} cannot be read: {error}") from None
    if not isinstance(entries, dict):
        raise ConfigError(f"allow-list {str(path)!r} must map '@publisher/app==version' to an "
                          "expiry date or null")
    allowed: dict[str, datetime | None] = {}
    for spec, expiry in entries.items():
        app_id, _, version = str(spec).partition("==")
        if not app_id.startswith("@") or "/" not in app_id or not version:
            raise ConfigError(f"allow-list {str(path)!r}: {str(spec)!r} is not "
                              "'@publisher/app==version'")
        allowed[str(spec)] = None if expiry is None else _moment(expiry, str(spec), path)
    return allowed


def _moment(value: object, spec: str, path: Path) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            raise ConfigError(f"allow-list {str(path)!r}: expiry {str(value)!r} of {spec!r} is "
                              "not a date (YYYY-MM-DD) or a date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
