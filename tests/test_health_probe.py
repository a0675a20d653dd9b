"""What an exec probe sees: the real grpc_health_probe over a real server's lifecycle.

For the server-wide status "" and for stt.v1.Speech, on a plaintext server, and on a TLS server
both through its TLS port (``-tls -tls-ca-cert -tls-server-name``) and on its plaintext
``--health-address`` port (where deploy/k8s probes), the probe exits (tests/helpers.ProbeExit):

- 2 before the port opens and once the process has exited (no connection);
- 4 while the model loads (NOT_SERVING);
- 0 once the model is warm (SERVING);
- 4 while draining after SIGTERM, for as long as a stream keeps the drain going;
- and for a SIGTERM while the model loads, never 0: the ports close at once (2), and the process
  exits once the load, which cannot be interrupted, returns.

tests/test_security.py covers the TLS and mTLS probe flags against a long-running server.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from engine.api import stt_pb2
from engine.client import SpeechClient, StreamConfig
from tests.helpers import ProbeExit, ServerProcess, free_port, health_probe, wait_until
from tests.pki import Pki

SERVICES = ("", "stt.v1.Speech")
# Extra warm-up rounds make loading take seconds, as a large model's does.
LOADING_ENV = {"STT_WARMUP_RUNS": "15", "OTEL_SDK_DISABLED": "true"}
SMALL = ("--workers", "1", "--threads", "1", "--drain-seconds", "30")


@dataclass(frozen=True)
class Endpoint:
    """An address a probe is pointed at, with the probe's transport flags."""

    name: str
    address: str
    flags: tuple[str, ...] = ()

    def probe(self, service: str = "", connect_timeout: str = "5s") -> int:
        return health_probe(
            f"-addr={self.address}", f"-service={service}", *self.flags, connect_timeout=connect_timeout
        ).returncode


@dataclass
class Deployment:
    server: ServerProcess
    endpoints: tuple[Endpoint, ...]
    client: Callable[[], SpeechClient]  # of the main port
    # Probes that fail even while the server is SERVING, and their exit status.
    misconfigured: tuple[tuple[Endpoint, int], ...]

    def probes(self) -> Iterator[tuple[str, Endpoint, str]]:
        for endpoint in self.endpoints:
            for service in SERVICES:
                yield f"{endpoint.name} -service={service!r}", endpoint, service

    def statuses(self, connect_timeout: str = "5s") -> dict[str, int]:
        """Every endpoint's probe exit status for each service."""
        return {name: endpoint.probe(service, connect_timeout) for name, endpoint, service in self.probes()}

    def all(self, code: int) -> dict[str, int]:
        return {name: code for name, _, _ in self.probes()}

    def running(self) -> bool:
        assert self.server.process.poll() is None, f"the server exited:\n{self.server.log()}"
        return True

    def wait_open(self) -> None:
        """Until every endpoint accepts connections (the probe stops exiting 2)."""
        for endpoint in self.endpoints:
            wait_until(
                lambda e=endpoint: (
                    self.running() and e.probe(connect_timeout="250ms") != ProbeExit.NO_CONNECTION
                ),
                60,
                what=f"the {endpoint.name} to open",
            )


def plaintext_deployment(server_factory: Callable[..., ServerProcess], pki: Pki) -> Deployment:
    server = server_factory(*SMALL, env=LOADING_ENV, ready=False)
    main = Endpoint("main port", server.target)
    with_tls = Endpoint("main port with -tls", server.target, ("-tls", f"-tls-ca-cert={pki.ca_file}"))
    return Deployment(server, (main,), server.client, ((with_tls, ProbeExit.NO_CONNECTION),))


