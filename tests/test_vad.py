"""Streaming VAD equals the batch model; segmentation finds utterances, not silence."""

import numpy as np

from engine.options import StreamingOptions
from engine.recognizer import LocalAgreement, SpeechStarted, StreamingRecognizer, UtteranceEnded
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
