"""Streaming recognition state: VAD segmentation into utterances, interim cadence,
and the LocalAgreement policy that keeps interim text from flickering.

Everything here is synchronous and model-free: it decides *what* to decode and
*when*; the stream session runs the decodes. Audio is kept only for the open
utterance plus a short pre-roll, so memory stays bounded however long a stream is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .options import TARGET_SAMPLE_RATE, StreamingOptions
from .quality import LOOKBACK_SECONDS, AudioMeter, AudioQuality
from .text import cut_trailing_repeat, dropped_head, leading_fragments, word_key
from .vad import FRAME_SAMPLES, StreamingVad

FRAME_SECONDS = FRAME_SAMPLES / TARGET_SAMPLE_RATE
HYSTERESIS = 0.15  # a frame ends speech only below threshold - 0.15, as Silero's own rule


@dataclass
class SpeechStarted:
    """Speech began at ``offset``; ``continued``: it is the rest of the speech of the utterance
    before, which ended at ``offset`` in a pause or at the length limit. That utterance's audio
    ends there, this one's starts ``speech_pad_ms`` earlier (pre-roll), so a word spoken across
    the cut is whole in this one; words before ``offset`` belong to the one before."""

    utterance_index: int
    offset: float
    continued: bool = False


@dataclass
class InterimDue:
    """Enough new speech arrived for an interim decode of the utterance so far."""

    utterance_index: int
    audio: np.ndarray
    start: float
    end: float


@dataclass
class EndpointLikely:
    """Speech paused long enough that the utterance's final audio is complete.

    The endpoint is not certain yet: if the silence lasts ``silence_duration_ms`` the
    utterance ends with exactly this audio, so its final decode can start now.
    """

    utterance_index: int
    audio: np.ndarray
    start: float
    end: float
    speech_end: float
    short: bool = False  # less speech than ``short_utterance_ms``: never ended early
    audio_quality: AudioQuality | None = None  # measures of ``audio``


@dataclass
class SpeechResumed:
    """Speech came back after an ``EndpointLikely``, after a pause of ``pause`` seconds:
    that audio is no longer the utterance's final audio."""

    utterance_index: int
    pause: float = 0.0


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
    foreseen: bool = False  # exactly the audio of this utterance's EndpointLikely
    audio_quality: AudioQuality | None = None  # measures of ``audio``, noise floor from the pause before


Event = SpeechStarted | InterimDue | EndpointLikely | SpeechResumed | UtteranceEnded


class AudioBuffer:
    """Samples addressed by absolute index, appended and trimmed without per-chunk copies.

    Storage grows by doubling and is compacted in place, so appending a 100 ms chunk
    costs its own length, not the length of the open utterance.
    """

    def __init__(self) -> None:
        self._data = np.zeros(1 << 15, dtype=np.float32)
        self._head = 0  # position of ``start`` in _data
        self._length = 0
        self.start = 0  # absolute index of the first sample held

    @property
    def end(self) -> int:
        """Absolute index one past the last sample held."""
        return self.start + self._length

    def append(self, samples: np.ndarray) -> None:
        needed = self._length + len(samples)
        if self._head + needed > len(self._data):
            if needed > len(self._data) // 2:
                grown = np.zeros(max(2 * len(self._data), needed), dtype=np.float32)
                grown[: self._length] = self._data[self._head : self._head + self._length]
                self._data = grown
            else:
                self._data[: self._length] = self._data[self._head : self._head + self._length]
            self._head = 0
        tail = self._head + self._length
        self._data[tail : tail + len(samples)] = samples
        self._length = needed

    def slice(self, start: int, end: int) -> np.ndarray:
        """A copy of samples [start, end), clipped to what is held."""
        lo = min(self._length, max(0, start - self.start))
        hi = min(self._length, max(lo, end - self.start))
        return self._data[self._head + lo : self._head + hi].copy()

    def trim(self, keep_from: int) -> None:
        """Forgets samples before ``keep_from``."""
        drop = min(self._length, keep_from - self.start)
        if drop > 0:
            self._head += drop
            self._length -= drop
            self.start += drop


