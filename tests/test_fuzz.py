"""Fuzzing the request path: arbitrary configs, chunk sizes and bytes always end in OK or a
status with ErrorInfo; never INTERNAL, UNKNOWN, a hang or a crash (issue 10)."""

from __future__ import annotations

import grpc
import pytest
from google.cloud.speech_v1 import types as google
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from riva.client.proto import riva_asr_pb2

from engine.api import stt_pb2
from engine.errors import ERROR_DOMAIN
from engine.google_api import GoogleConfig
from tests.helpers import serving

# Statuses a request can earn; anything else (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED from a
# hang, UNAVAILABLE from a crash) is a defect.
EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

text = st.one_of(st.sampled_from(["", "en", "en-US", "tiny.en", "xx"]), st.text(max_size=300))
configs = st.builds(
    stt_pb2.RecognitionConfig,
    encoding=st.integers(-2, 6),
    sample_rate_hertz=st.one_of(st.sampled_from([0, 8000, 16000, 44100, 48000]), st.integers(-5, 200_000)),
    audio_channel_count=st.integers(-1, 20),
    language_code=text,
    model=text,
    prompt=st.text(max_size=1200),
    enable_word_time_offsets=st.booleans(),
    max_alternatives=st.integers(-1, 8),
    endpointing=st.builds(
        stt_pb2.EndpointingConfig,
        silence_duration_ms=st.integers(-10, 10_000),
        max_utterance_ms=st.integers(-10, 40_000),
        speech_threshold=st.one_of(st.floats(-1, 2), st.just(float("nan"))),
    ),
)
# Most random configs are refused at once; these pass validation, so the audio path (decoding,
# resampling, VAD, decodes of whatever the bytes sound like) gets fuzzed too.
valid_configs = st.builds(
    stt_pb2.RecognitionConfig,
    encoding=st.sampled_from([stt_pb2.LINEAR16, stt_pb2.MULAW, stt_pb2.ALAW]),
    sample_rate_hertz=st.sampled_from([0, 8000, 11025, 16000, 22050, 44100, 48000]),
    audio_channel_count=st.integers(0, 8),
    language_code=st.sampled_from(["", "en", "en-US"]),
    prompt=st.text(max_size=200),
    enable_word_time_offsets=st.booleans(),
    max_alternatives=st.integers(0, 5),
)
configs = st.one_of(configs, valid_configs)
chunks = st.lists(st.binary(max_size=16_384), max_size=12)


@pytest.fixture(scope="module")
def fuzzed():
    with serving(
        "--max-streams", "8", "--max-chunk-bytes", "16384", "--config-timeout-seconds", "2",
        "--idle-timeout-seconds", "2", "--max-stream-seconds", "20",
    ) as proc:  # fmt: skip
        yield proc


def check_status(error: grpc.RpcError | None, unimplemented: bool = False) -> None:
    """OK, or an expected status with ErrorInfo; ``unimplemented``: for a method the engine
    refuses (Google's LongRunningRecognize), UNIMPLEMENTED is expected too."""
    # What each example ended in: pytest --hypothesis-show-statistics shows the spread.
    event("OK" if error is None else f"{error.code().name}: {error.details()[:50]}")
    if error is None:
        return
    expected = EXPECTED | ({grpc.StatusCode.UNIMPLEMENTED} if unimplemented else set())
    assert error.code() in expected, (error.code(), error.details())
    infos = [d for d in rpc_status.from_call(error).details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert infos, f"{error.code().name} without ErrorInfo: {error.details()}"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == ERROR_DOMAIN and info.reason.startswith("STT_")
    assert len(error.details()) < 1000


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config=configs,
    interim=st.booleans(),
    interval=st.one_of(st.just(0), st.integers(200, 10_000), st.integers(-5, 20_000)),
    first_is_audio=st.sampled_from([False] * 4 + [True]),  # mostly well-formed streams
    repeat_config=st.sampled_from([False] * 4 + [True]),
    data=chunks,
)
def test_any_stream_ends_in_ok_or_a_described_status(
    fuzzed, config, interim, interval, first_is_audio, repeat_config, data
):
    streaming = stt_pb2.StreamingRecognitionConfig(
        config=config, interim_results=interim, interim_interval_ms=interval
    )
    requests = [stt_pb2.StreamingRecognizeRequest(audio_content=chunk) for chunk in data]
    head = stt_pb2.StreamingRecognizeRequest(streaming_config=streaming)
    if first_is_audio and requests:
        requests.insert(1, head)
    else:
        requests.insert(0, head)
    if repeat_config:
        requests.append(head)
    error = None
    with fuzzed.client() as client:
        try:
            list(client.stream(requests, timeout=30))
        except grpc.RpcError as raised:
            error = raised
    check_status(error)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.one_of(st.none(), configs), audio=st.binary(max_size=40_000))
def test_any_recognize_ends_in_ok_or_a_described_status(fuzzed, config, audio):
    request = stt_pb2.RecognizeRequest(audio_content=audio)
    if config is not None:
        request.config.CopyFrom(config)
    error = None
    with fuzzed.client() as client:
        try:
            client.speech.Recognize(request, timeout=30)
        except grpc.RpcError as raised:
            error = raised
    check_status(error)


