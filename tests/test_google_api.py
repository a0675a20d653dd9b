"""google.cloud.speech.v1.Speech, driven by the unmodified official client (google-cloud-speech).

One server exporting OTLP to a receiver here (``api_server``, shared with the Riva tests); the
client's ``SpeechClient`` gets a gRPC channel to it, as a user moving from the hosted service
would give it one.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.api_core import exceptions
from google.cloud import speech_v1 as speech
from google.cloud.speech_v1.services.speech.transports import SpeechGrpcTransport

from engine.api import stt_pb2
from engine.audio import float_to_linear16
from engine.client import SpeechClient as SttClient
from engine.client import StreamConfig, audio_requests, final_transcripts
from engine.compat import mask_profanity, strip_punctuation
from tests.helpers import amr_narrowband, amr_wideband, ffmpeg, long_segment, normalize, tool, wer

Encoding = speech.RecognitionConfig.AudioEncoding
Event = speech.StreamingRecognizeResponse.SpeechEventType
STREAMING = "google.cloud.speech.v1.Speech/StreamingRecognize"
JFK_TEXT = (
    "and so my fellow americans ask not what your country can do for you ask what you can do for your country"
)


@pytest.fixture
def client(api_server):
    server, _ = api_server
    channel = grpc.insecure_channel(server.target)
    yield speech.SpeechClient(transport=SpeechGrpcTransport(channel=channel))
    channel.close()


def config(**fields) -> speech.RecognitionConfig:
    defaults = dict(
        encoding=Encoding.LINEAR16,
        sample_rate_hertz=16000,
        language_code="en-US",
        enable_automatic_punctuation=True,
    )
    return speech.RecognitionConfig(**(defaults | fields))


def paced(data: bytes, bytes_per_second: int, chunk_ms: int = 100):
    """Audio requests at real time, as a microphone sends them."""
    size = bytes_per_second * chunk_ms // 1000
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(data), size)):
        time.sleep(max(0.0, started + index * chunk_ms / 1000 - time.monotonic()))
        yield speech.StreamingRecognizeRequest(audio_content=data[offset : offset + size])


def seconds(duration) -> float:
    return duration.total_seconds()


def test_recognize_equals_the_stt_v1_transcripts_and_word_offsets(api_server, client, jfk):
    server, _ = api_server
    segment, reference = long_segment("1998-15444-0000")
    for audio in (jfk, segment):
        response = client.recognize(
            config=config(enable_word_time_offsets=True, enable_word_confidence=True),
            audio=speech.RecognitionAudio(content=float_to_linear16(audio)),
        )
        with SttClient(server.target) as stt:
            expected = stt.recognize(
                audio, StreamConfig(enable_word_time_offsets=True, language_code="en-US")
            )
        assert [r.alternatives[0].transcript for r in response.results] == [
            r.alternatives[0].transcript for r in expected.results
        ]
        ours = [w for r in expected.results for w in r.alternatives[0].words]
        theirs = [w for r in response.results for w in r.alternatives[0].words]
        assert [w.word for w in theirs] == [w.word.strip() for w in ours]
        assert [seconds(w.start_time) for w in theirs] == [
            w.start_offset.ToTimedelta().total_seconds() for w in ours
        ]
        assert all(0 < w.confidence <= 1 for w in theirs)
        assert response.results[-1].language_code == "en-us"
        assert seconds(response.total_billed_time) == pytest.approx(len(audio) / 16000, abs=1)
    assert wer([reference], [" ".join(r.alternatives[0].transcript for r in response.results)]) < 0.2


def test_streaming_recognize_with_the_clients_helper(api_server, client, jfk):
    """Real-time paced through ``SpeechClient.streaming_recognize``: interims before each final,
    voice activity events around them, and the finals' words equal those of an stt.v1 stream of
    the same audio running beside it."""
    server, _ = api_server
    beside: list[str] = []

    def stt_stream() -> None:
        with SttClient(server.target) as stt:
            beside.extend(final_transcripts(stt.stream_audio(jfk, StreamConfig(language_code="en-US"))))

    thread = threading.Thread(target=stt_stream)
    thread.start()
    streaming = speech.StreamingRecognitionConfig(
        config=config(enable_word_time_offsets=True),
        interim_results=True,
        enable_voice_activity_events=True,
    )
    responses = list(
        client.streaming_recognize(config=streaming, requests=paced(float_to_linear16(jfk), 32000))
    )
    thread.join(60)
    events = [r.speech_event_type for r in responses if r.speech_event_type]
    assert events[0] == Event.SPEECH_ACTIVITY_BEGIN and Event.SPEECH_ACTIVITY_END in events
    results = [r.results[0] for r in responses if r.results]
    finals = [r for r in results if r.is_final]
    assert finals and not results[0].is_final  # an interim came first
    assert all(0 <= r.stability < 1 for r in results if not r.is_final)
    assert all(r.alternatives[0].confidence == 0 for r in results if not r.is_final)
    words = [w for r in finals for w in r.alternatives[0].words]
    assert all(seconds(a.start_time) <= seconds(b.start_time) for a, b in zip(words, words[1:]))
    assert seconds(words[-1].end_time) <= len(jfk) / 16000 + 0.1
    assert seconds(finals[-1].result_end_time) <= len(jfk) / 16000 + 0.1
    transcript = " ".join(r.alternatives[0].transcript for r in finals)
    assert normalize(transcript) == normalize(" ".join(beside))
    assert seconds(responses[-1].total_billed_time) == pytest.approx(len(jfk) / 16000, abs=0.2)


def test_mulaw_8khz_single_utterance_without_punctuation(api_server, client, jfk):
    mulaw = ffmpeg("-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-", "-ar", "8000", "-f", "mulaw", "-",
                   data=float_to_linear16(jfk))  # fmt: skip
    streaming = speech.StreamingRecognitionConfig(
        config=config(encoding=Encoding.MULAW, sample_rate_hertz=8000, enable_automatic_punctuation=False),
        single_utterance=True,
    )
    responses = list(client.streaming_recognize(config=streaming, requests=paced(mulaw, 8000)))
    events = [r.speech_event_type for r in responses if r.speech_event_type]
    assert events == [Event.END_OF_SINGLE_UTTERANCE]  # voice activity events were not asked for
    (final,) = [r.results[0] for r in responses if r.results and r.results[0].is_final]
    with SttClient(api_server[0].target) as stt:
        stt_config = StreamConfig(
            encoding=stt_pb2.MULAW, sample_rate_hertz=8000, single_utterance=True, language_code="en-US"
        )
        mulaw_requests = (
            stt_pb2.StreamingRecognizeRequest(audio_content=r.audio_content) for r in paced(mulaw, 8000)
        )
        (expected,) = final_transcripts(
            stt.stream(itertools.chain([stt_config.first_request()], mulaw_requests))
        )
    assert final.alternatives[0].transcript == strip_punctuation(expected)
    assert normalize(expected).startswith("and so my fellow american")


def test_output_options_are_plain_functions():
    assert strip_punctuation('Ask not, "what" (your) country can do? It\'s 3.5 - well-known!') == (
        "Ask not what your country can do It's 3.5 - well-known"
    )
    assert strip_punctuation("'Tis the 1,000 cats' toys.") == "Tis the 1,000 cats toys"
    assert (
        mask_profanity("Well, shit. Shitake is not fucking rude") == "Well, s***. Shitake is not f****** rude"
    )


def test_speech_contexts_and_profanity_filter_are_honoured(client, jfk):
    response = client.recognize(
        config=config(
            speech_contexts=[speech.SpeechContext(phrases=["Americans", "country"])], profanity_filter=True
        ),
        audio=speech.RecognitionAudio(content=float_to_linear16(jfk)),
    )
    transcript = " ".join(r.alternatives[0].transcript for r in response.results)
    assert wer([JFK_TEXT], [transcript]) < 0.1


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(encoding=Encoding.SPEEX_WITH_HEADER_BYTE), "config.encoding"),
        (dict(encoding=Encoding.ENCODING_UNSPECIFIED), "config.encoding"),
        (dict(encoding=77), "config.encoding"),
        (
            dict(diarization_config=speech.SpeakerDiarizationConfig(enable_speaker_diarization=True)),
            "config.diarization_config",
        ),  # fmt: skip
        (dict(alternative_language_codes=["de-DE"]), "config.alternative_language_codes"),
        (dict(language_code="de-DE"), "config.language_code"),
        (dict(sample_rate_hertz=1000), "config.sample_rate_hertz"),
        (dict(max_alternatives=50), "config.max_alternatives"),
        (dict(speech_contexts=[speech.SpeechContext(phrases=["x" * 2000])]), "config.speech_contexts"),
        (
            dict(enable_separate_recognition_per_channel=True, audio_channel_count=2),
            "config.enable_separate_recognition_per_channel",
        ),  # fmt: skip
    ],
)
def test_a_config_the_engine_cannot_honour_is_refused_naming_the_field(client, fields, field):
    with pytest.raises(exceptions.InvalidArgument) as raised:
        client.recognize(config=config(**fields), audio=speech.RecognitionAudio(content=bytes(3200)))
    assert field in raised.value.message
    (violation,) = [d for d in raised.value.details if hasattr(d, "field_violations")][0].field_violations
    assert violation.field == field


def test_refusals_come_back_as_the_client_raises_them_and_the_server_keeps_serving(api_server, client):
    server, _ = api_server
    with pytest.raises(exceptions.MethodNotImplemented, match="StreamingRecognize"):
        client.long_running_recognize(config=config(), audio=speech.RecognitionAudio(content=bytes(3200)))
    with pytest.raises(exceptions.InvalidArgument, match="audio.uri"):
        client.recognize(config=config(), audio=speech.RecognitionAudio(uri="gs://bucket/file.wav"))
    with pytest.raises(exceptions.InvalidArgument, match="audio_content: expected an Ogg page"):
        ogg = config(encoding=Encoding.OGG_OPUS, sample_rate_hertz=16000)
        client.recognize(config=ogg, audio=speech.RecognitionAudio(content=b"OggS" + bytes(4000)))
    # A timeout needs voice activity events, as Google's API says.
    timeout = speech.StreamingRecognitionConfig.VoiceActivityTimeout(speech_start_timeout={"seconds": 5})
    streaming = speech.StreamingRecognitionConfig(config=config(), voice_activity_timeout=timeout)
    with pytest.raises(exceptions.InvalidArgument, match="voice_activity_timeout"):
        list(client.streaming_recognize(config=streaming, requests=iter([])))
    # The stream's first message is the config; a second config is the client's mistake.
    again = iter(
        [
            speech.StreamingRecognizeRequest(
                streaming_config=speech.StreamingRecognitionConfig(config=config())
            )
        ]
    )
    with pytest.raises(exceptions.InvalidArgument, match="streaming_config was sent again"):
        list(
            client.streaming_recognize(
                config=speech.StreamingRecognitionConfig(config=config()), requests=again
            )
        )
    with SttClient(server.target) as stt:
        assert stt.health() == "SERVING" and stt.health("google.cloud.speech.v1.Speech") == "SERVING"


def test_reflection_lists_and_describes_the_google_service(api_server):
    server, _ = api_server
    listed = subprocess.run(
        [tool("grpcurl"), "-plaintext", server.target, "list"], capture_output=True, text=True
    )
    assert "google.cloud.speech.v1.Speech" in listed.stdout.split(), listed.stderr
    described = subprocess.run(
        [tool("grpcurl"), "-plaintext", server.target, "describe", "google.cloud.speech.v1.Speech"],
        capture_output=True,
        text=True,
    )
    assert (
        "rpc StreamingRecognize ( stream .google.cloud.speech.v1.StreamingRecognizeRequest )"
        in described.stdout
    )


def test_a_google_stream_is_traced_with_chunk_and_decode_spans(api_server, client, jfk):
    _, receiver = api_server
    audio = jfk[: 3 * 16000]
    requests = list(audio_requests(audio, realtime=False))
    list(client.streaming_recognize(
        config=speech.StreamingRecognitionConfig(config=config()),
        requests=(speech.StreamingRecognizeRequest(audio_content=r.audio_content) for r in requests),
    ))  # fmt: skip

    def traced() -> bool:
        streams = [s for s in receiver.spans() if s.name == STREAMING]
        if not streams:
            return False
        trace_id = streams[-1].trace_id
        names = [s.name for s in receiver.spans() if s.trace_id == trace_id]
        return names.count("stt.chunk") == len(requests) and "stt.decode.final" in names

    receiver.wait_for(traced)
    (span,) = [s for s in receiver.spans() if s.name == STREAMING][-1:]
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["rpc.method"].string_value == STREAMING
    assert attributes["stt.google.model"].string_value == "default"
    assert np.isclose(len(requests), len(audio) / 1600, atol=1)


def test_voice_activity_timeouts_close_the_stream_after_its_finals(client, jfk):
    Timeout = speech.StreamingRecognitionConfig.VoiceActivityTimeout
    silence = np.zeros(3 * 16000, dtype=np.float32)

    def run(audio: np.ndarray, timeout) -> list:
        streaming = speech.StreamingRecognitionConfig(
            config=config(), enable_voice_activity_events=True, voice_activity_timeout=timeout
        )
        requests = paced(float_to_linear16(audio), 32000)
        return list(client.streaming_recognize(config=streaming, requests=requests))

    # Nobody speaks in the first second: the stream closes then, with no result.
    responses = run(np.concatenate([silence, jfk]), Timeout(speech_start_timeout={"seconds": 1}))
    assert [r.speech_event_type for r in responses] == [Event.SPEECH_ACTIVITY_TIMEOUT]
    assert 1.0 <= seconds(responses[0].speech_event_time) <= 1.3

    # JFK, then silence: every final, then the timeout 1.5 s after his last word.
    responses = run(
        np.concatenate([jfk, silence, silence]),
        Timeout(speech_end_timeout={"seconds": 1, "nanos": 500_000_000}),
    )
    finals = [
        r.results[0].alternatives[0].transcript for r in responses if r.results and r.results[0].is_final
    ]
    assert wer([JFK_TEXT], [" ".join(finals)]) < 0.1
    assert responses[-1].speech_event_type == Event.SPEECH_ACTIVITY_TIMEOUT
    ended = [
        seconds(r.speech_event_time) for r in responses if r.speech_event_type == Event.SPEECH_ACTIVITY_END
    ]
    assert 1.5 <= seconds(responses[-1].speech_event_time) - ended[-1] <= 1.8
    assert seconds(responses[-1].speech_event_time) < len(jfk) / 16000 + 3  # before the audio ran out


def encoded(audio: np.ndarray, *args: str) -> bytes:
    """``audio`` encoded by ffmpeg: ``args`` are its output options."""
    return ffmpeg(
        "-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-", *args, "-", data=float_to_linear16(audio)
    )


def test_compressed_recognize_flac_exactly_as_linear16_and_lossy_codecs_close(api_server, client, jfk):
    server, _ = api_server
    segment, reference = long_segment("1998-15444-0000")
    for audio, text in ((jfk, JFK_TEXT), (segment, reference)):
        with SttClient(server.target) as stt:
            expected = stt.recognize(audio, StreamConfig(language_code="en-US"))
        flac = client.recognize(
            config=config(encoding=Encoding.FLAC),
            audio=speech.RecognitionAudio(content=encoded(audio, "-f", "flac")),
        )
        assert [r.alternatives[0].transcript for r in flac.results] == [
            r.alternatives[0].transcript for r in expected.results
        ]
        for encoding, options in (
            (Encoding.OGG_OPUS, ("-c:a", "libopus", "-b:a", "24k", "-f", "ogg")),
            (Encoding.MP3, ("-c:a", "libmp3lame", "-b:a", "48k", "-f", "mp3")),
        ):
            response = client.recognize(
                config=config(encoding=encoding),
                audio=speech.RecognitionAudio(content=encoded(audio, *options)),
            )
            transcript = " ".join(r.alternatives[0].transcript for r in response.results)
            assert wer([text], [transcript]) < 0.15, (encoding, transcript)
            assert seconds(response.total_billed_time) == pytest.approx(len(audio) / 16000, abs=0.2)


def test_opus_and_flac_stream_in_chunks_at_real_time(client, jfk):
    """Compressed audio as a browser or phone app streams it: small chunks cut anywhere in its
    pages and frames, at the rate it is recorded; the three streams at once."""

    def stream(encoding, options: tuple[str, ...]) -> list:
        data = encoded(jfk, *options)
        streaming = speech.StreamingRecognitionConfig(
            config=config(encoding=encoding, enable_word_time_offsets=True), interim_results=True
        )
        bytes_per_second = round(len(data) / (len(jfk) / 16000))
        return list(client.streaming_recognize(config=streaming, requests=paced(data, bytes_per_second)))

    formats = (
        (Encoding.OGG_OPUS, ("-c:a", "libopus", "-b:a", "24k", "-page_duration", "100000", "-f", "ogg")),
        (Encoding.FLAC, ("-f", "flac")),
        (Encoding.WEBM_OPUS, ("-c:a", "libopus", "-b:a", "32k", "-live", "1", "-f", "webm")),  # a recorder's
    )
    with ThreadPoolExecutor(len(formats)) as pool:
        streamed = list(pool.map(lambda item: stream(*item), formats))
    for responses in streamed:
        results = [r.results[0] for r in responses if r.results]
        finals = [r for r in results if r.is_final]
        assert not results[0].is_final and len(finals) >= 2  # interims first, then finals as he pauses
        assert wer([JFK_TEXT], [" ".join(r.alternatives[0].transcript for r in finals)]) < 0.1
        words = [w for r in finals for w in r.alternatives[0].words]
        assert seconds(words[-1].end_time) == pytest.approx(10.5, abs=0.6)  # "country" ends near 10.5 s


def test_amr_and_amr_wb_recorded_by_a_phone_decode(client, jfk):
    for encoding, rate, data in (
        (Encoding.AMR, 8000, amr_narrowband(jfk)),
        (Encoding.AMR_WB, 16000, amr_wideband(jfk)),
    ):
        response = client.recognize(
            config=config(encoding=encoding, sample_rate_hertz=rate),
            audio=speech.RecognitionAudio(content=data),
        )
        assert wer([JFK_TEXT], [" ".join(r.alternatives[0].transcript for r in response.results)]) < 0.15
