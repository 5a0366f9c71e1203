"""TLS certificates and SuperNode authentication keys for a real federation.

Creates, with the ``cryptography`` package:

- ``ca.crt`` / ``ca.key``: a certificate authority (self-signed, ECDSA P-384);
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for the
  given host names and IP addresses (Subject Alternative Names);
- ``supernode-<i>`` / ``supernode-<i>.pub``: one EC P-384 key pair per SuperNode in OpenSSH
  format, the format ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read;
- ``publisher`` / ``publisher.pub`` and ``trusted-entities.yaml``: the federation's Ed25519
  publisher key, which signs the app every party runs (``fedtune publish``), and the file
  that makes SuperNodes (``--trusted-entities``) and ``fedtune superexec`` trust only it;
- ``superexec.secret``: the shared secret of the SuperLink and its SuperExec
  (``--superexec-auth-secret-file``), so that only they take the server's tasks.

Every private file is created readable by its owner alone (0600).

For trying things out; in production use your organisation's PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.deploy.signing import make_publisher_key, trusted_entities_yaml

VALID_DAYS = 365


@dataclass(frozen=True)
class Credentials:
    """Paths of what ``write_credentials`` made."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    supernode_keys: tuple[tuple[Path, Path], ...]  # (private, public) per SuperNode
    publisher_key: Path
    publisher_pub: Path
    trusted_entities: Path
    superexec_secret: Path


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """A new file; a private key is created 0600, so it is never readable by others, not
    even for a moment (and an existing file is never overwritten)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alternative_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedtune federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: list[str], now: dt.datetime
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_supernode_key() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key) on NIST P-384."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_credentials(folder: Path, hosts: list[str], num_supernodes: int) -> Credentials:
    """Write a CA, a SuperLink certificate for ``hosts`` and ``num_supernodes`` key pairs."""
    if not hosts:
        raise ValueError("at least one host name or IP address is needed for the certificate")
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate clock skew
    ca_key, ca_cert = make_ca(now)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, now)
    pem = serialization.Encoding.PEM
    _write(folder / "ca.key", _private_pem(ca_key), private=True)
    ca_path = _write(folder / "ca.crt", ca_cert.public_bytes(pem))
    server_cert_path = _write(folder / "server.pem", server_cert.public_bytes(pem))
    server_key_path = _write(folder / "server.key", _private_pem(server_key), private=True)
    keys = []
    for index in range(num_supernodes):
        private, public = make_supernode_key()
        keys.append((_write(folder / f"supernode-{index}", private, private=True),
                     _write(folder / f"supernode-{index}.pub", public)))
    publisher_private, publisher_public = make_publisher_key()
    return Credentials(
        ca_path, server_cert_path, server_key_path, tuple(keys),
        publisher_key=_write(folder / "publisher", publisher_private, private=True),
        publisher_pub=_write(folder / "publisher.pub", publisher_public),
        trusted_entities=_write(folder / "trusted-entities.yaml",
                                trusted_entities_yaml(publisher_public).encode("ascii")),
        superexec_secret=_write(folder / "superexec.secret", secrets.token_hex(32).encode(),
                                private=True))
