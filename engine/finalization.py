"""The finalisation policy of one stream: when an utterance's final is decided, what it
decodes, and the order in which finals leave.

The stream session feeds audio in and delivers what comes out; everything between the
recognizer's events (``recognizer.StreamingRecognizer``) and the results is decided here:

- Speculation. A final decode starts once a pause lasts ``speculative_final_ms``
  (``EndpointLikely``): the final's audio is then complete if the pause turns out to be the
  endpoint.
- Confident endpoints. When that decode is done while the pause lasts, and it is confident
  (it ends a sentence and continues what the interims heard: ``is_confident``), the utterance
  ends at once, reason ``confident``. Otherwise the endpoint comes after
  ``silence_duration_ms`` as before, and that decode is its final; speech resuming first
  discards it.
- Sentence finals. When speech resumes before that decode is done, it keeps running if the
  utterance is worth cutting; when it is confident, the utterance is cut at the pause
  (reason ``sentence``): that decode is its final, and the speech after the pause goes on as
  the next utterance. Continuous speech so gets a final at each sentence end the speaker
  pauses after, while still talking, instead of one at the 20 s limit.
- Joins. An utterance that continues speech cut from the one before (a sentence final or the
  length limit) has the audio before the cut as pre-roll, so a word across the cut is whole;
  its final is aligned, and the words that lie before the cut, which the utterance before
  ends with, are dropped (``drop_words_before``): nothing is lost, nothing said twice.
- Context and order. Every final is prompted with the finals before it (``SpokenContext``),
  as offline Whisper conditions on previous text, so a final's decode starts once those are
  decoded; finals leave strictly in utterance order.
- Repairs. A final that left out the first words its interims heard is decoded in two
  (``_decode_in_two``). A final whose last word ends well before the utterance's speech does
  (Whisper stopped early, as it now and then does on long read speech) decodes the rest,
  as offline Whisper seeks on (``_decode_rest``).

Interims are best effort: at most one in flight, none while a final of the stream is
pending, and a speculative final replaces a running one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .audio import quietest_point
from .context import SpokenContext
from .errors import decode_failed
from .model import DecodeRequest, Hypothesis, join_hypotheses
from .options import TARGET_SAMPLE_RATE
from .quality import recognition_quality
from .recognizer import (
    EndpointLikely,
    InterimDue,
    InterimPlan,
    InterimWindow,
    SpeechResumed,
    SpeechStarted,
    StreamingRecognizer,
    UtteranceEnded,
)
from .scheduler import InferenceScheduler, StaleInterim
from .text import agrees, ends_sentence, has_words, word_key

if TYPE_CHECKING:
    from otel import StreamTelemetry

    from .settings import RecognitionSettings

logger = logging.getLogger(__name__)

# A confident final may hold this many words the last interim before the pause had not heard
# yet: interims come every 1-1.5 s of speech, 2-4 words of read speech.
MAX_UNHEARD_WORDS = 4
# Speech an utterance must hold before a sentence final may cut it: a shorter one is decoded
# with little acoustic context, and its final is seldom late anyway.
MIN_SENTENCE_SECONDS = 2.0
# The shortest pause a sentence final may cut speech at once it resumed. Readers pause at a
# sentence end for about half a second and at a comma for less; Whisper ends any audio that
# stops in a pause with a full stop, so cutting at a 250 ms pause cut "The child almost hurt."
# off "the small dog", which the next final then left out.
MIN_SENTENCE_PAUSE_SECONDS = 0.35
# Finals of utterances at least this long are aligned, to see whether the decoder stopped early.
REST_CHECK_SECONDS = 6.0
# Speech after the last decoded word that makes the rest be decoded: word ends from Whisper's
# alignment and the VAD's speech end differ by up to a few tenths of a second.
REST_GAP_SECONDS = 1.0


@dataclass
class InterimResult:
    """An interim transcript of the open utterance, from the stream's start ``start`` to ``end``."""

    utterance_index: int
    transcript: str
    stability: float
    stable_text: str
    start: float
    end: float
    confidence: float
    language: str


@dataclass
class FinalResult:
    """An utterance's final: its hypothesis (word offsets from ``start``), bounds in stream
    seconds, why it ended, and the decodes whose results made it (for telemetry)."""

    utterance_index: int
    hypothesis: Hypothesis
    start: float
    end: float
    speech_end: float
    reason: str
    decodes: list[Any] = field(default_factory=list)


@dataclass
class FinalDecode:
    hypothesis: Hypothesis
    decodes: list[Any]
    repair: str = ""  # ``quality.RecognitionQuality.repair``


