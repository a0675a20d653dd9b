"""Bad input gets a precise gRPC error; a parallel good stream and the server are unaffected."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from engine.api import stt_pb2
from engine.audio import float_to_linear16
from engine.client import SpeechClient, StreamConfig, final_transcripts
from engine.errors import ERROR_DOMAIN, RETRY_DELAYS
from tests.helpers import (
    JFK_OPENING,
    JFK_TEXT,
    BackgroundStream,
    assert_retry_after,
    retry_delay,
    retry_pushback_ms,
    wait_until,
)


def start_good_stream(server, audio, expected: str) -> BackgroundStream:
    """A real-time stream, confirmed to be served before the test goes on."""
    stream = BackgroundStream(server.target, audio, expected)
    stream.wait_started()
    assert server.active_streams() >= 1
    return stream


def check_unaffected(server, stream: BackgroundStream) -> None:
    stream.check()
    with server.client() as client:
        assert client.health() == "SERVING"
        assert client.health("stt.v1.Speech") == "SERVING"


@pytest.fixture
def good_stream(server, jfk):
    """A real-time stream of JFK's opening running during the test, checked after it."""
    stream = start_good_stream(server, jfk[: 16000 * 5], JFK_OPENING)
    yield stream
    check_unaffected(server, stream)


def config_request(
    endpointing: dict | None = None, interim_interval_ms: int = 0, **fields
) -> stt_pb2.StreamingRecognizeRequest:
    config = stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16, sample_rate_hertz=16000, language_code="en")
    for name, value in fields.items():
        setattr(config, name, value)
    for name, value in (endpointing or {}).items():
        setattr(config.endpointing, name, value)
    return stt_pb2.StreamingRecognizeRequest(
        streaming_config=stt_pb2.StreamingRecognitionConfig(
            config=config, interim_results=True, interim_interval_ms=interim_interval_ms
        )
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


def error_details(error: grpc.RpcError) -> dict:
    """The google.rpc details of a failed call, by type."""
    found = {}
    for detail in rpc_status.from_call(error).details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind] = message
    return found


def assert_error(error, code: grpc.StatusCode, reason: str, *words: str, field: str | None = None) -> None:
    """The status, its ErrorInfo (reason, domain), RetryInfo when the reason is retryable, and,
    for a bad field, its BadRequest."""
    assert error is not None, "expected an error"
    assert error.code() == code, error.details()
    details = error_details(error)
    info = details[error_details_pb2.ErrorInfo]
    assert (info.reason, info.domain) == (reason, ERROR_DOMAIN)
    for word in words:
        assert word in error.details(), error.details()
    assert "Traceback" not in error.details()
    if reason in RETRY_DELAYS:
        assert_retry_after(error, reason)
    else:  # repeating the same request would only be refused again
        assert retry_delay(error) is None and retry_pushback_ms(error) is None
    if field is None:
        assert error_details_pb2.BadRequest not in details
    else:
        (violation,) = details[error_details_pb2.BadRequest].field_violations
        assert violation.field == field and violation.description == error.details()


def pcm(audio: np.ndarray) -> list[stt_pb2.StreamingRecognizeRequest]:
    data = float_to_linear16(audio)
    return [audio_request(data[i : i + 3200]) for i in range(0, len(data), 3200)]


def test_audio_before_config(server, jfk, good_stream):
    _, error = run_stream(server.target, pcm(jfk[:16000]))
    assert_error(
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "STT_CONFIG_MISSING",
        "streaming_config",
        field="streaming_config",
    )


def test_config_sent_twice_keeps_finals_already_due(server, jfk, good_stream):
    requests = [config_request(), *pcm(jfk[: int(16000 * 3.0)]), config_request()]
    responses, error = run_stream(server.target, requests)
    assert_error(
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "STT_CONFIG_DUPLICATE",
        "streaming_config",
        field="streaming_config",
    )
    assert "americans" in " ".join(final_transcripts(responses)).lower()


F = "streaming_config.config."
RANGE = "STT_CONFIG_OUT_OF_RANGE"


