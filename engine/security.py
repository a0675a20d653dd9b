"""Transport security and authentication: TLS/mTLS credentials that follow certificate
rotation, bearer tokens checked against a file of hashes, mTLS identities, and per-identity
stream limits.

The Speech methods call ``Guard.check`` first; health and reflection never do, because
probes must reach them without credentials.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from otel import CallTelemetry

from .errors import SttError, retryable

logger = logging.getLogger(__name__)

BEARER = re.compile(r"bearer\s+(\S+)\s*$", re.IGNORECASE)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class SecurityOptions:
    """How the server authenticates transports and callers.

    Attributes:
        tls_cert, tls_key: PEM server certificate chain and private key; both or neither.
            Without them the server listens in plaintext.
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it signed
            (mTLS), and without a tokens file the certificate's name is the caller's identity.
        auth_tokens_file: lines of ``identity sha256-hex-of-token``; when set, every Speech
            call needs ``authorization: Bearer <token>`` matching one of them.
        allowed_identities: when non-empty, only these identities may call (others get
            PERMISSION_DENIED).
        max_streams_per_identity: concurrent streams and Recognize calls one identity may hold
            (0: no limit).
        health_address: a plaintext listener serving only grpc.health.v1, for probes that
            cannot speak TLS (Kubernetes' native gRPC probe).
    """

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_tokens_file: str | None = None
    allowed_identities: frozenset[str] = field(default_factory=frozenset)
    max_streams_per_identity: int = 0
    health_address: str | None = None

    def validate(self) -> None:
        """Raises ValueError (a usage error) on an inconsistent or unreadable setting."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        if self.max_streams_per_identity < 0:
            raise ValueError("--max-streams-per-identity must be 0 (no limit) or more")
        if self.allowed_identities and not self.authenticates:
            raise ValueError("--auth-allowed-identities needs --auth-tokens-file or --tls-client-ca")
        if self.max_streams_per_identity and not self.authenticates:
            raise ValueError("--max-streams-per-identity needs --auth-tokens-file or --tls-client-ca")
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca, self.auth_tokens_file):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"cannot read {path}")
        if self.tls_cert:
            _check_key_pair(self.tls_cert, self.tls_key)
        if self.auth_tokens_file:
            TokenFile(self.auth_tokens_file).load()

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def authenticates(self) -> bool:
        return bool(self.auth_tokens_file or self.tls_client_ca)


def _check_key_pair(cert: str, key: str | None) -> None:
    """The stdlib's TLS context refuses a key that does not belong to the certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{cert} and {key} are not a valid certificate and key pair: {exc}") from exc


class ReloadingCertificates:
    """Server credentials that re-read the certificate, key and client CA whenever one of the
    files changes (cert-manager and kubelet rotate them in place), checked at each new TLS
    handshake. A half-written or mismatched pair is ignored until it is whole."""

    def __init__(self, options: SecurityOptions) -> None:
        assert options.tls_cert and options.tls_key
        self.cert = options.tls_cert
        self.key = options.tls_key
        self.client_ca = options.tls_client_ca
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self.reloads = 0
        self.initial = self._configuration()

    def _paths(self) -> list[str]:
        return [p for p in (self.cert, self.key, self.client_ca) if p]

    def _stamps(self) -> tuple:
        stamps = []
        for path in self._paths():
            try:
                stat = os.stat(path)  # follows the ..data symlinks of a mounted Secret
                stamps.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _configuration(self):
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())], root_certificates=ca
        )

    def fetch(self):
        """gRPC's fetcher: a new configuration when the files changed, else None (keep)."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return None
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                _check_key_pair(self.cert, self.key)
                configuration = self._configuration()
            except (OSError, ValueError) as exc:
                logger.warning("TLS files changed but cannot be loaded yet (%s); keeping the old ones", exc)
                return None
            self._stamp = stamp
            self.reloads += 1
        logger.info("TLS certificate reloaded from %s", self.cert)
        return configuration

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=bool(self.client_ca)
        )