class Delivery(Protocol):
    """Where the policy's output goes (the stream session, or a test)."""

    def speech_event(self, kind: str, offset: float, utterance_index: int) -> None:
        """``started``, ``ended`` or ``end_of_single_utterance`` at stream offset ``offset``."""

    def interim(self, result: InterimResult) -> None: ...

    def final(self, result: FinalResult) -> None: ...

    def pending_finals(self, seconds: float) -> None:
        """Audio of ended utterances whose finals are not decoded yet changed by ``seconds``."""

    def can_take_interim(self) -> bool:
        """False while the client is slow to read: interims are then skipped."""


@dataclass
class _Speculation:
    event: EndpointLikely
    decode: asyncio.Future
    heard: str  # the interim transcript when the pause began
    resumed: bool = False  # speech came back: it is a sentence final or nothing


def is_confident(hypothesis: Hypothesis, heard: str) -> bool:
    """Whether a final decoded in a pause may end its utterance there: it ends a sentence,
    passed Whisper's checks, and continues what the interims heard (``heard``), so neither a
    trailing "Mr." nor a beam that went its own way ends an utterance early."""
    return (
        hypothesis.is_speech
        and not hypothesis.failed_checks
        and not hypothesis.looped
        and ends_sentence(hypothesis.text)
        and agrees(hypothesis.text, heard, MAX_UNHEARD_WORDS)
    )


def drop_words_before(hypothesis: Hypothesis, offset: float) -> Hypothesis:
    """The hypothesis without the words whose middle lies before ``offset`` seconds into its
    audio: the pre-roll of an utterance that continues speech cut from the one before."""
    kept = [w for w in hypothesis.words if (w.start + w.end) / 2 >= offset]
    dropped = len(hypothesis.words) - len(kept)
    if not dropped:
        return hypothesis
    dropped_keys = [word_key(w.word) for w in hypothesis.words[:dropped]]

    def without_head(text: str) -> str:
        words = text.split()
        return " ".join(words[dropped:]) if [word_key(w) for w in words[:dropped]] == dropped_keys else text

    text = " ".join(w.word for w in kept)
    return dataclasses.replace(
        hypothesis,
        text=text,
        words=kept,
        is_speech=hypothesis.is_speech and has_words(text),
        alternatives=[without_head(a) for a in hypothesis.alternatives],
    )


class _Closed:
    """The delivery of a closed policy: tasks still finishing deliver nothing."""

    def speech_event(self, kind: str, offset: float, utterance_index: int) -> None:
        pass

    def interim(self, result: InterimResult) -> None:
        pass

    def final(self, result: FinalResult) -> None:
        pass

    def pending_finals(self, seconds: float) -> None:
        pass

    def can_take_interim(self) -> bool:
        return False