class StreamingRecognizer:
    """Feeds 16 kHz audio through the VAD and emits utterance events, with the measures of
    each utterance's audio (``audio_quality``).

    ``full_scale``: the largest sample magnitude of the stream's encoding (``audio.full_scale``),
    for the clipping measure.
    """

    def __init__(self, options: StreamingOptions, full_scale: float = 1.0) -> None:
        self.options = options
        self._vad = StreamingVad(
            refresh_frames=round(options.vad_refresh_ms / 1000 / FRAME_SECONDS),
            quiet_below=options.speech_threshold,
        )
        lookback = options.max_utterance_ms / 1000 + options.speech_pad_ms / 1000 + LOOKBACK_SECONDS
        self.meter = AudioMeter(options.speech_threshold, full_scale, round(lookback / FRAME_SECONDS))
        self._noise_from = 0  # sample where the pause before the open utterance began
        self._frames_done = 0
        self._buffer = AudioBuffer()
        self._pad = int(options.speech_pad_ms * TARGET_SAMPLE_RATE / 1000)
        self._silence_frames = max(1, round(options.silence_duration_ms / 1000 / FRAME_SECONDS))
        self._short_speech_frames = round(options.short_utterance_ms / 1000 / FRAME_SECONDS)
        self._short_silence_frames = max(
            self._silence_frames, round(options.short_utterance_silence_ms / 1000 / FRAME_SECONDS)
        )
        self._min_speech_frames = max(1, round(options.min_speech_ms / 1000 / FRAME_SECONDS))
        self._long_frames = round(options.long_utterance_ms / 1000 / FRAME_SECONDS)
        self._long_silence_frames = max(
            1, min(self._silence_frames, round(options.long_utterance_silence_ms / 1000 / FRAME_SECONDS))
        )
        # The final's audio then ends in the pause: up to ``speech_pad_ms`` after the speech.
        speculative = options.speculative_final_ms
        self._speculative_frames = (
            max(1, round(speculative / 1000 / FRAME_SECONDS))
            if 0 < speculative < options.silence_duration_ms
            else 0
        )
        self._max_frames = round(options.max_utterance_ms / 1000 / FRAME_SECONDS)
        self._search_frames = round(options.split_search_ms / 1000 / FRAME_SECONDS)
        self._interim_samples = int(options.interim_interval_ms * TARGET_SAMPLE_RATE / 1000)
        # Never more often than the stream asked for (a client may set a slower cadence).
        long_interval = max(options.long_interim_interval_ms, options.interim_interval_ms)
        self._long_interim_samples = int(long_interval * TARGET_SAMPLE_RATE / 1000)
        self._window_samples = int(options.interim_window_ms * TARGET_SAMPLE_RATE / 1000)
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
        self._speculating = False  # an EndpointLikely is out for the current pause
        self._speculated_end = 0  # the end sample of its audio

    @property
    def in_speech(self) -> bool:
        return self._confirmed

    def accept(self, samples: np.ndarray) -> list[Event]:
        """Adds audio; returns the events it caused, in order."""
        if len(samples) == 0:
            return []
        self._buffer.append(samples)
        events: list[Event] = []
        probs = self._vad.process(samples)
        self.meter.process(samples, probs)
        for prob in probs:
            self._on_frame(float(prob), events)
            self._frames_done += 1
        if self._confirmed and self.options.interim_results:
            end_sample = self._buffer.end
            # Only when the speaker said something since the last one: a pause adds no words.
            fresh_speech = self._last_speech_frame > self._interim_speech_frame
            if end_sample >= self._next_interim_sample and fresh_speech:
                start = self._utterance_start_sample()
                long = 0 < self._window_samples < end_sample - start
                self._next_interim_sample = end_sample + (
                    self._long_interim_samples if long else self._interim_samples
                )
                self._interim_speech_frame = self._last_speech_frame
                events.append(
                    InterimDue(
                        self.utterance_index,
                        self._buffer.slice(start, end_sample),
                        start / TARGET_SAMPLE_RATE,
                        end_sample / TARGET_SAMPLE_RATE,
                    )
                )
        if not self._triggered:
            self._buffer.trim(self._buffer.end - self._pad)
        return events

    def finish(self) -> list[Event]:
        """End of input: the open utterance, if it holds speech, becomes final."""
        if self._triggered and self._speech_frames >= self._min_speech_frames:
            end_sample = self._buffer.end
            speech_end = end_sample
            if self._speculating:
                # Silent since the speculation: end where it did, so its decode is the final.
                speech_end = (self._last_speech_frame + 1) * FRAME_SAMPLES
                end_sample = self._speculated_end
            events: list[Event] = []
            if not self._confirmed:
                self._confirm(events)
            events.append(
                self._end_utterance(end_sample, speech_end, "end_of_stream", foreseen=self._speculating)
            )
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
        silent_frames = frame - self._last_speech_frame
        if prob >= threshold:
            if self._speculating:
                self._speculating = False
                pause = (frame - self._last_speech_frame - 1) * FRAME_SECONDS
                events.append(SpeechResumed(self.utterance_index, pause))
            self._last_speech_frame = frame
            self._speech_frames += 1
            if not self._confirmed and self._speech_frames >= self._min_speech_frames:
                self._confirm(events)
        elif prob < threshold - HYSTERESIS and silent_frames >= self._endpoint_frames():
            if self._confirmed:
                speech_end = (self._last_speech_frame + 1) * FRAME_SAMPLES
                end = min(speech_end + self._pad, (frame + 1) * FRAME_SAMPLES)
                if self._speculating:
                    end = self._speculated_end  # exactly the speculative decode's audio
                events.append(self._end_utterance(end, speech_end, "silence", foreseen=self._speculating))
            else:
                self._reset_utterance()  # a click or breath, not speech
            return
        elif self._confirmed and not self._speculating and 0 < self._speculation_frames() <= silent_frames:
            # The same bounds _end_utterance will use if the silence holds.
            self._speculating = True
            start = self._utterance_start_sample()
            speech_end = (self._last_speech_frame + 1) * FRAME_SAMPLES
            end = min(speech_end + self._pad, (frame + 1) * FRAME_SAMPLES)
            self._speculated_end = end
            events.append(
                EndpointLikely(
                    self.utterance_index,
                    self._buffer.slice(start, end),
                    start / TARGET_SAMPLE_RATE,
                    end / TARGET_SAMPLE_RATE,
                    speech_end / TARGET_SAMPLE_RATE,
                    short=self._is_short(),
                    audio_quality=self.meter.summary(start, end, self._noise_from, record=False),
                )
            )
        if self._confirmed and frame - self._start_frame >= self._max_frames:
            self._split(frame, events)

    def _is_short(self) -> bool:
        return self._speech_frames < self._short_speech_frames

    def _is_long(self) -> bool:
        return 0 < self._long_frames <= self._frames_done - self._start_frame

    def _endpoint_frames(self) -> int:
        """Silence that ends the open utterance: longer while it holds very little speech,
        shorter once it is long."""
        if self._is_short():
            return self._short_silence_frames
        return self._long_silence_frames if self._is_long() else self._silence_frames

    def _speculation_frames(self) -> int:
        """Silence after which the final decode starts: as long before the endpoint either way."""
        if not self._speculative_frames:
            return 0
        lead = self._silence_frames - self._speculative_frames
        return max(1, self._endpoint_frames() - lead)

    def _confirm(self, events: list[Event], continued: bool = False) -> None:
        self._confirmed = True
        self._next_interim_sample = self._start_frame * FRAME_SAMPLES + self._first_interim_samples
        events.append(SpeechStarted(self.utterance_index, self._start_frame * FRAME_SECONDS, continued))

    def _split(self, frame: int, events: list[Event]) -> None:
        """Ends an over-long utterance at the quietest recent frame; speech continues."""
        window = self._probs[-self._search_frames :]
        cut_frame = frame - len(window) + 1 + int(np.argmin(window))
        cut_sample = (cut_frame + 1) * FRAME_SAMPLES
        events += self._cut(cut_sample, cut_sample, "max_length")

    def end_at(self, utterance_index: int, end: float, speech_end: float, reason: str) -> list[Event]:
        """Ends the open utterance at ``end`` seconds, the end of an ``EndpointLikely``'s audio
        (its pause), before its endpoint: ``confident`` while the pause lasts, ``sentence`` once
        speech has resumed, which then goes on as the next utterance from that point. Returns no
        events when that utterance is no longer open or ``end`` is not within it."""
        end_sample = round(end * TARGET_SAMPLE_RATE)
        open_utterance = utterance_index == self.utterance_index and self._confirmed
        if not open_utterance or not self._utterance_start_sample() < end_sample <= self._buffer.end:
            return []
        speech_end_sample = round(speech_end * TARGET_SAMPLE_RATE)
        if self._speculating and end_sample == self._speculated_end:
            return [self._end_utterance(end_sample, speech_end_sample, reason, foreseen=True)]
        return self._cut(end_sample, speech_end_sample, reason, foreseen=True)

    def _cut(
        self, end_sample: int, speech_end_sample: int, reason: str, foreseen: bool = False
    ) -> list[Event]:
        """Ends the open utterance at ``end_sample`` while speech goes on after it: the rest is
        the next utterance, confirmed, with the audio before the cut as its pre-roll."""
        old_start, last_speech, probs = self._start_frame, self._last_speech_frame, self._probs
        events: list[Event] = [
            self._end_utterance(end_sample, speech_end_sample, reason, foreseen=foreseen, keep_pre_roll=True)
        ]
        start_frame = -(-end_sample // FRAME_SAMPLES)
        kept = probs[max(0, start_frame - old_start) :]  # probs[i] is the score of frame old_start + i
        threshold = self.options.speech_threshold
        self._triggered = True
        self._start_frame = start_frame
        self._last_speech_frame = max(last_speech, start_frame)
        self._speech_frames = max(self._min_speech_frames, sum(p >= threshold for p in kept))
        self._probs = kept
        self._confirm(events, continued=True)
        return events

    def _utterance_start_sample(self) -> int:
        return max(self._buffer.start, self._start_frame * FRAME_SAMPLES - self._pad)

    def _end_utterance(
        self,
        end_sample: int,
        speech_end_sample: int,
        reason: str,
        foreseen: bool = False,
        keep_pre_roll: bool = False,
    ) -> UtteranceEnded:
        start = self._utterance_start_sample()
        event = UtteranceEnded(
            self.utterance_index,
            self._buffer.slice(start, end_sample),
            start / TARGET_SAMPLE_RATE,
            end_sample / TARGET_SAMPLE_RATE,
            speech_end_sample / TARGET_SAMPLE_RATE,
            reason,
            foreseen=foreseen,
            audio_quality=self.meter.summary(start, end_sample, self._noise_from, record=True),
        )
        self._noise_from = end_sample
        self.utterance_index += 1
        self._reset_utterance()
        # Audio before the end is dropped, so a next utterance's pre-roll never reaches back
        # into this one; speech cut mid-flow keeps it, and drops the words it hears before the cut.
        self._buffer.trim(end_sample - self._pad if keep_pre_roll else end_sample)
        return event


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
            if word_key(old) != word_key(new):
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


@dataclass
class InterimPlan:
    """What the next interim decodes: the utterance audio from ``start`` seconds on, with
    the words said before it as previous text and the stable words after it forced as the
    start of the hypothesis; ``align`` asks for word timings so the window can move."""

    start: float
    said_before: str
    prefix: str
    align: bool


class InterimWindow:
    """The audio and text of one utterance's interim decodes.

    Interims decoding the whole open utterance cost more per second the longer it grows:
    the encoder input lengthens, and the decoder steps through every word again, forced
    prefix included (CTranslate2 computes each forced token like a generated one). Once
    the window holds ``window_seconds`` of audio, the next interim is aligned, and the
    window moves to the end of the last stable word: those words are then given as
    previous text, which the decoder reads in one pass, instead of as audio. Each interim
    then decodes at most about ``window_seconds`` of audio and its words, whatever the
    utterance length. Finals still decode the whole utterance.

    The interim transcript is that of ``LocalAgreement`` over the whole utterance.
    """

    def __init__(self, window_seconds: float, start: float = 0.0) -> None:
        """``start``: offset in the utterance's audio where its own speech begins (after the
        pre-roll of an utterance that continues speech cut from the one before)."""
        self.window_seconds = window_seconds
        self.agreement = LocalAgreement()
        self.transcript = ""  # the latest interim transcript of the whole utterance
        # Every move: (offset in the utterance's audio, stable words spoken before it).
        self.moves: list[tuple[float, int]] = [(start, 0)] if start else []

    @property
    def start(self) -> float:
        """Offset of the window in the utterance's audio."""
        return self.moves[-1][0] if self.moves else 0.0

    @property
    def _words_before(self) -> int:
        """Stable words spoken before the window."""
        return self.moves[-1][1] if self.moves else 0

    @property
    def stable_text(self) -> str:
        return self.agreement.stable_text

    def plan(self, audio_seconds: float) -> InterimPlan:
        """The next interim, for an utterance whose audio so far lasts ``audio_seconds``."""
        stable = self.agreement.stable_words
        return InterimPlan(
            start=self.start,
            said_before=" ".join(stable[: self._words_before]),
            prefix=" ".join(stable[self._words_before :]),
            align=0 < self.window_seconds <= audio_seconds - self.start,
        )

    def update(self, text: str, words: list | None = None) -> tuple[str, float]:
        """Takes the window's hypothesis (and its aligned words, offsets in the window);
        returns the utterance's interim transcript and its stability.

        A greedy decode that starts over at the end of its audio ("Go forward. Go forward.")
        counts without the repeat (``text.cut_trailing_repeat``)."""
        text = cut_trailing_repeat(text)
        words = words[: len(text.split())] if words else words
        if not self.agreement.stable_words:
            # A window that starts inside a word hears its last sound as a letter ("S NOT").
            fragments = leading_fragments(text)
            text = " ".join(text.split()[fragments:])
            words = words[fragments:] if words else words
        said_before = self.agreement.stable_words[: self._words_before]
        transcript, stability = self.agreement.update(" ".join([*said_before, text]))
        movable = len(self.agreement.stable_words) - self._words_before
        # Words and text must correspond one to one to know where the stable ones end.
        if words and movable > 0 and len(words) == len(text.split()):
            self.moves.append((self.start + words[movable - 1].end, self._words_before + movable))
        self.transcript = transcript
        return transcript, stability

    def head_cut(self, final_text: str) -> float | None:
        """Where to split the utterance (seconds into its audio) for a final that left out
        words the interims heard at its start; None when it did not, or when the window never
        moved past them. A move is the end of a word the interims aligned: the missing words
        all lie before the first move past them."""
        missing = dropped_head(self.transcript, final_text)
        if not missing:
            return None
        return next((start for start, words_before in self.moves if words_before >= missing), None)