def test_the_server_is_serving_after_the_fuzzing(fuzzed):
    with fuzzed.client() as client:
        assert client.health() == "SERVING"
        assert client.server_info().active_streams == 0


def _identity(data: bytes) -> bytes:
    return data


def _with_string_bytes(message, replacement: bytes) -> bytes:
    """``message`` serialized with the bytes of its "ZZ" string field replaced: the wire format
    stays valid, the string may not be UTF-8 any more."""
    data = message.SerializeToString()
    assert data.count(b"ZZ") == 1
    return data.replace(b"ZZ", replacement)


def _stream_config(language_code: str = "en") -> stt_pb2.StreamingRecognizeRequest:
    config = stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16, language_code=language_code)
    return stt_pb2.StreamingRecognizeRequest(
        streaming_config=stt_pb2.StreamingRecognitionConfig(config=config)
    )


# Messages that may not parse: random bytes, and valid wire format with a string field whose two
# bytes may not be UTF-8 (most pairs are not). Unparseable ones end INVALID_ARGUMENT with
# STT_MESSAGE_MALFORMED (ErrorInfo), whatever the method and wherever in a stream they come,
# where they ended UNKNOWN or INTERNAL (issue 25).
string_bytes = st.binary(min_size=2, max_size=2)
raw_messages = st.one_of(
    st.binary(max_size=2000),
    string_bytes.map(lambda b: _with_string_bytes(_stream_config("ZZ"), b)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=2000),
        string_bytes.map(
            lambda b: _with_string_bytes(
                stt_pb2.RecognizeRequest(config=stt_pb2.RecognitionConfig(language_code="ZZ")), b
            )
        ),
    ),
    method=st.sampled_from(
        [
            "stt.v1.Speech/Recognize",
            "stt.v1.Speech/GetServerInfo",
            "google.cloud.speech.v1.Speech/Recognize",
            "google.cloud.speech.v1.Speech/LongRunningRecognize",
            "nvidia.riva.asr.RivaSpeechRecognition/Recognize",
            "nvidia.riva.asr.RivaSpeechRecognition/GetRivaSpeechRecognitionConfig",
        ]
    ),
)
def test_any_unary_bytes_end_in_ok_or_a_described_status(fuzzed, data, method):
    error = None
    with grpc.insecure_channel(fuzzed.target) as channel:
        call = channel.unary_unary(
            f"/{method}", request_serializer=_identity, response_deserializer=_identity
        )
        try:
            call(data, timeout=30)
        except grpc.RpcError as raised:
            error = raised
    check_status(error, unimplemented=method.endswith("LongRunningRecognize"))


# Half the configs keep to the encodings the engine decodes, so the rest of the translation and
# the audio path get fuzzed too, not only the encoding check.
google_configs = st.builds(
    GoogleConfig,
    encoding=st.one_of(st.sampled_from([1, 3]), st.integers(-2, 12)),  # LINEAR16, MULAW
    sample_rate_hertz=st.one_of(st.sampled_from([0, 8000, 16000, 48000]), st.integers(-5, 200_000)),
    audio_channel_count=st.integers(-1, 20),
    enable_separate_recognition_per_channel=st.booleans(),
    language_code=text,
    alternative_language_codes=st.lists(text, max_size=2),
    max_alternatives=st.integers(-1, 40),
    profanity_filter=st.booleans(),
    speech_contexts=st.lists(
        st.builds(
            google.SpeechContext.pb(),
            phrases=st.lists(st.text(max_size=300), max_size=5),
            boost=st.one_of(st.just(0.0), st.floats(-30, 30, allow_nan=False)),
        ),
        max_size=3,
    ),
    enable_word_time_offsets=st.booleans(),
    enable_word_confidence=st.booleans(),
    enable_automatic_punctuation=st.booleans(),
    model=text,
    use_enhanced=st.booleans(),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config=google_configs,
    audio=st.binary(max_size=20_000),
    streaming=st.booleans(),
    interim_results=st.booleans(),
    single_utterance=st.booleans(),
    voice_events=st.booleans(),
    timeouts=st.one_of(
        st.none(), st.tuples(st.integers(-2, 3), st.integers(-2, 3), st.integers(0, 999_999_999))
    ),
)
def test_any_google_call_ends_in_ok_or_a_described_status(
    fuzzed, config, audio, streaming, interim_results, single_utterance, voice_events, timeouts
):
    """Google's configs, valid or not, through both Google methods (what the official client
    sends, with its fields fuzzed)."""
    error = None
    with grpc.insecure_channel(fuzzed.target) as channel:
        try:
            if streaming:
                call = channel.stream_stream(
                    "/google.cloud.speech.v1.Speech/StreamingRecognize",
                    request_serializer=_serialize,
                    response_deserializer=google.StreamingRecognizeResponse.pb().FromString,
                )
                first = google.StreamingRecognitionConfig.pb()(
                    config=config,
                    interim_results=interim_results,
                    single_utterance=single_utterance,
                    enable_voice_activity_events=voice_events,
                )
                if timeouts is not None:
                    start, end, nanos = timeouts
                    first.voice_activity_timeout.speech_start_timeout.seconds = start
                    first.voice_activity_timeout.speech_end_timeout.seconds = end
                    first.voice_activity_timeout.speech_end_timeout.nanos = nanos if end >= 0 else -nanos
                Request = google.StreamingRecognizeRequest.pb()
                requests = [Request(streaming_config=first)]
                requests += [Request(audio_content=audio[i : i + 8000]) for i in range(0, len(audio), 8000)]
                list(call(iter(requests), timeout=30))
            else:
                call = channel.unary_unary(
                    "/google.cloud.speech.v1.Speech/Recognize",
                    request_serializer=_serialize,
                    response_deserializer=google.RecognizeResponse.pb().FromString,
                )
                request = google.RecognizeRequest.pb()(config=config)
                request.audio.content = audio
                call(request, timeout=30)
        except grpc.RpcError as raised:
            error = raised
    check_status(error)


