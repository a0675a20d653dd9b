"""Health as real clients see it (the Python client, grpcurl, Watch), reflection, and
SIGTERM / SIGINT draining."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from engine.client import SpeechClient, StreamConfig, audio_requests, final_transcripts
from engine.errors import error_reason
from tests.helpers import JFK_TEXT, assert_retry_after, tool, wait_until, wer


def grpcurl(target: str, *args: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("grpcurl"), "-plaintext", *flags, target, *args], capture_output=True, text=True, timeout=30
    )


def grpcurl_health(target: str, service: str = "") -> str | None:
    result = grpcurl(target, "grpc.health.v1.Health/Check", flags=("-d", json.dumps({"service": service})))
    if result.returncode != 0:
        return None  # not listening yet
    return json.loads(result.stdout)["status"]


def reason_of(error: grpc.RpcError) -> str | None:
    return error_reason(rpc_status.from_call(error))


def test_not_serving_and_model_loading_until_warm_then_serving(server_factory, jfk):
    # Extra warm-up rounds make loading take seconds, as a large model's does; the settings
    # come only from STT_* variables.
    server = server_factory(env={"STT_WARMUP_RUNS": "15", "STT_MAX_STREAMS": "3"}, ready=False)
    watched: list[str] = []

    def watch():
        with grpc.insecure_channel(server.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="stt.v1.Speech")
            for response in stub.Watch(request, timeout=120):
                watched.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
                if watched[-1] == "SERVING":
                    break

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # Without retries, so that the unary call's refusal is seen rather than waited out.
    with server.client(retries=False) as client:

        def listening_status():
            try:
                return client.health(timeout=1)
            except grpc.RpcError:
                return None  # the port is not open yet

        assert wait_until(listening_status, 60, what="the port to open") == "NOT_SERVING"
        # While loading, work is refused with a retryable status naming the reason.
        with pytest.raises(grpc.RpcError) as streaming:
            list(client.stream_audio(jfk[:16000], StreamConfig(), realtime=False))
        with pytest.raises(grpc.RpcError) as unary:
            client.recognize(jfk[:16000])
        for refused in (streaming.value, unary.value):
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(refused) == "STT_MODEL_LOADING"
            assert_retry_after(refused, "STT_MODEL_LOADING")
        info = client.server_info()
        assert not info.ready and info.limits.max_concurrent_streams == 3
        # grpcurl, the third-party client, sees the same state.
        assert grpcurl_health(server.target) == "NOT_SERVING"
        seen = [client.health("stt.v1.Speech")]

        def serving() -> bool:
            assert server.process.poll() is None, server.log()
            seen.append(client.health("stt.v1.Speech"))
            return seen[-1] == "SERVING"

        wait_until(serving, 120, what="SERVING once the model is warm")
        assert seen[0] == "NOT_SERVING" and set(seen) == {"NOT_SERVING", "SERVING"}
        assert client.health() == "SERVING" and grpcurl_health(server.target, "stt.v1.Speech") == "SERVING"
        assert client.server_info().ready
    watcher.join(timeout=30)
    assert watched[0] == "NOT_SERVING" and watched[-1] == "SERVING", watched
    assert "ready: serving tiny.en" in server.log()


def test_grpcurl_lists_and_calls_through_reflection(server):
    listed = grpcurl(server.target, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "stt.v1.Speech" in services and "grpc.health.v1.Health" in services
    described = grpcurl(server.target, "describe", "stt.v1.Speech")
    assert "StreamingRecognize" in described.stdout
    info = grpcurl(server.target, "stt.v1.Speech/GetServerInfo")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["model"] == "tiny.en"


class SignallingStream:
    """A real-time stream of JFK that sends ``sig`` to the server once audio up to
    ``signal_at`` seconds has been sent, then keeps sending the rest."""

    def __init__(self, server, audio, sig: int, signal_at: float) -> None:
        self.server = server
        self.responses: list = []
        self.code: grpc.StatusCode | None = None
        self.reason: str | None = None
        self.signalled = threading.Event()

        def requests():
            yield StreamConfig().first_request()
            for index, request in enumerate(audio_requests(audio, 100, realtime=True)):
                yield request
                if (index + 1) * 0.1 >= signal_at and not self.signalled.is_set():
                    server.signal(sig)
                    self.signalled.set()

        def run():
            with SpeechClient(server.target) as client:
                try:
                    self.responses.extend(client.stream(requests()))
                    self.code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    self.code, self.reason = error.code(), reason_of(error)

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def text(self) -> str:
        return " ".join(final_transcripts(self.responses))


def assert_draining(server, jfk) -> None:
    with server.client() as client:
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as refused:
            list(client.stream_audio(jfk[:1600], StreamConfig(), realtime=False))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(refused.value) == "STT_SERVER_DRAINING"
    assert_retry_after(refused.value, "STT_SERVER_DRAINING")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_open_streams_then_exits(server_factory, jfk, sig):
    server = server_factory("--drain-seconds", "30")
    stream = SignallingStream(server, jfk, sig, signal_at=3.0)
    assert stream.signalled.wait(30)
    wait_until(lambda: "draining:" in server.log(), 10, what="the server to start draining")
    assert_draining(server, jfk)
    stream.thread.join(timeout=60)
    assert stream.code == grpc.StatusCode.OK, stream.reason
    assert wer([JFK_TEXT], [stream.text()]) < 0.1
    assert server.process.wait(timeout=30) == 0


def test_sigterm_past_the_drain_window_finalises_and_closes(server_factory, jfk):
    server = server_factory("--drain-seconds", "1")
    # SIGTERM once "ask not" (which ends at about 4.6 s) has been sent; the drain window
    # closes one second later, in the middle of the next phrase.
    stream = SignallingStream(server, jfk, signal.SIGTERM, signal_at=4.8)
    stream.thread.join(timeout=60)
    assert stream.signalled.is_set()
    assert stream.code == grpc.StatusCode.UNAVAILABLE
    assert stream.reason == "STT_SERVER_SHUTTING_DOWN"
    # Everything sent before the stop was transcribed, the open utterance included.
    text = stream.text().lower()
    assert "americans" in text and "ask not" in text, text
    assert server.process.wait(timeout=30) == 0
