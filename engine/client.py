"""A small synchronous Python client for stt-engine, used by the CLI and the tests."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from otel import traced_channel

from .api import SERVICE_NAME, stt_pb2, stt_pb2_grpc
from .audio import float_to_linear16
from .options import TARGET_SAMPLE_RATE, ServerOptions


@dataclass
class StreamConfig:
    """What a client asks of a stream (fields as in RecognitionConfig)."""

    language_code: str = "en"
    interim_results: bool = True
    single_utterance: bool = False
    enable_word_time_offsets: bool = False
    prompt: str = ""
    max_alternatives: int = 1
    silence_duration_ms: int = 0
    interim_interval_ms: int = 0
    encoding: int = stt_pb2.LINEAR16
    sample_rate_hertz: int = TARGET_SAMPLE_RATE
    audio_channel_count: int = 1

    def recognition_config(self) -> stt_pb2.RecognitionConfig:
        return stt_pb2.RecognitionConfig(
            encoding=self.encoding,
            sample_rate_hertz=self.sample_rate_hertz,
            audio_channel_count=self.audio_channel_count,
            language_code=self.language_code,
            prompt=self.prompt,
            enable_word_time_offsets=self.enable_word_time_offsets,
            max_alternatives=self.max_alternatives,
            endpointing=stt_pb2.EndpointingConfig(silence_duration_ms=self.silence_duration_ms),
        )

    def first_request(self) -> stt_pb2.StreamingRecognizeRequest:
        return stt_pb2.StreamingRecognizeRequest(
            streaming_config=stt_pb2.StreamingRecognitionConfig(
                config=self.recognition_config(),
                interim_results=self.interim_results,
                single_utterance=self.single_utterance,
                interim_interval_ms=self.interim_interval_ms,
            )
        )


def chunk_bytes(data: bytes, chunk_size: int) -> Iterator[bytes]:
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]


def paced(
    chunks: Iterable[bytes], seconds_per_chunk: float, realtime: bool, started: float | None = None
) -> Iterator[bytes]:
    """Yields chunks no faster than real time when ``realtime``, as a microphone would: a
    chunk leaves when its last sample has been spoken, ``(i + 1) * seconds_per_chunk`` after
    ``started`` (the ``time.monotonic()`` at which speaking began; default: now)."""
    started = time.monotonic() if started is None else started
    for index, chunk in enumerate(chunks):
        if realtime:
            delay = started + (index + 1) * seconds_per_chunk - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield chunk


def audio_requests(
    audio: np.ndarray, chunk_ms: int = 100, realtime: bool = True, started: float | None = None
) -> Iterator[stt_pb2.StreamingRecognizeRequest]:
    """16 kHz float audio as LINEAR16 requests of ``chunk_ms`` each (paced as ``paced``)."""
    size = TARGET_SAMPLE_RATE * chunk_ms // 1000 * 2
    for chunk in paced(chunk_bytes(float_to_linear16(audio), size), chunk_ms / 1000, realtime, started):
        yield stt_pb2.StreamingRecognizeRequest(audio_content=chunk)


def read_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """The bearer token given directly or as the first line of a file."""
    if token:
        return token.strip()
    if token_file:
        return Path(token_file).read_text().strip() or None
    return None


# For a target of several servers: a connection to each and every call (a stream) to the next
# ready one, since a stream lives on one connection for its whole life. gRPC health checking of
# stt.v1.Speech on each connection takes a loading or draining server (NOT_SERVING) out of the
# rotation at once, rather than when it finally closes its port.
BALANCED_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": SERVICE_NAME},
}

# gRPC's retry policy for the unary methods, in a file other clients can copy (README, "Retries"):
# UNAVAILABLE and RESOURCE_EXHAUSTED are repeated after the server's grpc-retry-pushback-ms
# (errors.RETRY_DELAYS), or a jittered backoff when the status came without one (no server
# listening). Streams have no policy: a failed stream has consumed its audio.
RETRY_SERVICE_CONFIG: dict = json.loads((Path(__file__).parent / "service_config.json").read_text())

# gRPC keeps a request for retries only up to this size (default 256 KiB, 8 s of 16 kHz audio)
# and sends a larger one once, unretried. This covers every Recognize request a server with the
# default --max-recognize-bytes takes, plus framing; the copy lives until the call's answer.
RETRY_BUFFER_BYTES = ServerOptions.max_recognize_bytes + (64 << 10)


def channel_options(balanced: bool, retries: bool) -> list[tuple[str, str | int]]:
    """The service config (balancing, retries) and the options retries need."""
    config: dict = {}
    if retries:
        config.update(RETRY_SERVICE_CONFIG)
    if balanced:
        config.update(BALANCED_SERVICE_CONFIG)
    options: list[tuple[str, str | int]] = [("grpc.enable_retries", int(retries))]
    if config:
        options.append(("grpc.service_config", json.dumps(config)))
    if retries:
        options.append(("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES))
    return options


@dataclass(frozen=True)
class Target:
    """A server address as gRPC takes it."""

    uri: str
    balanced: bool  # may name several servers: balanced per call, health-checked
    authority: str | None = None  # an address list's first address (the name TLS verifies)


def parse_target(target: str) -> Target:
    """``HOST:PORT`` is one server, as plain gRPC connects to it. ``dns:///NAME:PORT`` is every
    address NAME resolves to (re-resolved when a connection closes), and ``IP:PORT,IP:PORT,...``
    (or gRPC's own ``ipv4:``/``ipv6:`` form of it) a fixed list: both are balanced."""
    if target.startswith("dns:"):
        return Target(target, balanced=True)
    scheme, colon, listed = target.partition(":")
    if not (colon and scheme in ("ipv4", "ipv6")):
        if "," not in target:
            return Target(target, balanced=False)
        scheme, listed = "", target
    addresses = [address.strip() for address in listed.split(",")]
    families = {_ip_family(address, target) for address in addresses}
    if len(families) > 1 or scheme not in ("", *families):
        raise ValueError(f"{target!r}: a list takes addresses of one family, all IPv4 or all IPv6")
    return Target(f"{families.pop()}:{','.join(addresses)}", balanced=True, authority=addresses[0])


def _ip_family(address: str, target: str) -> str:
    """``ipv4`` or ``ipv6``, the gRPC scheme of one ``IP:PORT`` or ``[IPv6]:PORT``."""
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        ip = None
    if ip is None or not port.isdigit() or (ip.version == 6) != bracketed:
        raise ValueError(
            f"{address!r} in {target!r} is not IP:PORT or [IPv6]:PORT: a list of servers takes "
            "addresses; for a name use dns:///NAME:PORT, balanced over all its addresses"
        )
    return f"ipv{ip.version}"


class SpeechClient:
    """Blocking client for the Speech and health services.

    ``target`` is ``HOST:PORT``, or several servers (see ``parse_target``): then each call,
    each stream, goes to the next server reporting SERVING, and ``health()`` answers from one
    of them (UNAVAILABLE when none is SERVING).

    Plaintext by default. ``tls`` (implied by any of the files) opens a TLS channel that
    trusts ``ca_file`` (default: the system roots); ``cert_file`` and ``key_file`` are the
    client certificate for mTLS; ``server_name`` overrides the name checked against the server
    certificate. ``token`` goes on every Speech call as ``authorization: Bearer <token>``.

    ``Recognize`` and ``GetServerInfo`` are retried as RETRY_SERVICE_CONFIG says unless
    ``retries`` is False; streams never are.

    Every call but health checks is traced by opentelemetry-instrumentation-grpc's client
    interceptor (``otel.traced_channel``): a CLIENT span from ``tracer_provider`` (default:
    the process's global provider, so an application's own SDK and current span apply), whose
    ``traceparent`` makes the server's span its child. Without an SDK nothing is recorded, and
    only a current span's context (if there is one) is passed on.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
        token: str | None = None,
        retries: bool = True,
        tracer_provider=None,
    ) -> None:
        self.target = target
        parsed = parse_target(target)
        options = channel_options(parsed.balanced, retries)
        if parsed.authority:
            # gRPC's default authority for a list is the whole list, which no certificate names.
            options.append(("grpc.default_authority", parsed.authority))
        if tls or ca_file or cert_file or key_file:
            if bool(cert_file) != bool(key_file):
                raise ValueError("a client certificate needs both its certificate and key files")
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(ca_file).read_bytes() if ca_file else None,
                private_key=Path(key_file).read_bytes() if key_file else None,
                certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
            )
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            channel = grpc.secure_channel(parsed.uri, credentials, options=options)
        else:
            channel = grpc.insecure_channel(parsed.uri, options=options)
        self.channel = traced_channel(channel, tracer_provider)
        # Plain metadata rather than call credentials: gRPC sends those only over TLS, and a
        # token over plaintext is legitimate behind a TLS-terminating proxy or mesh.
        self._auth = [("authorization", f"Bearer {token}")] if token else []
        self.speech = stt_pb2_grpc.SpeechStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SpeechClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(
        self,
        requests: Iterable[stt_pb2.StreamingRecognizeRequest],
        metadata: list[tuple[str, str]] | None = None,
        timeout: float | None = None,
    ):
        """Raw bidirectional call: an iterator of responses that is also a grpc.Call."""
        return self.speech.StreamingRecognize(
            iter(requests), metadata=self._metadata(metadata), timeout=timeout
        )

    def _metadata(self, metadata: list[tuple[str, str]] | None) -> list[tuple[str, str]] | None:
        if not self._auth:
            return metadata
        return [*self._auth, *(metadata or [])]

    def stream_audio(
        self,
        audio: np.ndarray,
        config: StreamConfig | None = None,
        chunk_ms: int = 100,
        realtime: bool = True,
        metadata: list[tuple[str, str]] | None = None,
        started: float | None = None,
    ):
        """Streams 16 kHz float audio; returns the response iterator / call. ``started``:
        the ``time.monotonic()`` the audio's offset 0 corresponds to, for latency figures."""
        config = config or StreamConfig()

        def requests() -> Iterator[stt_pb2.StreamingRecognizeRequest]:
            yield config.first_request()
            yield from audio_requests(audio, chunk_ms, realtime, started)

        return self.stream(requests(), metadata=metadata)

    def recognize(
        self, audio: np.ndarray, config: StreamConfig | None = None, timeout: float = 120
    ) -> stt_pb2.RecognizeResponse:
        config = config or StreamConfig()
        return self.speech.Recognize(
            stt_pb2.RecognizeRequest(
                config=config.recognition_config(), audio_content=float_to_linear16(audio)
            ),
            timeout=timeout,
            metadata=self._metadata(None),
        )

    def server_info(self, timeout: float = 10) -> stt_pb2.ServerInfo:
        return self.speech.GetServerInfo(
            stt_pb2.GetServerInfoRequest(), timeout=timeout, metadata=self._metadata(None)
        )

    def health(self, service: str = "", timeout: float = 5) -> str:
        """The serving status name (SERVING, NOT_SERVING, ...)."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} did not report SERVING within {timeout:g} s")
            time.sleep(0.05)


def wait_finished(call: grpc.Future, timeout: float = 5) -> bool:
    """Waits until ``call`` has ended and run its done callbacks (the client span's end among
    them: it is the first one added). Its responses may all be read before they run."""
    finished = threading.Event()
    call.add_done_callback(lambda _call: finished.set())
    return finished.wait(timeout)


def final_transcripts(responses: Iterable[stt_pb2.StreamingRecognizeResponse]) -> list[str]:
    """The final transcripts of a response stream, in order."""
    return [
        r.result.alternatives[0].transcript
        for r in responses
        if r.HasField("result") and r.result.is_final and r.result.alternatives
    ]