def _serialize(message) -> bytes:
    return message.SerializeToString()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=raw_messages, position=st.integers(0, 3))
def test_any_stream_bytes_end_in_ok_or_a_described_status(fuzzed, bad, position):
    good = [_stream_config().SerializeToString()]
    good += [stt_pb2.StreamingRecognizeRequest(audio_content=b"\0" * 320).SerializeToString()] * 3
    messages = good[:position] + [bad] + good[position + 1 :]  # in the place of a good one
    error = None
    with grpc.insecure_channel(fuzzed.target) as channel:
        call = channel.stream_stream(
            "/stt.v1.Speech/StreamingRecognize", request_serializer=_identity, response_deserializer=_identity
        )
        try:
            list(call(iter(messages), timeout=30))
        except grpc.RpcError as raised:
            error = raised
    check_status(error)


riva_configs = st.builds(
    riva_asr_pb2.RecognitionConfig,
    encoding=st.one_of(st.sampled_from([1, 3, 20]), st.integers(-2, 25)),  # LINEAR_PCM, MULAW, ALAW
    sample_rate_hertz=st.one_of(st.sampled_from([0, 8000, 16000, 48000]), st.integers(-5, 200_000)),
    language_code=text,
    max_alternatives=st.integers(-1, 40),
    profanity_filter=st.booleans(),
    speech_contexts=st.lists(
        st.builds(
            riva_asr_pb2.SpeechContext,
            phrases=st.lists(st.text(max_size=300), max_size=5),
            boost=st.floats(-30, 30, allow_nan=False),
        ),
        max_size=3,
    ),
    audio_channel_count=st.integers(-1, 20),
    enable_word_time_offsets=st.booleans(),
    enable_automatic_punctuation=st.booleans(),
    enable_separate_recognition_per_channel=st.booleans(),
    model=text,
    verbatim_transcripts=st.booleans(),
    custom_configuration=st.one_of(
        st.just({}), st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=2)
    ),
    endpointing_config=st.one_of(
        st.builds(riva_asr_pb2.EndpointingConfig),
        st.builds(
            riva_asr_pb2.EndpointingConfig,
            start_history=st.integers(-10, 5000),
            start_threshold=st.floats(-1, 2, allow_nan=False),
            stop_history=st.integers(-10, 10_000),
            stop_threshold=st.floats(-1, 2, allow_nan=False),
        ),
    ),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=riva_configs, audio=st.binary(max_size=20_000), streaming=st.booleans(), interim=st.booleans())
def test_any_riva_call_ends_in_ok_or_a_described_status(fuzzed, config, audio, streaming, interim):
    """Riva's configs, valid or not, through both Riva recognition methods."""
    error = None
    with grpc.insecure_channel(fuzzed.target) as channel:
        try:
            if streaming:
                call = channel.stream_stream(
                    "/nvidia.riva.asr.RivaSpeechRecognition/StreamingRecognize",
                    request_serializer=_serialize,
                    response_deserializer=riva_asr_pb2.StreamingRecognizeResponse.FromString,
                )
                first = riva_asr_pb2.StreamingRecognitionConfig(config=config, interim_results=interim)
                requests = [riva_asr_pb2.StreamingRecognizeRequest(streaming_config=first)]
                requests += [
                    riva_asr_pb2.StreamingRecognizeRequest(audio_content=audio[i : i + 8000])
                    for i in range(0, len(audio), 8000)
                ]
                list(call(iter(requests), timeout=30))
            else:
                call = channel.unary_unary(
                    "/nvidia.riva.asr.RivaSpeechRecognition/Recognize",
                    request_serializer=_serialize,
                    response_deserializer=riva_asr_pb2.RecognizeResponse.FromString,
                )
                call(riva_asr_pb2.RecognizeRequest(config=config, audio=audio), timeout=30)
        except grpc.RpcError as raised:
            error = raised
    check_status(error)
