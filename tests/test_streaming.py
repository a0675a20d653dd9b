"""Real speech through real gRPC on loopback: accuracy, interims, concurrency, silence."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine.api import stt_pb2
from engine.audio import AudioDecoder, float_to_linear16, read_audio_file
from engine.client import SpeechClient, StreamConfig, audio_requests, chunk_bytes, final_transcripts
from engine.options import StreamingOptions
from engine.recognizer import SpeechResumed, StreamingRecognizer
from engine.text import compression_ratio, cut_trailing_repeat, is_repetition_loop
from tests.helpers import JFK_TEXT, SAMPLE, ffmpeg, long_segment, normalize, paused_jfk, wer


def stream_clip(
    target: str, audio: np.ndarray, config: StreamConfig | None = None, realtime: bool = True
) -> tuple[list, list[float]]:
    """Streams audio; returns the responses and their arrival times from the first chunk."""
    with SpeechClient(target) as client:
        started = time.monotonic()
        responses, arrivals = [], []
        for response in client.stream_audio(audio, config, realtime=realtime):
            responses.append(response)
            arrivals.append(time.monotonic() - started)
    return responses, arrivals


@pytest.fixture(scope="module")
def offline_model():
    from faster_whisper import WhisperModel

    from engine.model import resolve_model_path

    return WhisperModel(resolve_model_path("tiny.en"), compute_type="int8", cpu_threads=2)


def offline_transcript(model, audio: np.ndarray) -> str:
    """Offline faster-whisper, beam 5: the reference line."""
    return "".join(s.text for s in model.transcribe(audio, beam_size=5)[0])


@pytest.fixture(scope="module")
def offline_baseline(clips, offline_model):
    return [offline_transcript(offline_model, c.audio) for c in clips]


def test_real_time_streams_match_offline_wer(server, clips, offline_baseline):
    # All clips as parallel real-time streams in 100 ms chunks.
    with ThreadPoolExecutor(len(clips)) as pool:
        outcomes = list(pool.map(lambda c: stream_clip(server.target, c.audio), clips))
    hypotheses = [" ".join(final_transcripts(responses)) for responses, _ in outcomes]
    references = [c.transcript for c in clips]
    streaming_wer = wer(references, hypotheses)
    offline_wer = wer(references, offline_baseline)
    print(f"\nfinal WER streaming={streaming_wer:.4f} offline={offline_wer:.4f}")
    assert streaming_wer <= offline_wer + 0.01, list(zip(references, hypotheses))

    for clip, (responses, _) in zip(clips, outcomes):
        kinds = [r.WhichOneof("response") for r in responses]
        assert "result" in kinds, clip.name
        finals = [r.result for r in responses if r.HasField("result") and r.result.is_final]
        indexes = [f.utterance_index for f in finals]
        assert indexes == sorted(set(indexes)), "finals in utterance order, once each"
        for f in finals:
            assert f.result_end_offset.ToTimedelta().total_seconds() <= clip.seconds + 0.05


def test_interim_results_arrive_before_the_utterance_ends(server, jfk):
    responses, arrivals = stream_clip(server.target, jfk, StreamConfig(interim_results=True))
    first_final = next(i for i, r in enumerate(responses) if r.HasField("result") and r.result.is_final)
    interims = [(r, t) for r, t in zip(responses, arrivals) if r.HasField("result") and not r.result.is_final]
    assert interims, "no interim results"
    first_interim, at = interims[0]
    assert responses.index(first_interim) < first_final
    # Before the utterance's own end in the audio, i.e. while the speaker is talking.
    assert at < first_interim.result.result_end_offset.ToTimedelta().total_seconds() + 1.0
    stabilities = [r.result.stability for r, _ in interims]
    assert all(0.0 <= s <= 1.0 for s in stabilities)
    # Stable prefixes are never revised within an utterance.
    by_utterance: dict[int, str] = {}
    for r, _ in interims:
        stable = r.result.stable_transcript
        previous = by_utterance.get(r.result.utterance_index, "")
        assert stable.startswith(previous)
        assert r.result.alternatives[0].transcript.startswith(stable)
        by_utterance[r.result.utterance_index] = stable
    # No looping guess is shown, such as "ask not what your country can do for you ask what
    # you ask not what your country can ..." (compression ratio 2.45), once seen in the demo.
    for r, _ in interims:
        text = r.result.alternatives[0].transcript
        assert compression_ratio(text) <= 2.4 and not is_repetition_loop(text), text
        assert cut_trailing_repeat(text) == text, text  # no "Go forward. Go forward."
    events = [r.speech_event.type for r in responses if r.HasField("speech_event")]
    assert (
        events.count(stt_pb2.SpeechEvent.SPEECH_STARTED)
        == events.count(stt_pb2.SpeechEvent.SPEECH_ENDED)
        >= 1
    )


def test_a_long_form_with_room_noise_gaps_recovers_every_clip(server_factory, clips):
    # Every clip of ../shared/audio once, after pauses of 0.3-3 s and two long stretches of
    # room noise (5 and 12 s), the last clip quiet; the VAD state is refreshed in the noise.
    from bench.audio_sets import dbfs, join

    last = clips[-1]
    quiet = dataclasses.replace(last, audio=last.audio * dbfs(-30) / np.max(np.abs(last.audio)))
    gaps = [0.3, 0.7, 5.0, 2.0, 3.0, 12.0, 1.2, 2.0]
    form = join("noise-gaps", [*clips[:-1], quiet], gaps, seed=11)
    config = StreamConfig(enable_word_time_offsets=True, interim_results=False)
    server = server_factory()  # the shared one stops streams at 20 s
    responses, _ = stream_clip(server.target, form.audio, config, realtime=False)
    finals = [r.result for r in responses if r.HasField("result")]
    words = [
        (w.start_offset.ToTimedelta().total_seconds(), w.end_offset.ToTimedelta().total_seconds())
        for f in finals
        for w in f.alternatives[0].words
    ]
    for clip in form.clips:
        assert any(end > clip.start and start < clip.end for start, end in words), f"{clip.name} lost"
    text = " ".join(f.alternatives[0].transcript for f in finals)
    assert wer([form.transcript], [text]) < 0.1, text


def test_interim_interval_sets_the_interim_cadence(server_factory, jfk):
    # A 3 s endpoint, and no early finals, make the speech one 11 s utterance: room for
    # several sparse interims.
    server = server_factory("--early-finals", "off")

    def interims(interval_ms: int) -> list:
        config = StreamConfig(interim_results=True, interim_interval_ms=interval_ms, silence_duration_ms=3000)
        responses, _ = stream_clip(server.target, jfk, config)
        return [r.result for r in responses if r.HasField("result") and not r.result.is_final]

    # One after the other: streamed side by side, the two ask for interims of the same audio at
    # the same moments, and on a busy machine one of each pair waits past the scheduler's
    # max_interim_wait and is dropped as stale, which is not what this test is about.
    sparse, dense = interims(3000), interims(1000)

    def gaps(results: list) -> list[float]:
        """Audio between consecutive interims of one utterance."""
        by_utterance: dict[int, list[float]] = {}
        for result in results:
            end = result.result_end_offset.ToTimedelta().total_seconds()
            by_utterance.setdefault(result.utterance_index, []).append(end)
        return [b - a for ends in by_utterance.values() for a, b in zip(ends, ends[1:])]

    # Within an utterance, an interim covers at least 3 s more audio than the one before;
    # at 1 s, some come closer than that (speech, not pauses, sets the cadence).
    sparse_gaps, dense_gaps = gaps(sparse), gaps(dense)
    assert sparse_gaps and min(sparse_gaps) >= 3.0 - 1e-6, sparse_gaps
    assert dense_gaps and min(dense_gaps) < 3.0 and len(dense) > len(sparse), (dense_gaps, sparse_gaps)


def test_four_streams_run_concurrently(server, jfk):
    single_started = time.monotonic()
    single, _ = stream_clip(server.target, jfk)
    single_time = time.monotonic() - single_started
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: stream_clip(server.target, jfk), range(4)))
    parallel_time = time.monotonic() - started
    print(f"\none stream {single_time:.2f} s, four at once {parallel_time:.2f} s")
    # One after another would take 4x; the margin absorbs a noisy shared machine.
    assert parallel_time < single_time * 2
    for responses, _ in results:
        assert wer([JFK_TEXT], [" ".join(final_transcripts(responses))]) < 0.1


def test_silence_and_noise_produce_no_text(server):
    rng = np.random.default_rng(7)
    silence = np.zeros(16000 * 4, np.float32)
    noise = (0.1 * rng.standard_normal(16000 * 4)).astype(np.float32)
    for audio in (silence, noise):
        responses, _ = stream_clip(server.target, audio, realtime=False)
        assert [r for r in responses if r.HasField("result")] == []


def test_word_offsets_and_alternatives(server, jfk):
    config = StreamConfig(enable_word_time_offsets=True, max_alternatives=3, interim_results=False)
    responses, _ = stream_clip(server.target, jfk, config, realtime=False)
    finals = [r.result for r in responses if r.HasField("result")]
    assert finals and all(f.is_final for f in finals)
    words = [w for f in finals for w in f.alternatives[0].words]
    assert len(words) >= 15
    starts = [w.start_offset.ToTimedelta().total_seconds() for w in words]
    assert starts == sorted(starts) and 0 <= starts[0] < 1.0 and starts[-1] < 11.0
    assert all(w.end_offset.ToTimedelta() >= w.start_offset.ToTimedelta() for w in words)
    assert all(0 < f.alternatives[0].confidence <= 1 for f in finals)
    for final in finals:  # the best hypothesis and two more from the beam, all different
        transcripts = [a.transcript for a in final.alternatives]
        assert len(transcripts) == 3 and len(set(transcripts)) == 3, transcripts
        assert not final.alternatives[1].words  # word offsets belong to the best one


@pytest.mark.parametrize(
    "rate,channels,encoding",
    [
        (8000, 1, stt_pb2.MULAW),
        (8000, 1, stt_pb2.ALAW),
        (48000, 2, stt_pb2.LINEAR16),
        (44100, 1, stt_pb2.LINEAR16),
    ],
)
def test_other_rates_encodings_and_channels(server, rate, channels, encoding, tmp_path):
    fmt = {stt_pb2.MULAW: "mulaw", stt_pb2.ALAW: "alaw", stt_pb2.LINEAR16: "s16le"}[encoding]
    wire = ffmpeg("-i", str(SAMPLE), "-ar", str(rate), "-ac", str(channels), "-f", fmt, "-")
    config = StreamConfig(
        encoding=encoding, sample_rate_hertz=rate, audio_channel_count=channels, interim_results=False
    )
    chunk = len(wire) // 50 + 1  # deliberately not frame-aligned

    def requests():
        yield config.first_request()
        for part in chunk_bytes(wire, chunk):
            yield stt_pb2.StreamingRecognizeRequest(audio_content=part)

    with SpeechClient(server.target) as client:
        finals = final_transcripts(client.stream(requests()))
    # Telephone-band audio costs tiny.en accuracy, so the reference is the same wire
    # audio converted by FFmpeg to 16 kHz mono and recognised by the same server.
    converted = tmp_path / "wire.wav"
    ffmpeg("-f", fmt, "-ar", str(rate), "-ac", str(channels), "-i", "-", "-ar", "16000", "-ac", "1",
           str(converted), data=wire)  # fmt: skip
    with SpeechClient(server.target) as client:
        reference = client.recognize(read_audio_file(converted))
    expected = " ".join(r.alternatives[0].transcript for r in reference.results)
    # 8 kHz G.711 loses the upper band; tiny.en then flips a word or two on tiny
    # sample-level differences, so telephone audio gets a wider margin.
    margin = 0.2 if rate == 8000 else 0.05
    assert wer([expected], [" ".join(finals)]) <= margin, (finals, expected)


def test_single_utterance_ends_after_first(server, jfk):
    config = StreamConfig(single_utterance=True, interim_results=False)
    responses, _ = stream_clip(server.target, jfk, config, realtime=False)
    events = [r.speech_event.type for r in responses if r.HasField("speech_event")]
    assert stt_pb2.SpeechEvent.END_OF_SINGLE_UTTERANCE in events
    finals = [r.result for r in responses if r.HasField("result")]
    assert len(finals) == 1 and finals[0].utterance_index == 0
    assert "americans" in finals[0].alternatives[0].transcript.lower()


def test_unary_recognize_and_server_info(server, jfk):
    with server.client() as client:
        response = client.recognize(jfk)
        info = client.server_info()
    text = " ".join(r.alternatives[0].transcript for r in response.results)
    assert wer([JFK_TEXT], [text]) < 0.1
    assert all(r.is_final for r in response.results)
    assert abs(response.total_billed_time.ToTimedelta().total_seconds() - 11.0) < 0.1
    assert info.model == "tiny.en" and info.ready and info.languages == ["en"]
    assert info.limits.max_concurrent_streams == 12
    assert stt_pb2.MULAW in info.encodings


def test_prompt_biases_the_decoder_towards_a_rare_word(server):
    # tiny.en hears "the two strives" for the name; given it as a hot word, it writes it.
    audio, reference = long_segment("2414-128291-0002")
    assert "ZARATHUSTRA" in reference
    texts = {}
    for prompt in ("", "Zarathustra"):
        responses, _ = stream_clip(
            server.target, audio, StreamConfig(prompt=prompt, interim_results=False), realtime=False
        )
        texts[prompt] = " ".join(final_transcripts(responses))
    assert "zarathustra" not in texts[""].lower(), texts
    assert "zarathustra" in texts["Zarathustra"].lower(), texts
    assert wer([reference], [texts["Zarathustra"]]) < wer([reference], [texts[""]]), texts


def test_linear16_bytes_helper_roundtrip(jfk):
    samples = np.linspace(-1, 1, 101, dtype=np.float32)
    back = np.frombuffer(float_to_linear16(samples), "<i2") / 32768
    assert np.allclose(back, samples, atol=1e-4)
    # A 16-bit recording read as float goes over the wire bit for bit (what the server decodes).
    wire = AudioDecoder(stt_pb2.LINEAR16, 16000).decode(float_to_linear16(jfk))
    assert np.array_equal(wire, jfk)


def test_speech_after_a_long_pause_continues_the_utterance(server, jfk):
    # 1 s more silence in JFK's first pause, inside a 3 s endpoint: the final decode started
    # speculatively during the pause is discarded when speech resumes; one utterance, whole.
    audio = paused_jfk(jfk)
    paused = StreamingRecognizer(StreamingOptions(silence_duration_ms=3000)).accept(audio)
    assert any(isinstance(e, SpeechResumed) for e in paused)  # the stream takes that path
    config = StreamConfig(silence_duration_ms=3000, interim_results=False)
    responses, _ = stream_clip(server.target, audio, config)
    finals = [r.result.alternatives[0].transcript for r in responses if r.HasField("result")]
    assert len(finals) == 1, finals
    assert wer([JFK_TEXT], finals) < 0.1, finals


def test_a_final_that_leaves_out_what_the_interims_heard_is_decoded_in_two(server_factory):
    # The continuous set (the clips joined with 0.2-0.4 s gaps, slowed to 0.8x): conditioned on
    # the stream's earlier finals, tiny.en decodes its 18 s fifth utterance without the first
    # sentence, "She had your dark suit in greasy wash water all year.", which the interims
    # heard. The server sees the interims' words missing and decodes the utterance in two at a
    # word boundary the interims aligned. Sent at twice real time, so interims still run.
    from bench.streaming import continuous_form

    audio, _ = continuous_form()
    config = StreamConfig(enable_word_time_offsets=True)
    server = server_factory("--log-level", "INFO")  # the shared one stops streams at 20 s
    with server.client() as client:

        def twice_real_time():
            yield config.first_request()
            started = time.monotonic()
            for index, request in enumerate(audio_requests(audio, 100, realtime=False)):
                time.sleep(max(0.0, started + (index + 1) * 0.05 - time.monotonic()))
                yield request

        finals = [
            r.result for r in client.stream(twice_real_time()) if r.HasField("result") and r.result.is_final
        ]
    texts = [normalize(f.alternatives[0].transcript) for f in finals]
    books = next(i for i, text in enumerate(texts) if "block books" in text)
    head = texts[books].split("produced the block books")[0]
    assert all(word in head for word in ("suit", "greasy", "water", "year")), texts[books]
    # A repaired final is still one result, its words in order and within its audio.
    result = finals[books]
    offsets = [
        (w.start_offset.ToTimedelta().total_seconds(), w.end_offset.ToTimedelta().total_seconds())
        for w in result.alternatives[0].words
    ]
    assert len(offsets) == len(result.alternatives[0].transcript.split())
    assert all(a[0] <= b[0] for a, b in zip(offsets, offsets[1:])), offsets
    start, end = (
        t.ToTimedelta().total_seconds() for t in (result.result_start_offset, result.result_end_offset)
    )
    assert start - 0.05 <= offsets[0][0] and offsets[-1][1] <= end + 0.05
    if "decoding it in two" not in server.log():
        print("\nthis machine's tiny.en kept the sentence in one decode: the repair did not run")
