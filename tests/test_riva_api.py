"""nvidia.riva.asr.RivaSpeechRecognition, driven by the unmodified official client
(nvidia-riva-client's ``riva.client.ASRService``), against the shared ``api_server``."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import riva.client
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from riva.client.proto import riva_asr_pb2

from engine.api import stt_pb2
from engine.audio import float_to_linear16
from engine.client import SpeechClient as SttClient
from engine.client import StreamConfig, final_transcripts
from engine.compat import strip_punctuation
from tests.helpers import ffmpeg, long_segment, normalize, wer

STREAMING = "nvidia.riva.asr.RivaSpeechRecognition/StreamingRecognize"
JFK_TEXT = (
    "and so my fellow americans ask not what your country can do for you ask what you can do for your country"
)


@pytest.fixture
def asr(api_server) -> riva.client.ASRService:
    server, _ = api_server
    return riva.client.ASRService(riva.client.Auth(uri=server.target))


def config(**fields) -> riva.client.RecognitionConfig:
    defaults = dict(
        encoding=riva.client.AudioEncoding.LINEAR_PCM,
        sample_rate_hertz=16000,
        language_code="en-US",
        max_alternatives=1,
        enable_automatic_punctuation=True,
    )
    return riva.client.RecognitionConfig(**(defaults | fields))


def paced_chunks(data: bytes, bytes_per_second: int, chunk_ms: int = 100):
    """Audio chunks at real time, as a microphone gives them."""
    size = bytes_per_second * chunk_ms // 1000
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(data), size)):
        time.sleep(max(0.0, started + index * chunk_ms / 1000 - time.monotonic()))
        yield data[offset : offset + size]


def stt_recognize(target: str, audio, **fields) -> stt_pb2.RecognizeResponse:
    with SttClient(target) as stt:
        return stt.recognize(audio, StreamConfig(language_code="en-US", **fields))


def test_offline_recognize_equals_stt_v1_with_word_offsets_in_ms(api_server, asr, jfk):
    server, _ = api_server
    segment, reference = long_segment("1998-15444-0001")
    for audio in (jfk, segment):
        request_config = config(enable_word_time_offsets=True)
        response = asr.offline_recognize(float_to_linear16(audio), request_config)
        expected = stt_recognize(server.target, audio, enable_word_time_offsets=True)
        assert [r.alternatives[0].transcript for r in response.results] == [
            r.alternatives[0].transcript for r in expected.results
        ]
        ours = [w for r in expected.results for w in r.alternatives[0].words]
        theirs = [w for r in response.results for w in r.alternatives[0].words]
        assert [w.word for w in theirs] == [w.word.strip() for w in ours]
        assert [w.start_time for w in theirs] == [round(w.start_offset.ToMilliseconds()) for w in ours]
        assert all(w.end_time > w.start_time for w in theirs)
        assert {r.channel_tag for r in response.results} == {1}
        assert response.results[-1].audio_processed == pytest.approx(len(audio) / 16000, abs=0.01)
    assert wer([reference], [" ".join(r.alternatives[0].transcript for r in response.results)]) < 0.2


def test_streaming_response_generator_at_real_time_on_a_real_reading(api_server, asr):
    """A LibriSpeech reading from ../shared/audio-long at real time: interims before each final,
    no events, and finals whose words equal those of an stt.v1 stream running beside it."""
    server, _ = api_server
    audio, reference = long_segment("1998-15444-0001")
    beside: list[str] = []

    def stt_stream() -> None:
        with SttClient(server.target) as stt:
            beside.extend(final_transcripts(stt.stream_audio(audio, StreamConfig(language_code="en-US"))))

    thread = threading.Thread(target=stt_stream)
    thread.start()
    streaming = riva.client.StreamingRecognitionConfig(
        config=config(enable_word_time_offsets=True), interim_results=True
    )
    chunks = paced_chunks(float_to_linear16(audio), 32000)
    responses = list(asr.streaming_response_generator(audio_chunks=chunks, streaming_config=streaming))
    thread.join(60)
    results = [r.results[0] for r in responses]  # every response carries a result
    finals = [r for r in results if r.is_final]
    assert finals and not results[0].is_final
    assert all(r.channel_tag == 1 for r in results)
    processed = [r.audio_processed for r in results]
    assert processed == sorted(processed) and processed[-1] <= len(audio) / 16000 + 0.01
    words = [w for r in finals for w in r.alternatives[0].words]
    assert all(a.start_time <= b.start_time for a, b in zip(words, words[1:]))
    transcript = " ".join(r.alternatives[0].transcript for r in finals)
    assert normalize(transcript) == normalize(" ".join(beside))
    assert wer([reference], [transcript]) < 0.2


def test_telephone_audio_without_punctuation_equals_stt_v1(api_server, asr, jfk):
    server, _ = api_server
    pcm = float_to_linear16(jfk)
    for encoding, name, stt_encoding in (
        (riva.client.AudioEncoding.MULAW, "mulaw", stt_pb2.MULAW),
        (riva.client.AudioEncoding.ALAW, "alaw", stt_pb2.ALAW),
    ):
        data = ffmpeg(
            "-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-", "-ar", "8000", "-f", name, "-", data=pcm
        )
        response = asr.offline_recognize(data, config(encoding=encoding, sample_rate_hertz=8000,
                                                      enable_automatic_punctuation=False))  # fmt: skip
        stt_config = stt_pb2.RecognitionConfig(
            encoding=stt_encoding, sample_rate_hertz=8000, language_code="en-US"
        )
        with SttClient(server.target) as stt:
            expected = stt.speech.Recognize(stt_pb2.RecognizeRequest(config=stt_config, audio_content=data))
        assert [r.alternatives[0].transcript for r in response.results] == [
            strip_punctuation(r.alternatives[0].transcript) for r in expected.results
        ]


def test_endpointing_config_stop_history_is_the_endpoint_silence(asr, jfk):
    # JFK pauses about 0.8 s between its three phrases: the default endpoint (700 ms) cuts
    # there, Riva's stop_history of 2 s does not.
    pcm = float_to_linear16(jfk)
    default = asr.offline_recognize(pcm, config())
    long_silence = config()
    riva.client.add_endpoint_parameters_to_config(long_silence, -1, -1.0, 2000, -1, -1.0, -1.0)
    patient = asr.offline_recognize(pcm, long_silence)
    assert len(default.results) >= 2 and len(patient.results) == 1
    assert normalize(patient.results[0].alternatives[0].transcript) == normalize(
        " ".join(r.alternatives[0].transcript for r in default.results)
    )


def test_the_riva_config_describes_the_loaded_model(asr):
    response = asr.stub.GetRivaSpeechRecognitionConfig(riva_asr_pb2.RivaSpeechRecognitionConfigRequest())
    (model,) = response.model_config
    assert model.model_name == "tiny.en"
    assert model.parameters["language_code"] == "en-US" and model.parameters["streaming"] == "true"
    other = asr.stub.GetRivaSpeechRecognitionConfig(
        riva_asr_pb2.RivaSpeechRecognitionConfigRequest(model_name="conformer-en-US-asr-streaming")
    )
    assert not other.model_config


def field_violation(error: grpc.RpcError) -> str:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    raise AssertionError(f"no field violation in {error.details()}")


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(encoding=riva.client.AudioEncoding.ENCODING_UNSPECIFIED), "config.encoding"),
        (dict(encoding=55), "config.encoding"),
        (
            dict(diarization_config=riva_asr_pb2.SpeakerDiarizationConfig(enable_speaker_diarization=True)),
            "config.diarization_config",
        ),  # fmt: skip
        (
            dict(custom_configuration={"apply_cmudict": "true"}),
            "config.custom_configuration['apply_cmudict']",
        ),
        (
            dict(endpointing_config=riva_asr_pb2.EndpointingConfig(stop_threshold=0.5)),
            "config.endpointing_config.stop_threshold",
        ),  # fmt: skip
        (
            dict(endpointing_config=riva_asr_pb2.EndpointingConfig(stop_history=50)),
            "config.endpointing.silence_duration_ms",
        ),  # fmt: skip
        (dict(model="conformer-en-US-asr-streaming"), "config.model"),
        (dict(language_code="de-DE"), "config.language_code"),
        (
            dict(speech_contexts=[riva_asr_pb2.SpeechContext(phrases=["no"], boost=-5)]),
            "config.speech_contexts[0].boost",
        ),  # fmt: skip
    ],
)
def test_a_config_the_engine_cannot_honour_is_refused_naming_the_field(asr, fields, field):
    with pytest.raises(grpc.RpcError) as raised:
        asr.offline_recognize(bytes(3200), config(**fields))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violation(raised.value) == field


def test_stream_refusals_and_the_server_keeps_serving(api_server, asr):
    server, _ = api_server
    streaming = riva.client.StreamingRecognitionConfig(config=config(encoding=riva.client.AudioEncoding.FLAC))
    with pytest.raises(grpc.RpcError) as raised:
        list(asr.streaming_response_generator(audio_chunks=[bytes(3200)], streaming_config=streaming))
    assert field_violation(raised.value) == "audio_content" and "fLaC" in raised.value.details()
    with SttClient(server.target) as stt:
        assert stt.health("nvidia.riva.asr.RivaSpeechRecognition") == "SERVING"


def test_word_boosting_goes_to_the_prompt_and_is_traced(api_server, asr, jfk):
    _, receiver = api_server
    boosted = config()
    riva.client.add_word_boosting_to_config(boosted, ["Americans", "country"], 20.0)
    streaming = riva.client.StreamingRecognitionConfig(config=boosted, interim_results=False)
    pcm = float_to_linear16(jfk)
    chunks = [pcm[i : i + 3200] for i in range(0, len(pcm), 3200)]
    responses = list(asr.streaming_response_generator(audio_chunks=chunks, streaming_config=streaming))
    transcript = " ".join(r.results[0].alternatives[0].transcript for r in responses)
    assert wer([JFK_TEXT], [transcript]) < 0.1

    def traced() -> bool:
        streams = [s for s in receiver.spans() if s.name == STREAMING]
        if not streams:
            return False
        names = [s.name for s in receiver.spans() if s.trace_id == streams[-1].trace_id]
        return names.count("stt.chunk") == len(chunks) and "stt.decode.final" in names

    receiver.wait_for(traced)


def test_flac_streams_and_ogg_opus_recognizes(asr, jfk):
    pcm = float_to_linear16(jfk)
    flac = ffmpeg("-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-", "-f", "flac", "-", data=pcm)
    streaming = riva.client.StreamingRecognitionConfig(
        config=config(encoding=riva.client.AudioEncoding.FLAC), interim_results=True
    )
    chunks = paced_chunks(flac, round(len(flac) / (len(jfk) / 16000)))
    responses = list(asr.streaming_response_generator(audio_chunks=chunks, streaming_config=streaming))
    finals = [r.results[0].alternatives[0].transcript for r in responses if r.results[0].is_final]
    assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1
    assert responses[-1].results[0].audio_processed == pytest.approx(11.0, abs=0.1)
    source = ("-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-")
    opus = ffmpeg(*source, "-c:a", "libopus", "-b:a", "24k", "-f", "ogg", "-", data=pcm)
    response = asr.offline_recognize(opus, config(encoding=riva.client.AudioEncoding.OGGOPUS))
    assert wer([JFK_TEXT], [" ".join(r.alternatives[0].transcript for r in response.results)]) < 0.1
