"""Scale-out: one client balancing its streams over several real servers (round_robin over an
address list or DNS), a draining server leaving the client's rotation before its port closes,
TLS to every server of a list, and the server's maximum connection age."""

from __future__ import annotations

import signal
import threading

import grpc
import numpy as np

from engine.client import SpeechClient, StreamConfig, audio_requests, final_transcripts
from tests.helpers import JFK_OPENING, JFK_TEXT, SAMPLE, ServerProcess, wait_until, wer
from tests.test_cli import stt_engine
from tests.test_security import wait_serving

# Light servers that start in a second and stop at once (no collector to flush to); held
# streams send nothing for a while, so the idle timeout is long.
LIGHT = ("--workers", "1", "--threads", "1", "--warmup-runs", "0", "--idle-timeout-seconds", "300")
QUIET = {"OTEL_SDK_DISABLED": "true"}
FIVE_SECONDS = 16000 * 5  # JFK_OPENING


def start_pair(server_factory, *args: str, ca_file: str | None = None) -> list[ServerProcess]:
    """Two servers, told apart in GetServerInfo by their --max-streams: 8 and 9; with TLS
    (``ca_file``) they are waited for over TLS."""
    servers = [
        server_factory(*LIGHT, "--max-streams", str(limit), *args, env=QUIET, ready=False) for limit in (8, 9)
    ]
    for server in servers:
        if ca_file:
            wait_serving(server, SpeechClient(server.target, ca_file=ca_file))
        else:
            server.wait_ready()
    return servers


def answering(client: SpeechClient, calls: int = 4) -> set[int]:
    """The servers (by --max-streams) that answer ``calls`` GetServerInfo calls in a row: with
    round_robin, every server in the client's rotation answers one of two calls in a row."""
    return {client.server_info().limits.max_concurrent_streams for _ in range(calls)}


class HeldStream:
    """A stream that sends its config, then holds its slot on the server (active_streams) until
    ``release`` is set, then sends the first 5 s of JFK at once."""

    def __init__(self, client: SpeechClient, audio: np.ndarray, release: threading.Event) -> None:
        def requests():
            yield StreamConfig(interim_results=False).first_request()
            release.wait(120)
            yield from audio_requests(audio[:FIVE_SECONDS], realtime=False)

        self.call = client.stream(requests())

    def text(self) -> str:
        return " ".join(final_transcripts(self.call))


def test_streams_of_one_client_spread_over_servers_and_skip_a_draining_one(server_factory, jfk):
    # A long drain window: the draining server keeps its port open while its streams run.
    first, second = start_pair(server_factory, "--drain-seconds", "120")
    release = threading.Event()
    with SpeechClient(f"{first.target},{second.target}") as client:
        # Both connections up and SERVING: from here round_robin alternates between them.
        wait_until(lambda: answering(client) == {8, 9}, 30, what="both servers in the rotation")
        held = [HeldStream(client, jfk, release) for _ in range(4)]
        streams = lambda: (first.active_streams(), second.active_streams())  # noqa: E731
        wait_until(lambda: sum(streams()) == 4, 30, what="the four streams to be admitted")
        assert streams() == (2, 2)

        first.signal(signal.SIGTERM)
        # The client's health-check stream sees NOT_SERVING and takes the server out of its
        # rotation; without it the server would stay in until its port closes after the drain.
        wait_until(lambda: answering(client) == {9}, 30, what="the draining server to leave the rotation")
        assert first.process.poll() is None and first.active_streams() == 2  # still draining
        for _ in range(2):
            finals = final_transcripts(client.stream_audio(jfk, realtime=False))
            assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1, finals
        assert "STT_SERVER_DRAINING" not in first.log()  # the draining server refused nothing

        # The held streams, two of them on the draining server, finish with their transcripts.
        release.set()
        for stream in held:
            assert wer([JFK_OPENING], [stream.text()]) < 0.1
        assert first.process.wait(timeout=30) == 0
        # Its port closed: new streams keep going to the other server.
        assert answering(client) == {9}
        assert list(client.stream([StreamConfig().first_request()])) == []


def test_tls_to_every_server_of_a_list_and_of_a_dns_name(server_factory, pki):
    ca_file = pki.ca_file
    # The server certificate names localhost and 127.0.0.1.
    first, second = start_pair(
        server_factory, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key, ca_file=ca_file
    )
    # gRPC's authority for an address list is the whole list; the client verifies the first
    # address instead, which the certificate names.
    with SpeechClient(f"{first.target},{second.target}", ca_file=ca_file) as client:
        wait_until(lambda: answering(client) == {8, 9}, 30, what="TLS to both servers")
        assert client.health("stt.v1.Speech") == "SERVING"
        assert list(client.stream([StreamConfig().first_request()])) == []
    with SpeechClient(f"dns:///localhost:{first.port}", ca_file=ca_file) as client:
        assert answering(client) == {8}


def test_cli_takes_a_dns_name_and_an_address_list(server):
    # localhost may also resolve to ::1, where nothing listens: round_robin skips that address.
    result = stt_engine("transcribe", "--server", f"dns:///localhost:{server.port}", "--fast", str(SAMPLE))
    assert result.returncode == 0, result.stderr
    finals = [line.split("] ", 1)[1] for line in result.stdout.splitlines() if line.startswith("[")]
    assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1
    result = stt_engine("info", "--server", f"{server.target},{server.target}")
    assert result.returncode == 0, result.stderr
    result = stt_engine("info", "--server", f"localhost:{server.port},{server.target}")
    assert result.returncode == 2 and "dns:///NAME:PORT" in result.stderr


def test_max_connection_age_closes_connections_gracefully(server_factory, jfk):
    server = server_factory(*LIGHT, "--max-connection-age-seconds", "1", env=QUIET)
    release = threading.Event()
    states: list[grpc.ChannelConnectivity] = []
    with SpeechClient(server.target) as client:
        client.channel.subscribe(states.append)
        held = HeldStream(client, jfk, release)
        wait_until(lambda: server.active_streams() == 1, 30, what="the stream to be admitted")
        # The server sends GOAWAY on the stream's connection: the channel has no usable
        # connection left for new calls (IDLE), while the open stream goes on.
        wait_until(
            lambda: grpc.ChannelConnectivity.READY in states and states[-1] == grpc.ChannelConnectivity.IDLE,
            30,
            what="the connection to reach its maximum age",
        )
        release.set()
        assert wer([JFK_OPENING], [held.text()]) < 0.1
        assert client.server_info().ready  # on a new connection
