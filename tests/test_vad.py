"""Streaming VAD equals the batch model; segmentation finds utterances, not silence."""

import numpy as np
import pytest

from engine.options import StreamingOptions
from engine.recognizer import (
    AudioBuffer,
    EndpointLikely,
    LocalAgreement,
    SpeechResumed,
    SpeechStarted,
    StreamingRecognizer,
    UtteranceEnded,
    is_repetition_loop,
)
from engine.vad import StreamingVad


def test_streaming_vad_matches_whole_file(jfk):
    from faster_whisper.vad import get_vad_model

    audio = jfk[: len(jfk) // 512 * 512]
    whole = np.asarray(get_vad_model()(audio)).reshape(-1)
    vad = StreamingVad()
    chunked = np.concatenate([vad.process(audio[i : i + 1234]) for i in range(0, len(audio), 1234)])
    assert chunked.shape == whole.shape
    assert np.allclose(chunked, whole, atol=1e-5)


def feed(recognizer: StreamingRecognizer, audio: np.ndarray) -> list:
    events = []
    for start in range(0, len(audio), 1600):
        events += recognizer.accept(audio[start : start + 1600])
    return events + recognizer.finish()


def test_utterances_cover_speech_without_overlap(jfk):
    padded = np.concatenate([np.zeros(16000, np.float32), jfk, np.zeros(32000, np.float32)])
    events = feed(StreamingRecognizer(StreamingOptions()), padded)
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    started = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(ended) >= 2 and len(started) == len(ended)
    assert ended[0].start >= 0.5  # the leading second of silence is not speech
    for previous, following in zip(ended, ended[1:]):
        assert following.start >= previous.end  # no audio decoded twice
    assert all(e.reason == "silence" for e in ended)


def test_silence_and_noise_make_no_utterances():
    rng = np.random.default_rng(1)
    silence = np.zeros(16000 * 5, np.float32)
    noise = (0.05 * rng.standard_normal(16000 * 5)).astype(np.float32)
    for audio in (silence, noise):
        assert feed(StreamingRecognizer(StreamingOptions()), audio) == []


def test_long_speech_is_split_at_max_length(jfk):
    options = StreamingOptions(max_utterance_ms=3000, split_search_ms=1500, silence_duration_ms=3000)
    ended = [e for e in feed(StreamingRecognizer(options), jfk) if isinstance(e, UtteranceEnded)]
    assert any(e.reason == "max_length" for e in ended)
    assert all(e.end - e.start <= 3.0 + 0.3 + 0.05 for e in ended)


def check_speculations(events: list) -> tuple[int, int]:
    """Every EndpointLikely is either withdrawn by SpeechResumed or becomes the utterance's
    exact audio; returns (used, discarded)."""
    used = discarded = 0
    pending = None
    for event in events:
        if isinstance(event, EndpointLikely):
            assert pending is None
            pending = event
        elif isinstance(event, SpeechResumed):
            assert pending is not None and pending.utterance_index == event.utterance_index
            pending, discarded = None, discarded + 1
        elif isinstance(event, UtteranceEnded) and pending is not None:
            assert (pending.utterance_index, pending.start, pending.end) == (
                event.utterance_index,
                event.start,
                event.end,
            )
            assert np.array_equal(pending.audio, event.audio)
            pending, used = None, used + 1
    return used, discarded


def test_speculative_final_audio_is_the_final_audio(jfk):
    padded = np.concatenate([np.zeros(16000, np.float32), jfk, np.zeros(32000, np.float32)])
    events = feed(StreamingRecognizer(StreamingOptions()), padded)
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    used, _ = check_speculations(events)
    assert used == len(ended)  # every endpoint was foreseen 300 ms early


def test_speech_resuming_withdraws_the_speculation(jfk):
    # A 1 s gap inside a 3 s endpoint: speculated on, then withdrawn when speech returns.
    audio = np.concatenate([jfk, np.zeros(16000, np.float32), jfk, np.zeros(16000 * 4, np.float32)])
    options = StreamingOptions(silence_duration_ms=3000, max_utterance_ms=28000)
    events = feed(StreamingRecognizer(options), audio)
    used, discarded = check_speculations(events)
    assert discarded >= 1 and used == 1
    assert len([e for e in events if isinstance(e, UtteranceEnded)]) == 1


def test_end_of_stream_in_a_pause_ends_where_the_endpoint_would(jfk):
    audio = np.concatenate([jfk, np.zeros(8000, np.float32)])  # stops 500 ms into silence
    events = feed(StreamingRecognizer(StreamingOptions(silence_duration_ms=3000)), audio)
    last = events[-1]
    assert isinstance(last, UtteranceEnded) and last.reason == "end_of_stream"
    assert last.end == pytest.approx(last.speech_end + 0.3)
    assert check_speculations(events)[0] == 1


def test_speculation_can_be_disabled(jfk):
    events = feed(StreamingRecognizer(StreamingOptions(speculative_final_ms=0)), jfk)
    assert not any(isinstance(e, (EndpointLikely, SpeechResumed)) for e in events)


def test_audio_buffer_matches_a_plain_array():
    rng = np.random.default_rng(7)
    buffer, reference, start = AudioBuffer(), np.zeros(0, np.float32), 0
    for _ in range(400):
        chunk = rng.standard_normal(int(rng.integers(0, 9000))).astype(np.float32)
        buffer.append(chunk)
        reference = np.concatenate([reference, chunk])
        if rng.random() < 0.3:
            keep_from = start + int(rng.integers(0, len(reference) + 1))
            buffer.trim(keep_from)
            reference, start = reference[keep_from - start :], keep_from
        assert (buffer.start, buffer.end) == (start, start + len(reference))
        lo = start + int(rng.integers(0, len(reference) + 1))
        hi = lo + int(rng.integers(0, 20000))
        assert np.array_equal(buffer.slice(lo, hi), reference[lo - start : hi - start])


def test_local_agreement_prefix_only_grows():
    agreement = LocalAgreement()
    assert agreement.update("and so my") == ("and so my", 0.0)
    text, stability = agreement.update("And so, my fellow")
    assert agreement.stable_text == "And so, my" and stability == 0.75
    text, _ = agreement.update("and so my fellow Americans")
    assert agreement.stable_text == "And so, my fellow"
    assert text == "And so, my fellow Americans"
    text, _ = agreement.update("completely different words")
    assert text.startswith("And so, my fellow")


def test_looping_hypotheses_are_recognised():
    assert is_repetition_loop("s s s s s s s s s")
    assert is_repetition_loop("And so, so so so so")
    assert not is_repetition_loop("And so my fellow Americans")
    assert not is_repetition_loop("no, no, no")  # three is still speech