class TokenFile:
    """``identity sha256-hex`` lines, ``#`` comments; re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple | None = None
        self._entries: list[tuple[str, bytes]] = []

    def load(self) -> list[tuple[str, bytes]]:
        entries = []
        for number, raw in enumerate(Path(self.path).read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not SHA256_HEX.fullmatch(parts[1].lower()):
                # The line number only: the line itself may be a pasted token.
                raise ValueError(f"{self.path}:{number}: expected `identity sha256-hex`")
            entries.append((parts[0], bytes.fromhex(parts[1])))
        return entries

    def entries(self) -> list[tuple[str, bytes]]:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self._entries = self.load()
                self._stamp = stamp
        except (OSError, ValueError) as exc:
            # Keep the last good list: a rotation in progress must not lock everyone out.
            logger.warning(
                "cannot reload the auth tokens file (%s); keeping %d tokens", exc, len(self._entries)
            )
        return self._entries

    def identify(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for identity, expected in self.entries():
            # Every entry is compared, in constant time, so timing reveals nothing.
            if hmac.compare_digest(digest, expected) and found is None:
                found = identity
        return found


def unauthenticated(message: str) -> SttError:
    return SttError(grpc.StatusCode.UNAUTHENTICATED, "STT_UNAUTHENTICATED", message)


def _certificate_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The verified client certificate's subject CN, then its SANs."""
    auth = context.auth_context() or {}
    names = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            name = value.decode() if isinstance(value, bytes) else str(value)
            if name and name not in names:
                names.append(name)
    return names


class Guard:
    """Authentication, authorisation and per-identity slot limits for the Speech methods.
    With no authentication configured it admits every call, as before."""

    def __init__(self, options: SecurityOptions | None = None) -> None:
        self.options = options or SecurityOptions()
        self.tokens = TokenFile(self.options.auth_tokens_file) if self.options.auth_tokens_file else None
        self.streams: collections.Counter[str] = collections.Counter()

    def identify(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's identity, or an SttError. None when authentication is off."""
        if not self.options.authenticates:
            return None
        if self.tokens is not None:
            token = _bearer_token(context.invocation_metadata() or ())
            if token is None:
                raise unauthenticated("this server requires `authorization: Bearer <token>` metadata")
            identity = self.tokens.identify(token)
            if identity is None:
                raise unauthenticated("the bearer token is not valid")
            candidates = [identity]
        else:
            candidates = _certificate_names(context)
            if not candidates:
                raise unauthenticated("no verified client certificate")
        allowed = self.options.allowed_identities
        if allowed:
            permitted = [name for name in candidates if name in allowed]
            if not permitted:
                raise SttError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "STT_PERMISSION_DENIED",
                    f"identity {candidates[0][:128]!r} may not use this server",
                )
            return permitted[0]
        return candidates[0]

    def check(self, context: grpc.aio.ServicerContext, call: CallTelemetry, holds_slot: bool = False) -> None:
        """Authenticates the call, records the identity on it and, for a call that holds one of
        the server's slots (a stream or a Recognize call), takes one of the identity's until the
        RPC ends. Raises SttError."""
        identity = self.identify(context)
        if identity is None:
            return
        # Token names and an allow-list are configured sets; certificate names alone are not.
        bounded = self.tokens is not None or bool(self.options.allowed_identities)
        call.authenticated(identity, bounded)
        limit = self.options.max_streams_per_identity
        if not holds_slot or not limit:
            return
        if self.streams[identity] >= limit:
            raise retryable(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "STT_TOO_MANY_STREAMS_FOR_IDENTITY",
                f"identity {identity[:128]!r} already has {limit} concurrent streams and Recognize "
                "calls, its limit",
            )
        self.streams[identity] += 1
        context.add_done_callback(lambda _context: self._release(identity))

    def _release(self, identity: str) -> None:
        self.streams[identity] -= 1
        if self.streams[identity] <= 0:
            del self.streams[identity]


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            match = BEARER.match(value.strip())
            if match:
                return match.group(1)
    return None
