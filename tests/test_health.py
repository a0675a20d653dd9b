"""Health as real clients see it (grpcurl, grpc Watch), reflection, and SIGTERM draining."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from engine.client import SpeechClient, StreamConfig, final_transcripts
from engine.errors import error_reason
from tests.conftest import JFK_TEXT, ServerProcess, wer

GRPCURL = shutil.which("grpcurl")
needs_grpcurl = pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed")


def grpcurl(target: str, *args: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GRPCURL, "-plaintext", *flags, target, *args], capture_output=True, text=True, timeout=30
    )


def grpcurl_health(target: str, service: str = "") -> str | None:
    result = grpcurl(target, "grpc.health.v1.Health/Check", flags=("-d", json.dumps({"service": service})))
    if result.returncode != 0:
        return None  # not listening yet
    return json.loads(result.stdout)["status"]


@needs_grpcurl
def test_health_not_serving_while_loading_then_serving():
    # Extra warm-up rounds make loading take seconds, as a large model's does.
    server = ServerProcess("--warmup-runs", "15")
    watched: list[str] = []

    def watch():
        channel = grpc.insecure_channel(server.target)
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = health_pb2_grpc.HealthStub(channel)
        for response in stub.Watch(health_pb2.HealthCheckRequest(service="stt.v1.Speech"), timeout=120):
            watched.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
            if watched[-1] == "SERVING":
                break
        channel.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        seen = []
        deadline = time.monotonic() + 120
        while "SERVING" not in seen and time.monotonic() < deadline:
            status = grpcurl_health(server.target)
            if status and (not seen or seen[-1] != status):
                seen.append(status)
            time.sleep(0.05)
        assert seen[0] == "NOT_SERVING" and seen[-1] == "SERVING", seen
        assert grpcurl_health(server.target, "stt.v1.Speech") == "SERVING"
        watcher.join(timeout=30)
        assert watched[0] == "NOT_SERVING" and watched[-1] == "SERVING", watched
        assert "ready: serving tiny.en" in server.log()
    finally:
        server.stop()


@needs_grpcurl
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


def test_sigterm_drains_open_streams_then_exits(jfk):
    server = ServerProcess("--drain-seconds", "30")
    try:
        server.wait_ready()
        responses: list = []
        outcome: dict = {}

        def stream():
            with SpeechClient(server.target) as client:
                try:
                    responses.extend(client.stream_audio(jfk, StreamConfig()))
                    outcome["code"] = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    outcome["code"] = error.code()

        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(3)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with server.client() as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as refused:
                list(client.stream_audio(jfk[:1600], StreamConfig(), realtime=False))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(rpc_status.from_call(refused.value)) == "STT_SERVER_DRAINING"
        thread.join(timeout=60)
        assert outcome["code"] == grpc.StatusCode.OK
        assert wer([JFK_TEXT], [" ".join(final_transcripts(responses))]) < 0.1
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def test_sigterm_past_the_drain_window_finalises_and_closes(jfk):
    server = ServerProcess("--drain-seconds", "1")
    try:
        server.wait_ready()
        with SpeechClient(server.target) as client:
            call = client.stream_audio(jfk, StreamConfig())
            timer = threading.Timer(3.5, server.process.send_signal, (signal.SIGTERM,))
            timer.start()
            responses = []
            with pytest.raises(grpc.RpcError) as ended:
                for response in call:
                    responses.append(response)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(rpc_status.from_call(ended.value)) == "STT_SERVER_SHUTTING_DOWN"
        # Everything spoken before the stop was transcribed, the open utterance included.
        text = " ".join(final_transcripts(responses)).lower()
        assert "americans" in text and "ask not" in text
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
