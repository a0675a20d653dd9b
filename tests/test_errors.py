"""Bad input gets a precise gRPC error; a parallel good stream and the server are unaffected."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from engine.api import stt_pb2
from engine.audio import float_to_linear16
from engine.client import SpeechClient, StreamConfig, final_transcripts
from engine.errors import error_reason
from tests.conftest import JFK_OPENING, BackgroundStream


@pytest.fixture
def good_stream(server, jfk):
    """A real-time stream of JFK's opening running during the test, checked after it."""
    stream = BackgroundStream(server.target, jfk[: 16000 * 5], JFK_OPENING)
    time.sleep(0.3)
    yield stream
    stream.check()
    with server.client() as client:
        assert client.health() == "SERVING"
        assert client.health("stt.v1.Speech") == "SERVING"


def config_request(**fields) -> stt_pb2.StreamingRecognizeRequest:
    config = stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16, sample_rate_hertz=16000, language_code="en")
    for name, value in fields.items():
        setattr(config, name, value)
    return stt_pb2.StreamingRecognizeRequest(
        streaming_config=stt_pb2.StreamingRecognitionConfig(config=config, interim_results=True)
    )


def audio_request(data: bytes) -> stt_pb2.StreamingRecognizeRequest:
    return stt_pb2.StreamingRecognizeRequest(audio_content=data)


def run_stream(target: str, requests) -> tuple[list, grpc.RpcError | None]:
    responses = []
    with SpeechClient(target) as client:
        try:
            for response in client.stream(requests, timeout=120):
                responses.append(response)
        except grpc.RpcError as error:
            return responses, error
    return responses, None


def assert_error(error, code: grpc.StatusCode, reason: str, *words: str) -> None:
    assert error is not None, "expected an error"
    assert error.code() == code, error.details()
    assert error_reason(rpc_status.from_call(error)) == reason
    for word in words:
        assert word in error.details(), error.details()
    assert "Traceback" not in error.details()


def pcm(audio: np.ndarray) -> list[stt_pb2.StreamingRecognizeRequest]:
    data = float_to_linear16(audio)
    return [audio_request(data[i : i + 3200]) for i in range(0, len(data), 3200)]


def test_audio_before_config(server, jfk, good_stream):
    _, error = run_stream(server.target, pcm(jfk[:16000]))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "STT_CONFIG_MISSING", "streaming_config")


def test_config_sent_twice_keeps_finals_already_due(server, jfk, good_stream):
    requests = [config_request(), *pcm(jfk[: int(16000 * 3.0)]), config_request()]
    responses, error = run_stream(server.target, requests)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "STT_CONFIG_DUPLICATE", "streaming_config")
    assert "americans" in " ".join(final_transcripts(responses)).lower()


@pytest.mark.parametrize(
    "fields,reason,words",
    [
        ({"encoding": 42}, "STT_ENCODING_UNSUPPORTED", ("encoding=42",)),
        ({"encoding": stt_pb2.ENCODING_UNSPECIFIED}, "STT_ENCODING_UNSUPPORTED", ("encoding",)),
        ({"sample_rate_hertz": 4000}, "STT_CONFIG_OUT_OF_RANGE", ("sample_rate_hertz=4000", "8000")),
        ({"sample_rate_hertz": 96000}, "STT_CONFIG_OUT_OF_RANGE", ("sample_rate_hertz=96000",)),
        ({"language_code": "fr-FR"}, "STT_LANGUAGE_UNSUPPORTED", ("fr-FR", "tiny.en")),
        ({"audio_channel_count": 12}, "STT_CONFIG_OUT_OF_RANGE", ("audio_channel_count=12",)),
        ({"model": "large-v3"}, "STT_MODEL_UNAVAILABLE", ("large-v3", "tiny.en")),
    ],
)
def test_bad_config(server, jfk, good_stream, fields, reason, words):
    _, error = run_stream(server.target, [config_request(**fields), *pcm(jfk[:8000])])
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, reason, *words)


def test_empty_and_odd_length_chunks_are_fine(server, jfk, good_stream):
    data = float_to_linear16(jfk)
    requests = [config_request(), audio_request(b"")]
    position = 0
    for size in [1, 3333, 0, 4001, 2, 1999] * 200:
        if position >= len(data):
            break
        requests.append(audio_request(data[position : position + size]))
        position += size
    requests.append(audio_request(data[position:]))
    responses, error = run_stream(server.target, requests)
    assert error is None
    assert "ask what you can do for your country" in " ".join(final_transcripts(responses)).lower().replace(
        ",", ""
    )


def test_chunk_over_the_message_limit(server, good_stream):
    requests = [config_request(), audio_request(b"\0\0" * 40000)]
    _, error = run_stream(server.target, requests)
    assert_error(error, grpc.StatusCode.OUT_OF_RANGE, "STT_CHUNK_TOO_LARGE", "80000", "65536")


def test_stream_longer_than_the_limit_delivers_finals_then_out_of_range(server, jfk, good_stream):
    two = np.concatenate([jfk, jfk])  # 22 s against the test server's 20 s limit
    responses, error = run_stream(server.target, [config_request(), *pcm(two)])
    assert_error(error, grpc.StatusCode.OUT_OF_RANGE, "STT_STREAM_TOO_LONG", "20 s")
    finals = final_transcripts(responses)
    assert sum("country" in f.lower() for f in finals) >= 2  # the first pass, and more
    billed = responses[-1].total_billed_time.ToTimedelta().total_seconds()
    assert billed == pytest.approx(20.0, abs=0.01)


def wait_for_active_streams(server, count: int, timeout: float = 10) -> None:
    with server.client() as client:
        deadline = time.monotonic() + timeout
        while client.server_info().active_streams != count:
            assert time.monotonic() < deadline, f"active streams never became {count}"
            time.sleep(0.05)


def test_client_cancel_mid_stream_frees_the_stream(server, jfk, good_stream):
    with server.client() as client:
        before = client.server_info().active_streams
        call = client.stream_audio(jfk, StreamConfig())
        got = []
        for response in call:
            got.append(response)
            if response.HasField("speech_event"):
                break
        call.cancel()
        with pytest.raises(grpc.RpcError) as raised:
            list(call)
        assert raised.value.code() == grpc.StatusCode.CANCELLED
    wait_for_active_streams(server, before)


def test_more_streams_than_the_limit_are_refused_quickly(server, good_stream):
    release = threading.Event()
    calls = []

    def stalled():
        yield config_request()
        release.wait(60)

    with server.client() as client:
        limit = client.server_info().limits.max_concurrent_streams
        active = client.server_info().active_streams
        for _ in range(limit - active):
            calls.append(client.stream(stalled()))
        wait_for_active_streams(server, limit)
        started = time.monotonic()
        _, error = run_stream(server.target, [config_request()])
        refused_in = time.monotonic() - started
        release.set()
        for call in calls:
            assert list(call) == []
    assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "STT_TOO_MANY_STREAMS", str(limit))
    assert refused_in < 1.0


def test_recognize_without_config(server):
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as raised:
            client.speech.Recognize(stt_pb2.RecognizeRequest(audio_content=b"\0" * 3200))
    assert_error(raised.value, grpc.StatusCode.INVALID_ARGUMENT, "STT_CONFIG_MISSING", "config")
