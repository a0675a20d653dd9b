"""A small PKI for the tests, made with the cryptography package: a CA, a server certificate for
localhost and 127.0.0.1, and client certificates, as PEM files (tests/test_security.py,
tests/test_health_probe.py)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def write(self, directory: Path, name: str) -> tuple[str, str]:
        """Writes ``name.pem`` and ``name.key`` atomically (as kubelet swaps a Secret)."""
        paths = []
        for suffix, data in (
            (".key", self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )),
            (".pem", self.cert.public_bytes(serialization.Encoding.PEM)),
        ):  # fmt: skip
            path = directory / f"{name}{suffix}"
            temporary = path.with_suffix(suffix + ".tmp")
            temporary.write_bytes(data)
            os.replace(temporary, path)
            paths.append(str(path))
        return paths[1], paths[0]


def _certificate(
    subject: str, key, issuer: Issued | None, ca: bool, sans: list[x509.GeneralName], usage=None
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    return builder.sign(issuer.key if issuer else key, hashes.SHA256())


def make_ca(name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    return Issued(key, _certificate(name, key, None, True, []))


def issue_server(ca: Issued) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return Issued(key, _certificate("stt-engine", key, ca, False, sans, ExtendedKeyUsageOID.SERVER_AUTH))


def issue_client(ca: Issued, name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(f"{name}.clients.example")]
    return Issued(key, _certificate(name, key, ca, False, sans, ExtendedKeyUsageOID.CLIENT_AUTH))


@dataclass
class Pki:
    directory: Path
    ca: Issued
    ca_file: str
    server_cert: str
    server_key: str
    clients: dict[str, tuple[str, str]]  # name -> (cert, key); "stranger" is from another CA


def make_pki(directory: Path) -> Pki:
    """A CA, the server's certificate, and clients alice and mallory (and a "stranger" from
    another CA, named alice), written to ``directory``."""
    ca = make_ca("stt test CA")
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = issue_server(ca).write(directory, "server")
    clients = {name: issue_client(ca, name).write(directory, name) for name in ("alice", "mallory")}
    clients["stranger"] = issue_client(make_ca("another CA"), "alice").write(directory, "stranger")
    return Pki(directory, ca, str(ca_file), server_cert, server_key, clients)
