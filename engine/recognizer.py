"""Streaming recognition state: VAD segmentation into utterances, interim cadence,
and the LocalAgreement policy that keeps interim text from flickering.

Everything here is synchronous and model-free: it decides *what* to decode and
*when*; the stream session runs the decodes. Audio is kept only for the open
utterance plus a short pre-roll, so memory stays bounded however long a stream is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .options import TARGET_SAMPLE_RATE, StreamingOptions
from .vad import FRAME_SAMPLES, StreamingVad

FRAME_SECONDS = FRAME_SAMPLES / TARGET_SAMPLE_RATE
HYSTERESIS = 0.15  # a frame ends speech only below threshold - 0.15, as Silero's own rule


@dataclass
class SpeechStarted:
    utterance_index: int
    offset: float


@dataclass
class InterimDue:
    """Enough new speech arrived for an interim decode of the utterance so far."""

    utterance_index: int
    audio: np.ndarray
    start: float
    end: float


@dataclass
class UtteranceEnded:
    """An utterance is complete and ready for its final decode.

    ``reason`` is ``silence`` (endpoint), ``max_length`` (split at a pause) or
    ``end_of_stream`` (the client half-closed or the stream was stopped).
    """

    utterance_index: int
    audio: np.ndarray
    start: float
    end: float
    speech_end: float
    reason: str


Event = SpeechStarted | InterimDue | UtteranceEnded


class StreamingRecognizer:
    """Feeds 16 kHz audio through the VAD and emits utterance events."""

    def __init__(self, options: StreamingOptions) -> None:
        self.options = options
        self._vad = StreamingVad()
        self._frames_done = 0
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # absolute sample index of _buffer[0]
        self._pad = int(options.speech_pad_ms * TARGET_SAMPLE_RATE / 1000)
        self._silence_frames = max(1, round(options.silence_duration_ms / 1000 / FRAME_SECONDS))
        self._min_speech_frames = max(1, round(options.min_speech_ms / 1000 / FRAME_SECONDS))
        self._max_frames = round(options.max_utterance_ms / 1000 / FRAME_SECONDS)
        self._search_frames = round(options.split_search_ms / 1000 / FRAME_SECONDS)
        self._interim_samples = int(options.interim_interval_ms * TARGET_SAMPLE_RATE / 1000)
        self._first_interim_samples = int(
            min(options.first_interim_ms, options.interim_interval_ms) * TARGET_SAMPLE_RATE / 1000
        )
        self.utterance_index = 0
        self._reset_utterance()

    def _reset_utterance(self) -> None:
        self._triggered = False
        self._confirmed = False
        self._start_frame = 0
        self._last_speech_frame = 0
        self._speech_frames = 0
        self._probs: list[float] = []  # probabilities of the open utterance's frames
        self._next_interim_sample = 0
        self._interim_speech_frame = -1  # last speech frame covered by an interim

    @property
    def in_speech(self) -> bool:
        return self._confirmed

    def accept(self, samples: np.ndarray) -> list[Event]:
        """Adds audio; returns the events it caused, in order."""
        if len(samples) == 0:
            return []
        self._buffer = np.concatenate([self._buffer, samples])
        events: list[Event] = []
        for prob in self._vad.process(samples):
            self._on_frame(float(prob), events)
            self._frames_done += 1
        if self._confirmed and self.options.interim_results:
            end_sample = self._buffer_start + len(self._buffer)
            # Only when the speaker said something since the last one: a pause adds no words.
            fresh_speech = self._last_speech_frame > self._interim_speech_frame
            if end_sample >= self._next_interim_sample and fresh_speech:
                self._next_interim_sample = end_sample + self._interim_samples
                self._interim_speech_frame = self._last_speech_frame
                start = self._utterance_start_sample()
                events.append(
                    InterimDue(
                        self.utterance_index,
                        self._slice(start, end_sample),
                        start / TARGET_SAMPLE_RATE,
                        end_sample / TARGET_SAMPLE_RATE,
                    )
                )
        if not self._triggered:
            self._trim(self._buffer_start + len(self._buffer) - self._pad)
        return events

    def finish(self) -> list[Event]:
        """End of input: the open utterance, if it holds speech, becomes final."""
        if self._triggered and self._speech_frames >= self._min_speech_frames:
            end_sample = self._buffer_start + len(self._buffer)
            events: list[Event] = []
            if not self._confirmed:
                self._confirm(events)
            events.append(self._end_utterance(end_sample, end_sample, "end_of_stream"))
            return events
        self._reset_utterance()
        return []

    def _on_frame(self, prob: float, events: list[Event]) -> None:
        frame = self._frames_done
        threshold = self.options.speech_threshold
        if not self._triggered:
            if prob >= threshold:
                self._triggered = True
                self._start_frame = self._last_speech_frame = frame
                self._speech_frames = 1
                self._probs = [prob]
            return
        self._probs.append(prob)
        if prob >= threshold:
            self._last_speech_frame = frame
            self._speech_frames += 1
            if not self._confirmed and self._speech_frames >= self._min_speech_frames:
                self._confirm(events)
        elif prob < threshold - HYSTERESIS and frame - self._last_speech_frame >= self._silence_frames:
            if self._confirmed:
                speech_end = (self._last_speech_frame + 1) * FRAME_SAMPLES
                end = min(speech_end + self._pad, (frame + 1) * FRAME_SAMPLES)
                events.append(self._end_utterance(end, speech_end, "silence"))
            else:
                self._reset_utterance()  # a click or breath, not speech
            return
        if self._confirmed and frame - self._start_frame >= self._max_frames:
            self._split(frame, events)

    def _confirm(self, events: list[Event]) -> None:
        self._confirmed = True
        self._next_interim_sample = self._start_frame * FRAME_SAMPLES + self._first_interim_samples
        events.append(SpeechStarted(self.utterance_index, self._start_frame * FRAME_SECONDS))

    def _split(self, frame: int, events: list[Event]) -> None:
        """Ends an over-long utterance at the quietest recent frame; speech continues."""
        window = self._probs[-self._search_frames :]
        cut_frame = frame - len(window) + 1 + int(np.argmin(window))
        cut_sample = (cut_frame + 1) * FRAME_SAMPLES
        events.append(self._end_utterance(cut_sample, cut_sample, "max_length"))
        self._triggered = True
        self._start_frame = cut_frame + 1
        self._last_speech_frame = frame
        self._speech_frames = self._min_speech_frames
        self._probs = self._probs[len(self._probs) - (frame - cut_frame) :]
        self._confirm(events)

    def _utterance_start_sample(self) -> int:
        return max(self._buffer_start, self._start_frame * FRAME_SAMPLES - self._pad)

    def _end_utterance(self, end_sample: int, speech_end_sample: int, reason: str) -> UtteranceEnded:
        start = self._utterance_start_sample()
        event = UtteranceEnded(
            self.utterance_index,
            self._slice(start, end_sample),
            start / TARGET_SAMPLE_RATE,
            end_sample / TARGET_SAMPLE_RATE,
            speech_end_sample / TARGET_SAMPLE_RATE,
            reason,
        )
        self.utterance_index += 1
        self._reset_utterance()
        # Audio before the end is dropped, so the next utterance's pre-roll can never
        # reach back into this one: no word is decoded twice.
        self._trim(end_sample)
        return event

    def _slice(self, start: int, end: int) -> np.ndarray:
        lo = max(0, start - self._buffer_start)
        hi = max(lo, end - self._buffer_start)
        return self._buffer[lo:hi].copy()

    def _trim(self, keep_from: int) -> None:
        drop = keep_from - self._buffer_start
        if drop > 0:
            self._buffer = self._buffer[drop:]
            self._buffer_start += drop


_WORD_KEY = re.compile(r"[^\w']+")


def _word_key(word: str) -> str:
    return _WORD_KEY.sub("", word.lower())


class LocalAgreement:
    """LocalAgreement-2 over interim hypotheses of one utterance.

    The words two consecutive hypotheses agree on become the stable prefix; it only
    grows, and the next interim decode is forced to start with it, so stable text
    is never revised by a later interim result.
    """

    def __init__(self) -> None:
        self.stable_words: list[str] = []
        self._previous: list[str] = []

    @property
    def stable_text(self) -> str:
        return " ".join(self.stable_words)

    def update(self, text: str) -> tuple[str, float]:
        """Takes a new hypothesis; returns the interim transcript and its stability.

        The transcript is the stable prefix, verbatim, followed by the hypothesis's
        words beyond it; stability is the share of its words that are stable.
        """
        words = text.split()
        agreed = 0
        for old, new in zip(self._previous, words):
            if _word_key(old) != _word_key(new):
                break
            agreed += 1
        # The last word of a hypothesis is often cut mid-speech: never commit it.
        agreed = min(agreed, max(0, len(words) - 1))
        if agreed > len(self.stable_words):
            # Keep the committed words verbatim; only append newly agreed ones.
            self.stable_words = self.stable_words + words[len(self.stable_words) : agreed]
        self._previous = words
        combined = self.stable_words + words[len(self.stable_words) :]
        stability = len(self.stable_words) / len(combined) if combined else 0.0
        return " ".join(combined), stability
