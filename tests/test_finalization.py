"""The finalisation policy on real speech, without gRPC: a real model and scheduler, audio fed
in real time, results collected as the session would deliver them."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from engine.finalization import Finalizer, drop_words_before
from engine.model import DecodeRequest, Hypothesis, SpeechModel, Word
from engine.options import ModelOptions, StreamingOptions
from engine.quality import recognition_quality
from engine.recognizer import InterimWindow, StreamingRecognizer, UtteranceEnded
from engine.scheduler import InferenceScheduler
from engine.settings import RecognitionSettings
from engine.text import agrees, ends_sentence, leading_fragments, word_key
from otel import Telemetry, TelemetryOptions

CHUNK = 1600  # 100 ms


@pytest.fixture(scope="module")
def model() -> SpeechModel:
    model = SpeechModel(ModelOptions())
    model.warm_up()
    return model


def clip(clips, name: str):
    return next(c for c in clips if c.name.startswith(name))


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * 16000), np.float32)


class Collected:
    """A Delivery that keeps what it is given, with the time each final came."""

    def __init__(self) -> None:
        self.finals: list = []
        self.final_times: list[float] = []
        self.interims: list = []
        self.events: list[tuple[str, float, int]] = []

    def speech_event(self, kind: str, offset: float, utterance_index: int) -> None:
        self.events.append((kind, offset, utterance_index))

    def interim(self, result) -> None:
        self.interims.append(result)

    def final(self, result) -> None:
        self.finals.append(result)
        self.final_times.append(time.monotonic())

    def pending_finals(self, seconds: float) -> None:
        pass

    def can_take_interim(self) -> bool:
        return True


async def stream(model: SpeechModel, audio: np.ndarray, **streaming) -> tuple[Collected, float]:
    """Feeds ``audio`` in 100 ms chunks at real time; returns the results and the monotonic
    time at which offset 0 was spoken."""
    scheduler = InferenceScheduler(model, workers=2)
    scheduler.start()
    options = StreamingOptions(**streaming)
    settings = RecognitionSettings(
        encoding=1, sample_rate=16000, channels=1, language="en", prompt="", word_time_offsets=True,
        alternatives=1, streaming=options,
    )  # fmt: skip
    telemetry = Telemetry(TelemetryOptions(enabled=False), "test").stream(
        "/stt.v1.Speech/StreamingRecognize", [], None
    )
    out = Collected()
    finalizer = Finalizer(StreamingRecognizer(options), scheduler, settings, telemetry, out)
    started = time.monotonic()
    try:
        for index, at in enumerate(range(0, len(audio), CHUNK)):
            finalizer.accept(audio[at : at + CHUNK])
            await asyncio.sleep(max(0.0, started + (index + 1) * 0.1 - time.monotonic()))
        finalizer.finish(np.zeros(0, np.float32))
        await finalizer.wait_finals()
    finally:
        finalizer.close()
        await scheduler.stop()
    return out, started


def keys(text: str) -> list[str]:
    return [k for k in (word_key(w) for w in text.split()) if k]


def test_sentence_end_rules():
    assert ends_sentence("She had your dark suit in greasy wash water all year.")
    assert ends_sentence("Did she?")
    assert not ends_sentence("I met Mr.")  # an abbreviation
    assert not ends_sentence("John F.")  # an initial
    assert not ends_sentence("and so my fellow americans")
    heard = "she had your dark suit in greasy wash water al"
    assert agrees("She had your dog suit in greasy wash water all year.", heard, 4)
    assert not agrees("She had your dark suit.", heard, 4)  # stops before what was heard
    assert not agrees("Wash water all year and then some more words here.", heard, 4)


def test_an_interim_never_starts_with_a_lone_letter():
    assert leading_fragments("S NOT what your country") == 1
    assert leading_fragments("I think so") == 0 and leading_fragments("A dog") == 0
    window = InterimWindow(4.0)
    text, _ = window.update("S NOT what your country")
    assert text == "NOT what your country"
    # Later in the utterance a letter may be a word the speaker spelt.
    window.update("NOT what your country can")
    assert window.update("NOT what your country can S")[0].endswith("S")


def test_words_before_a_cut_are_dropped_by_their_timing():
    words = [Word("year.", 0.05, 0.25, 0.9), Word("Mr.", 0.4, 0.6, 0.9), Word("Quilter", 0.6, 1.0, 0.9)]
    hypothesis = Hypothesis(text="year. Mr. Quilter", alternatives=["year. Mister Quilter"], words=words)
    cut = drop_words_before(hypothesis, 0.3)
    assert cut.text == "Mr. Quilter" and [w.word for w in cut.words] == ["Mr.", "Quilter"]
    assert cut.alternatives == ["Mister Quilter"]
    assert drop_words_before(hypothesis, 0.0) is hypothesis


def test_a_sentence_final_arrives_while_the_speaker_goes_on_with_nothing_lost_or_repeated(model, clips):
    first, second = clip(clips, "ldc93s1"), clip(clips, "lj001-0001")
    # A reader's pause between sentences, shorter than the endpoint silence: without sentence
    # finals this is one utterance, finalised only after the second sentence.
    audio = np.concatenate([silence(0.5), first.audio, silence(0.5), second.audio, silence(1.5)])
    second_starts = 0.5 + first.seconds + 0.5
    reference = keys(first.transcript) + keys(second.transcript)

    out, started = asyncio.run(stream(model, audio, silence_duration_ms=1000))
    reasons = [f.reason for f in out.finals]
    assert "sentence" in reasons, reasons
    # Delivered while the second sentence was being spoken.
    cut = reasons.index("sentence")
    assert out.final_times[cut] - started < second_starts + second.seconds - 2.0
    said = [k for f in out.finals for k in keys(f.hypothesis.text)]
    import jiwer

    assert jiwer.wer(" ".join(reference), " ".join(said)) <= 0.15, said
    # Nothing said twice at a join: no final's last word opens the next.
    for before, after in zip(out.finals, out.finals[1:]):
        assert keys(before.hypothesis.text)[-1] != keys(after.hypothesis.text)[0]

    off, _ = asyncio.run(stream(model, audio, silence_duration_ms=1000, early_finals="off"))
    assert "sentence" not in [f.reason for f in off.finals]
    assert len(off.finals) < len(out.finals)


def test_a_confident_final_ends_the_utterance_early_and_resumed_speech_is_the_next(model, clips):
    first, second = clip(clips, "ldc93s1"), clip(clips, "ls_1272")
    # A 0.9 s pause: longer than a confident final takes, shorter than this endpoint silence.
    audio = np.concatenate([silence(0.5), first.audio, silence(0.9), second.audio, silence(1.5)])
    out, started = asyncio.run(stream(model, audio, silence_duration_ms=1200))
    assert out.finals[0].reason == "confident", [f.reason for f in out.finals]
    # Its final came before the endpoint silence had passed.
    assert out.final_times[0] - started < out.finals[0].speech_end + 1.2
    # Speech resumed after the early commit: the next utterance holds all of it.
    assert len(out.finals) == 2
    assert keys(out.finals[0].hypothesis.text)[-1] == "year"
    assert keys(out.finals[1].hypothesis.text)[:2] == ["mr", "quilter"]

    waited, _ = asyncio.run(stream(model, audio, silence_duration_ms=1200, early_finals="off"))
    assert [f.reason for f in waited.finals][0] != "confident"


def test_a_final_that_stopped_early_decodes_the_rest(model, clips):
    first, second = clip(clips, "ldc93s1"), clip(clips, "ls_1272")
    audio = np.concatenate([silence(0.3), first.audio, silence(0.3), second.audio, silence(0.3)])
    speech_end = len(audio) / 16000 - 0.3
    event = UtteranceEnded(0, audio, 0.0, len(audio) / 16000, speech_end, "silence")
    whole = model.decode(
        audio[: round((0.3 + first.seconds) * 16000)], DecodeRequest(final=True, word_timestamps=True)
    )
    # As if Whisper had stopped after the first sentence of the utterance.
    stopped = dataclasses.replace(whole, audio_seconds=len(audio) / 16000)

    async def rest() -> Hypothesis:
        scheduler = InferenceScheduler(model, workers=1)
        scheduler.start()
        settings = RecognitionSettings(
            encoding=1, sample_rate=16000, channels=1, language="en", prompt="", word_time_offsets=True,
            alternatives=1, streaming=StreamingOptions(),
        )  # fmt: skip
        telemetry = Telemetry(TelemetryOptions(enabled=False), "test").stream("/x/y", [], None)
        finalizer = Finalizer(
            StreamingRecognizer(settings.streaming), scheduler, settings, telemetry, Collected()
        )
        try:
            request = DecodeRequest(final=True, word_timestamps=True)
            return await finalizer._decode_rest(event, request, stopped, [])
        finally:
            await scheduler.stop()

    joined = asyncio.run(rest())
    said = keys(joined.text)
    assert said[: len(keys(whole.text))] == keys(whole.text)
    assert "quilter" in said and said.count("year") == 1
    assert joined.words[-1].end > speech_end - 1.0
    quality = recognition_quality(joined, "decoded_rest")
    assert quality.repair == "decoded_rest" and not quality.loop_cut
    # Both read sentences: most words are sure; the share is of the aligned words of both parts.
    assert quality.low_probability_word_share is not None and quality.low_probability_word_share < 0.3