class Finalizer:
    """Turns one stream's audio into speech events, interims and finals (see the module)."""

    def __init__(
        self,
        recognizer: StreamingRecognizer,
        scheduler: InferenceScheduler,
        settings: RecognitionSettings,
        telemetry: StreamTelemetry,
        delivery: Delivery,
    ) -> None:
        self.recognizer = recognizer
        self.scheduler = scheduler
        self.settings = settings
        self.telemetry = telemetry
        self.delivery = delivery
        self.options = settings.streaming
        self.done = False  # a single utterance ended: read no more
        self._window_seconds = self.options.interim_window_ms / 1000
        self._window = InterimWindow(self._window_seconds)
        self._continues_at: float | None = None  # cut offset the open utterance continues from
        self._interim: asyncio.Task | None = None
        self._speculation: _Speculation | None = None
        self._finals: list[asyncio.Task] = []
        self._context = SpokenContext()
        # Done once the text of every ended utterance's final is in the context.
        self._context_ready: asyncio.Future | None = None

    @property
    def in_speech(self) -> bool:
        return self.recognizer.in_speech

    @property
    def utterances(self) -> int:
        return self.recognizer.utterance_index

    def accept(self, samples) -> None:
        """Feeds 16 kHz audio."""
        if not self.done:
            self._handle(self.recognizer.accept(samples))

    def finish(self, samples) -> None:
        """End of input, with the decoder's last ``samples``: the open utterance is final."""
        if not self.done:
            self._handle(self.recognizer.accept(samples) + self.recognizer.finish())

    async def wait_finals(self) -> None:
        """Waits until every final is delivered; raises if a final's decode failed."""
        if self._finals:
            await asyncio.wait(self._finals)
        for task in self._finals:
            if not task.cancelled() and task.exception() is not None:
                logger.error("final decode failed", exc_info=task.exception())
                raise decode_failed()

    def close(self) -> None:
        self._discard_speculation()
        for task in [self._interim, self._context_ready, *self._finals]:
            if task is not None and not task.done():
                task.cancel()
        # A cancelled task keeps its CancelledError, whose traceback holds the task's frame and
        # so this object: a reference cycle only Python's rare full collections free.
        self._interim = self._context_ready = None
        self._finals = []
        # The session holds this policy and this policy its session: without the cycle
        # collector, neither would be freed with its audio.
        self.delivery = _Closed()

    def _handle(self, events: list) -> None:
        for event in events:
            if self.done:
                return
            if isinstance(event, SpeechStarted):
                self._started(event)
            elif isinstance(event, InterimDue):
                self._start_interim(event)
            elif isinstance(event, EndpointLikely):
                self._speculate(event)
            elif isinstance(event, SpeechResumed):
                self._resumed(event)
            elif isinstance(event, UtteranceEnded):
                self.telemetry.utterance_ended(
                    event.utterance_index,
                    event.start,
                    event.end,
                    event.speech_end,
                    event.reason,
                    event.audio_quality,
                )
                self.delivery.speech_event("ended", event.speech_end, event.utterance_index)
                self._start_final(event)
                if self.options.single_utterance:
                    self.done = True
                    self.delivery.speech_event("end_of_single_utterance", event.end, event.utterance_index)

    def _started(self, event: SpeechStarted) -> None:
        self.telemetry.utterance_started(event.utterance_index, event.offset)
        self.delivery.speech_event("started", event.offset, event.utterance_index)
        self._continues_at = event.offset if event.continued else None
        pre_roll = self.options.speech_pad_ms / 1000 if event.continued else 0.0
        self._window = InterimWindow(self._window_seconds, start=pre_roll)

    # Interims

    def _start_interim(self, event: InterimDue) -> None:
        busy = self._interim is not None and not self._interim.done()
        pausing = self._speculation is not None and not self._speculation.resumed
        if busy or pausing or any(not task.done() for task in self._finals):
            return  # coalesced: the next interim covers this audio too
        if not self.delivery.can_take_interim() or self.scheduler.finals_waiting:
            return  # the client reads slowly, or finals are queued: interims step aside
        self._interim = asyncio.create_task(self._run_interim(event))

    async def _run_interim(self, event: InterimDue) -> None:
        window = self._window
        plan = window.plan(len(event.audio) / TARGET_SAMPLE_RATE)
        observer = self.telemetry.decode(
            "interim", event.utterance_index, event.start + plan.start, event.end
        )
        audio = event.audio[round(plan.start * TARGET_SAMPLE_RATE) :]
        try:
            hypothesis = await self.scheduler.decode(audio, self._request(final=False, plan=plan), observer)
        except StaleInterim:
            return  # the server is behind; interims thin out, finals do not
        except Exception:
            logger.exception("interim decode failed")  # the final still covers this audio
            return
        if event.utterance_index != self.recognizer.utterance_index or window is not self._window:
            return  # the utterance ended meanwhile; its final supersedes this
        if not hypothesis.text or hypothesis.looped:
            return  # nothing, or a looping guess: the next interim or the final does better
        text, stability = window.update(hypothesis.text, hypothesis.words)
        if not text:
            return
        self.delivery.interim(
            InterimResult(
                event.utterance_index,
                text,
                stability,
                window.stable_text,
                event.start,
                event.end,
                hypothesis.confidence,
                hypothesis.language,
            )
        )
        self.telemetry.interim_sent(event.utterance_index)

    def _cancel_interim(self) -> None:
        if self._interim is not None and not self._interim.done():
            self._interim.cancel()

    # Speculation, confident endpoints and sentence finals

    def _speculate(self, event: EndpointLikely) -> None:
        self._cancel_interim()  # the speculative final covers all of its audio
        self._discard_speculation()  # an earlier pause of the same utterance
        decode = self._decode_final(event, self._window, self._continues_at, speculative=True)
        speculation = _Speculation(event, decode, heard=self._window.transcript)
        self._speculation = speculation
        decode.add_done_callback(lambda _: self._speculation_done(speculation))

    def _resumed(self, resumed: SpeechResumed) -> None:
        speculation = self._speculation
        if speculation is None:
            return
        event = speculation.event
        speech = event.speech_end - max(event.start, self._continues_at or event.start)
        worth_cutting = (
            self.options.early_finals == "sentence"
            and not self.options.single_utterance  # the rest of the speech would be lost
            and speech >= MIN_SENTENCE_SECONDS
            and resumed.pause >= MIN_SENTENCE_PAUSE_SECONDS
        )
        if worth_cutting and not speculation.decode.done():
            speculation.resumed = True
        else:
            self._discard_speculation()

    def _speculation_done(self, speculation: _Speculation) -> None:
        if speculation is not self._speculation or speculation.decode.cancelled():
            return
        if speculation.decode.exception() is not None:
            if speculation.resumed:
                self._discard_speculation()
            return
        hypothesis = speculation.decode.result().hypothesis
        event = speculation.event
        confident = self.options.early_finals != "off" and is_confident(hypothesis, speculation.heard)
        if speculation.resumed:
            if not confident:
                self._discard_speculation()
                return
            reason = "sentence"
        elif confident and not event.short:
            reason = "confident"
        else:
            return  # the endpoint decides; this decode is its final if the pause lasts
        self._handle(self.recognizer.end_at(event.utterance_index, event.end, event.speech_end, reason))

    def _discard_speculation(self) -> None:
        if self._speculation is not None:
            self._speculation.decode.cancel()  # unrun: skipped; running: its result is ignored
            self._speculation = None
            self.telemetry.speculation_resolved(used=False)

    def _take_speculation(self, event: UtteranceEnded) -> asyncio.Future | None:
        """The speculative decode, if it decoded exactly this utterance's audio."""
        speculation = self._speculation
        same = (
            speculation is not None
            and event.foreseen
            and speculation.event.utterance_index == event.utterance_index
            and abs(speculation.event.end - event.end) < 1e-9
        )
        if not same:
            self._discard_speculation()  # e.g. split at the length limit
            return None
        self._speculation = None
        self.telemetry.speculation_resolved(used=True)
        return speculation.decode

    # Finals

    def _request(self, final: bool, plan: InterimPlan | None = None, words: bool = False) -> DecodeRequest:
        settings = self.settings
        return DecodeRequest(
            final=final,
            language=settings.language,
            prompt=settings.prompt,
            context=self._context.text,
            said_before=plan.said_before if plan else "",
            prefix=plan.prefix if plan else "",
            word_timestamps=(final and (settings.word_time_offsets or words))
            or (plan is not None and plan.align),
            alternatives=settings.alternatives if final else 1,
        )

    def _start_final(self, event: UtteranceEnded) -> None:
        self._cancel_interim()
        window, self._window = self._window, InterimWindow(self._window_seconds)
        continues_at, self._continues_at = self._continues_at, None
        # Delivered finals are dropped so an hours-long stream keeps a short list; a failed
        # one stays until wait_finals reports it.
        self._finals = [t for t in self._finals if not t.done() or (not t.cancelled() and t.exception())]
        previous = self._finals[-1] if self._finals else None
        decode = self._take_speculation(event) or self._decode_final(event, window, continues_at)
        self._context_ready = asyncio.ensure_future(self._remember(decode, self._context_ready))
        self._finals.append(asyncio.create_task(self._run_final(event, decode, previous)))
        self.delivery.pending_finals(event.end - event.start)

    def _decode_final(
        self,
        event: EndpointLikely | UtteranceEnded,
        window: InterimWindow,
        continues_at: float | None,
        speculative: bool = False,
    ) -> asyncio.Future:
        observer = self.telemetry.decode(
            "final",
            event.utterance_index,
            event.start,
            event.end,
            speculative=speculative,
            audio=event.audio_quality,
        )
        return asyncio.ensure_future(
            self._final_decode(event, window, continues_at, observer, self._context_ready)
        )

    async def _final_decode(
        self,
        event: EndpointLikely | UtteranceEnded,
        window: InterimWindow,
        continues_at: float | None,
        observer: Any,
        context_ready: asyncio.Future | None,
    ) -> FinalDecode:
        if context_ready is not None:
            await asyncio.shield(context_ready)  # the utterances before this one are in the context
        seconds = len(event.audio) / TARGET_SAMPLE_RATE
        request = self._request(final=True, words=continues_at is not None or seconds >= REST_CHECK_SECONDS)
        decodes = [observer]
        decoded = await self.scheduler.decode(event.audio, request, observer)
        cut = window.head_cut(decoded.text) if decoded.is_speech else None
        hypothesis = decoded
        if cut is not None:
            hypothesis = await self._decode_in_two(event, request, cut, decoded, decodes)
        elif decoded.words:
            hypothesis = await self._decode_rest(event, request, decoded, decodes)
        # Either gives back the decode it was handed when it found nothing to repair.
        repair = "" if hypothesis is decoded else "dropped_head" if cut is not None else "decoded_rest"
        if continues_at is not None:
            hypothesis = drop_words_before(hypothesis, continues_at - event.start)
        return FinalDecode(hypothesis, decodes, repair)

    async def _decode_in_two(
        self,
        event: EndpointLikely | UtteranceEnded,
        request: DecodeRequest,
        cut: float,
        whole: Hypothesis,
        decodes: list,
    ) -> Hypothesis:
        """The final of the whole utterance left out its first words, which the interims heard
        before ``cut`` seconds: decode the audio before and after a pause near it apart, the
        second part conditioned on the first as on an earlier utterance."""
        # Split at a pause: the aligned word end can be a tenth of a second off, and the
        # sentence that was left out is often quiet speech running on for a few words the
        # interims did not hear either.
        cut = quietest_point(event.audio, cut - 0.25, cut + 1.5, sample_rate=TARGET_SAMPLE_RATE)
        logger.info(
            "final of utterance %d left out its first words; decoding it in two at %.2f s",
            event.utterance_index,
            cut,
            extra={"stt.utterance.index": event.utterance_index},
        )
        split = round(cut * TARGET_SAMPLE_RATE)
        index, start = event.utterance_index, event.start
        observer = self.telemetry.decode("final", index, start, start + cut)
        decodes.append(observer)
        head = await self.scheduler.decode(event.audio[:split], request, observer)
        if not head.is_speech:
            return whole
        if len(event.audio) - split < TARGET_SAMPLE_RATE // 10:
            return head  # the pause is the utterance's end
        tail_request = dataclasses.replace(request, context=f"{request.context} {head.text}".strip())
        observer = self.telemetry.decode("final", index, start + cut, event.end)
        decodes.append(observer)
        tail = await self.scheduler.decode(event.audio[split:], tail_request, observer)
        return join_hypotheses(head, tail, cut)

    async def _decode_rest(
        self,
        event: EndpointLikely | UtteranceEnded,
        request: DecodeRequest,
        decoded: Hypothesis,
        decodes: list,
    ) -> Hypothesis:
        """The decoder stopped more than ``REST_GAP_SECONDS`` before the utterance's speech
        ended: decode the audio from its last word on (that word again as pre-roll, dropped),
        conditioned on what it decoded, and join the two."""
        last_end = decoded.words[-1].end
        speech_end = event.speech_end - event.start
        if speech_end - last_end < REST_GAP_SECONDS:
            return decoded
        start = max(0.0, decoded.words[-1].start - 0.1)
        logger.info(
            "final of utterance %d stopped %.1f s before its speech ended; decoding the rest",
            event.utterance_index,
            speech_end - last_end,
            extra={"stt.utterance.index": event.utterance_index},
        )
        rest_request = dataclasses.replace(
            request, context=f"{request.context} {decoded.text}".strip(), word_timestamps=True
        )
        observer = self.telemetry.decode("final", event.utterance_index, event.start + start, event.end)
        decodes.append(observer)
        rest = await self.scheduler.decode(
            event.audio[round(start * TARGET_SAMPLE_RATE) :], rest_request, observer
        )
        rest = drop_words_before(rest, last_end - start)
        return join_hypotheses(decoded, rest, start) if rest.is_speech else decoded

    async def _remember(self, decode: asyncio.Future, before: asyncio.Future | None) -> None:
        """Adds an utterance's final to the context, after the finals before it."""
        if before is not None:
            await before
        try:
            self._context.add((await asyncio.shield(decode)).hypothesis)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._context.add(None)  # a failed decode: start afresh

    async def _run_final(
        self, event: UtteranceEnded, decode: asyncio.Future, previous: asyncio.Task | None
    ) -> None:
        try:
            outcome = await decode
        finally:
            self.delivery.pending_finals(-(event.end - event.start))
            if previous is not None:
                await asyncio.wait([previous])  # results leave in utterance order
        hypothesis = outcome.hypothesis
        if hypothesis.is_speech:
            self.delivery.final(
                FinalResult(
                    event.utterance_index,
                    hypothesis,
                    event.start,
                    event.end,
                    event.speech_end,
                    event.reason,
                    outcome.decodes,
                )
            )
            self.telemetry.final_sent(
                event.utterance_index,
                event.speech_end,
                outcome.decodes,
                recognition_quality(hypothesis, outcome.repair),
            )
        else:
            self.telemetry.utterance_done(event.utterance_index)