@pytest.mark.parametrize(
    "fields,reason,words,field",
    [
        ({"encoding": 42}, "STT_ENCODING_UNSUPPORTED", ("encoding=42",), F + "encoding"),
        ({"encoding": stt_pb2.ENCODING_UNSPECIFIED}, "STT_ENCODING_UNSUPPORTED", ("encoding",),
         F + "encoding"),
        ({"sample_rate_hertz": 4000}, RANGE, ("sample_rate_hertz=4000", "8000"),
         F + "sample_rate_hertz"),
        ({"sample_rate_hertz": 96000}, RANGE, ("sample_rate_hertz=96000",),
         F + "sample_rate_hertz"),
        ({"language_code": "fr-FR"}, "STT_LANGUAGE_UNSUPPORTED", ("fr-FR", "tiny.en"), F + "language_code"),
        ({"audio_channel_count": 12}, RANGE, ("audio_channel_count=12",),
         F + "audio_channel_count"),
        ({"model": "large-v3"}, "STT_MODEL_UNAVAILABLE", ("large-v3", "tiny.en"), F + "model"),
        ({"max_alternatives": 6}, RANGE, ("max_alternatives=6", "1..5"),
         F + "max_alternatives"),
        ({"endpointing": {"silence_duration_ms": 50}}, RANGE,
         ("silence_duration_ms=50", "100..5000 ms"), F + "endpointing.silence_duration_ms"),
        ({"endpointing": {"silence_duration_ms": 6000}}, RANGE,
         ("silence_duration_ms=6000",), F + "endpointing.silence_duration_ms"),
        ({"endpointing": {"max_utterance_ms": 29000}}, RANGE,
         ("max_utterance_ms=29000", "2000..28000 ms"), F + "endpointing.max_utterance_ms"),
        ({"endpointing": {"speech_threshold": 0.99}}, RANGE,
         ("speech_threshold=0.99",), F + "endpointing.speech_threshold"),
        ({"interim_interval_ms": 100}, RANGE, ("interim_interval_ms=100", "200..10000 ms"),
         "streaming_config.interim_interval_ms"),
    ],
)  # fmt: skip
def test_bad_config(server, jfk, good_stream, fields, reason, words, field):
    _, error = run_stream(server.target, [config_request(**fields), *pcm(jfk[:8000])])
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, reason, *words, field=field)


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
    assert_error(
        error, grpc.StatusCode.OUT_OF_RANGE, "STT_CHUNK_TOO_LARGE", "80000", "65536", field="audio_content"
    )


def test_stream_longer_than_the_limit_delivers_finals_then_out_of_range(server, jfk, good_stream):
    two = np.concatenate([jfk, jfk])  # 22 s against the test server's 20 s limit
    responses, error = run_stream(server.target, [config_request(), *pcm(two)])
    assert_error(error, grpc.StatusCode.OUT_OF_RANGE, "STT_STREAM_TOO_LONG", "20 s", field="audio_content")
    finals = final_transcripts(responses)
    assert sum("country" in f.lower() for f in finals) >= 2  # the first pass, and more
    billed = responses[-1].total_billed_time.ToTimedelta().total_seconds()
    assert billed == pytest.approx(20.0, abs=0.01)


def wait_for_active_streams(server, count: int, timeout: float = 10) -> None:
    wait_until(lambda: server.active_streams() == count, timeout, what=f"{count} active streams")


def test_client_cancel_mid_stream_frees_the_stream(server, jfk, good_stream):
    with server.client() as client:
        call = client.stream_audio(jfk, StreamConfig())
        for response in call:
            if response.HasField("speech_event"):
                break
        wait_for_active_streams(server, 2)  # the good stream and this one
        call.cancel()
        with pytest.raises(grpc.RpcError) as raised:
            list(call)
        assert raised.value.code() == grpc.StatusCode.CANCELLED
    wait_for_active_streams(server, 1)  # only the good stream, still running
    assert good_stream.running
    good_stream.check()
    wait_for_active_streams(server, 0)


def test_more_streams_than_the_limit_are_refused_quickly(server, jfk):
    wait_for_active_streams(server, 0)  # streams of earlier tests are gone
    # The whole 11 s speech as the good stream: it outlives the filling and the refusal.
    good = start_good_stream(server, jfk, JFK_TEXT)
    release = threading.Event()

    def stalled():
        yield config_request()
        release.wait(60)

    with server.client() as client:
        limit = client.server_info().limits.max_concurrent_streams
        calls = [client.stream(stalled()) for _ in range(limit - 1)]  # the good one is the last
        wait_for_active_streams(server, limit)
        started = time.monotonic()
        _, error = run_stream(server.target, [config_request()])
        refused_in = time.monotonic() - started
        assert good.running, "the good stream ended before the refusal: the count was not full"
        release.set()
        for call in calls:
            assert list(call) == []
    assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "STT_TOO_MANY_STREAMS", str(limit))
    assert refused_in < 1.0
    check_unaffected(server, good)


def test_recognize_without_config(server):
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as raised:
            client.speech.Recognize(stt_pb2.RecognizeRequest(audio_content=b"\0" * 3200))
    assert_error(
        raised.value, grpc.StatusCode.INVALID_ARGUMENT, "STT_CONFIG_MISSING", "config", field="config"
    )