def tls_deployment(server_factory: Callable[..., ServerProcess], pki: Pki) -> Deployment:
    health_address = f"127.0.0.1:{free_port()}"
    server = server_factory(
        *SMALL,
        *("--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--health-address", health_address),
        env=LOADING_ENV,
        ready=False,
    )
    tls = ("-tls", f"-tls-ca-cert={pki.ca_file}")
    main = Endpoint("TLS port", server.target, (*tls, "-tls-server-name=localhost"))
    health = Endpoint("health port", health_address)
    misconfigured = (
        # The certificate names localhost and 127.0.0.1: the handshake fails, as with no server.
        (
            Endpoint("TLS port, another name", server.target, (*tls, "-tls-server-name=other.example")),
            ProbeExit.NO_CONNECTION,
        ),
        (
            Endpoint("TLS port, no CA file", server.target, ("-tls", "-tls-ca-cert=/nonexistent")),
            ProbeExit.INVALID_ARGUMENTS,
        ),
    )
    return Deployment(
        server,
        (main, health),
        lambda: SpeechClient(server.target, ca_file=pki.ca_file),
        misconfigured,
    )


@contextmanager
def open_stream(client: SpeechClient) -> Iterator[None]:
    """A stream the server has admitted, held open (its config sent, no audio) until the block
    ends: a drain lasts exactly as long as the test needs."""
    release = threading.Event()

    def requests() -> Iterator[stt_pb2.StreamingRecognizeRequest]:
        yield StreamConfig().first_request()
        release.wait(60)

    responses = client.stream(requests())
    wait_until(lambda: client.server_info().active_streams == 1, 10, what="the stream to be admitted")
    try:
        yield
    finally:
        release.set()
    assert list(responses) == []  # it ends normally once its client closes it


@pytest.mark.parametrize("deploy", [plaintext_deployment, tls_deployment], ids=["plaintext", "tls"])
def test_probe_exit_status_while_loading_serving_and_draining(deploy, server_factory, pki):
    deployment = deploy(server_factory, pki)
    server = deployment.server
    deployment.wait_open()
    assert deployment.statuses() == deployment.all(ProbeExit.UNHEALTHY), "NOT_SERVING while loading"

    main = deployment.endpoints[0]
    wait_until(
        lambda: deployment.running() and main.probe() == ProbeExit.SERVING, 120, 0.1, "SERVING once warm"
    )
    assert deployment.statuses() == deployment.all(ProbeExit.SERVING)
    assert main.probe("stt.v1.Unknown") == ProbeExit.RPC_FAILED  # NOT_FOUND
    for endpoint, code in deployment.misconfigured:
        assert endpoint.probe(connect_timeout="1s") == code, endpoint.name

    with deployment.client() as client, open_stream(client):
        server.signal(signal.SIGTERM)
        wait_until(lambda: "draining:" in server.log(), 10, what="the server to start draining")
        assert deployment.statuses() == deployment.all(ProbeExit.UNHEALTHY), "NOT_SERVING while draining"
        assert "draining: health NOT_SERVING, 1 open streams" in server.log()
        assert server.process.poll() is None  # the open stream holds the drain
    assert server.process.wait(timeout=30) == 0
    assert deployment.statuses(connect_timeout="1s") == deployment.all(ProbeExit.NO_CONNECTION), "after exit"


def test_sigterm_while_loading_exits_without_ever_serving(server_factory, pki):
    # A pod terminated while it starts.
    deployment = plaintext_deployment(server_factory, pki)
    server = deployment.server
    deployment.wait_open()
    assert deployment.statuses() == deployment.all(ProbeExit.UNHEALTHY), "NOT_SERVING while loading"
    server.signal(signal.SIGTERM)
    seen: set[int] = set()

    def exited() -> bool:
        seen.update(deployment.statuses(connect_timeout="250ms").values())
        return server.process.poll() is not None

    wait_until(exited, 60, what="the server to exit")
    assert server.process.returncode == 0
    assert ProbeExit.SERVING not in seen, seen
    assert deployment.statuses(connect_timeout="1s") == deployment.all(ProbeExit.NO_CONNECTION), "after exit"
    log = server.log()
    assert "draining: health NOT_SERVING, 0 open streams" in log, log
    assert "loaded after shutdown began; not serving" in log and "ready:" not in log, log
