"""One StreamingRecognize stream: config, audio in, interim and final results out.

The session reads requests on its own task, so audio keeps flowing into the VAD
while decodes run on the inference threads. Finals are decoded as soon as their
utterance ends (several may run at once) and delivered strictly in utterance
order. Interims are best effort: at most one in flight per stream, none while a
final is pending, so they never delay a final or reorder results.

A final decode starts speculatively once a pause is long enough that the final's
audio is complete (``EndpointLikely``); when the endpoint confirms it, the final is
that decode, already under way. Speech resuming discards it.

Every final is conditioned on what the stream said before (``SpokenContext``), as
offline Whisper conditions on previous text: a final's decode starts once the finals of
the utterances before it are decoded and their text is in the context. (Interims are not:
``DecodeOptions.interim_context``.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2

from .api import stt_pb2
from .audio import AudioDecoder, quietest_point
from .context import SpokenContext
from .errors import SttError, invalid_argument, out_of_range
from .memory import LARGE_REQUEST_BYTES, release_soon
from .model import DecodeRequest, Hypothesis, SpeechModel, join_hypotheses
from .options import TARGET_SAMPLE_RATE, ServerOptions
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
from .settings import RecognitionSettings, recognition_settings

if TYPE_CHECKING:
    from otel import DecodeTelemetry, StreamTelemetry

logger = logging.getLogger(__name__)

_END = object()
MAX_QUEUED_INTERIMS = 4  # a client that reads slowly gets fewer interims, never fewer finals
# Audio one step of the event loop decodes and scores: a 1 MiB MULAW message holds 131 s, whose
# VAD took 0.6 s in one go and held up every other stream and the health checks.
STEP_SECONDS = 0.5
# Audio a stream must send per second the server waits for it, or it is idle: half real time
# (a real-time client that drifts or stalls briefly stays well above it), so keepalive messages
# with no audio, or a sample now and then, do not keep a slot.
MIN_AUDIO_RATE = 0.5


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(round(seconds * 1e9)))
    return value


def final_result(
    hypothesis: Hypothesis, event: UtteranceEnded, settings: RecognitionSettings
) -> stt_pb2.StreamingRecognitionResult:
    """The final result of an utterance, with word offsets from the stream start."""
    best = stt_pb2.SpeechRecognitionAlternative(transcript=hypothesis.text, confidence=hypothesis.confidence)
    for word in hypothesis.words:
        best.words.add(
            word=word.word,
            start_offset=duration(event.start + word.start),
            end_offset=duration(event.start + word.end),
            confidence=word.probability,
        )
    alternatives = [best] + [
        stt_pb2.SpeechRecognitionAlternative(transcript=text)
        for text in hypothesis.alternatives[: settings.alternatives - 1]
    ]
    return stt_pb2.StreamingRecognitionResult(
        alternatives=alternatives,
        is_final=True,
        stability=1.0,
        result_start_offset=duration(event.start),
        result_end_offset=duration(event.end),
        utterance_index=event.utterance_index,
        language_code=hypothesis.language,
    )


class IdleClock:
    """How long a stream has gone without audio, for ``--idle-timeout-seconds``.

    Only time spent waiting for the client's next message counts (not backpressure, when the
    server does not read). Each second of audio received pays for 1 / ``MIN_AUDIO_RATE``
    seconds of waiting; audio sent ahead earns no credit, so a client that sent its audio and
    then sends nothing is idle after the timeout, as before, and one sending empty messages
    (or a few bytes of audio) is idle after about as long.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.idle = 0.0

    @property
    def remaining(self) -> float:
        return max(0.0, self.limit - self.idle)

    def waited(self, seconds: float, audio_seconds: float) -> None:
        """The client took ``seconds`` to send a message carrying ``audio_seconds`` of audio."""
        self.idle = max(0.0, self.idle + seconds - audio_seconds / MIN_AUDIO_RATE)


class StreamSession:
    """Serves one bidirectional stream."""

    def __init__(
        self,
        model: SpeechModel,
        scheduler: InferenceScheduler,
        options: ServerOptions,
        telemetry: StreamTelemetry,
    ) -> None:
        self.model = model
        self.scheduler = scheduler
        self.options = options
        self.telemetry = telemetry
        self.settings: RecognitionSettings | None = None
        self._out: asyncio.Queue = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self._interim: asyncio.Task | None = None
        self._finals: list[asyncio.Task] = []
        self._speculation: asyncio.Future | None = None  # a final decode started in a pause
        self._config_read: asyncio.Future | None = None
        self._large_request = False  # a message of megabytes: return the heap it used
        self._reading = False
        # Audio of ended utterances whose finals are not decoded yet, and whether it is
        # within the limit (reading waits for it).
        self._backlog_seconds = 0.0
        self._caught_up = asyncio.Event()
        self._caught_up.set()
        self._context = SpokenContext()
        # Done once the text of every ended utterance's final is in the context.
        self._context_ready: asyncio.Future | None = None
        self._window = InterimWindow(options.default_streaming.interim_window_ms / 1000)
        self._received_seconds = 0.0
        self._stopping = False
        self._single_utterance_done = False
        self.chunks = 0

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[stt_pb2.StreamingRecognizeResponse]:
        """Yields responses; raises SttError after delivering every final it owes."""
        try:
            first = await self._first_message(requests)
            self._large_request = first is not None and first.ByteSize() >= LARGE_REQUEST_BYTES
            if first is None or not first.HasField("streaming_config"):
                got = "end of stream" if first is None else "audio_content"
                raise invalid_argument(
                    "STT_CONFIG_MISSING",
                    f"the first message must carry streaming_config; got {got}",
                    "streaming_config",
                )
            self.settings = recognition_settings(
                first.streaming_config.config,
                self.model,
                self.options.default_streaming,
                streaming=first.streaming_config,
                field_prefix="streaming_config.config",
            )
            self._decoder = AudioDecoder(
                self.settings.encoding, self.settings.sample_rate, self.settings.channels
            )
            self._recognizer = StreamingRecognizer(self.settings.streaming)
            self.telemetry.configured(
                {
                    "encoding": stt_pb2.AudioEncoding.Name(self.settings.encoding),
                    "sample_rate": self.settings.sample_rate,
                    "channels": self.settings.channels,
                    "language": self.settings.language or "auto",
                    "interim_results": self.settings.streaming.interim_results,
                    "single_utterance": self.settings.streaming.single_utterance,
                }
            )
            # The stream's tasks run with the RPC span current, so their logs carry its ids.
            self._reader = asyncio.create_task(self._read(requests), context=self.telemetry.context.copy())
            while True:
                item = await self._out.get()
                if item is _END:
                    return
                if isinstance(item, SttError):
                    raise item
                yield item
        finally:
            self._close()

    async def _first_message(self, requests: AsyncIterator[Any]) -> Any:
        """The stream's first message, within the config timeout (or until shutdown)."""
        timeout = self.options.config_timeout_seconds
        self._config_read = asyncio.ensure_future(anext(requests, None))
        try:
            return await asyncio.wait_for(self._config_read, timeout)
        except TimeoutError:
            raise out_of_range(
                "STT_CONFIG_TIMEOUT",
                f"no streaming_config within {timeout:g} s of opening the stream",
                "streaming_config",
            ) from None
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            raise SttError(
                grpc.StatusCode.UNAVAILABLE,
                "STT_SERVER_SHUTTING_DOWN",
                "the server is shutting down; retry on another instance",
            ) from None
        finally:
            self._config_read = None

    def stop(self) -> None:
        """Server shutdown: stop reading, finalise what was received, then end."""
        self._stopping = True
        if self._config_read is not None and not self._config_read.done():
            self._config_read.cancel()  # never configured: nothing to finalise
        if self._reader is not None and not self._reader.done() and self._reading:
            self._reader.cancel()  # past reading it only delivers finals: let it

    def abort(self, error: SttError) -> None:
        """Ends the stream now with ``error``: the shutdown deadline passed before its
        finals were decoded."""
        self._close()
        self._out.put_nowait(error)

    def _close(self) -> None:
        if self._large_request:
            release_soon()
        self._discard_speculation()
        tasks = [self._reader, self._interim, self._context_ready, *self._finals]
        for task in tasks:
            if task is not None and not task.done():
                task.cancel()
        # A cancelled task keeps its CancelledError, whose traceback holds the task's frame and
        # so this session: a reference cycle that only Python's full collections free, and they
        # are rare. Under sustained load, ended sessions piled up with their audio.
        self._reader = self._interim = self._context_ready = None
        self._finals = []

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        error: SttError | None = None
        logger.info(
            "stream started: %s %d Hz x%d, language %s, interim %s",
            stt_pb2.AudioEncoding.Name(self.settings.encoding),
            self.settings.sample_rate,
            self.settings.channels,
            self.settings.language or "auto",
            self.settings.streaming.interim_results,
        )
        idle = IdleClock(self.options.idle_timeout_seconds)
        self._reading = True
        try:
            while True:
                await self._caught_up.wait()  # backpressure: the stream's finals are behind
                waiting_since = time.monotonic()
                try:
                    async with asyncio.timeout(idle.remaining):
                        request = await anext(requests, None)
                except TimeoutError:
                    raise out_of_range(
                        "STT_AUDIO_TIMEOUT",
                        f"no audio for {idle.limit:g} s; send audio (silence included) in real time, "
                        "or half-close the stream when done (messages with less than "
                        f"{MIN_AUDIO_RATE:g} s of audio per second waited count as none)",
                        "audio_content",
                    ) from None
                if request is None:
                    break
                if request.HasField("streaming_config"):
                    raise invalid_argument(
                        "STT_CONFIG_DUPLICATE",
                        "streaming_config was sent again after the first message; "
                        "later messages must carry only audio_content",
                        "streaming_config",
                    )
                data = request.audio_content  # a copy of the bytes at each access (upb): take one
                idle.waited(time.monotonic() - waiting_since, self._decoder.seconds(len(data)))
                if not await self._accept(data):
                    break
        except SttError as exc:
            error = exc
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            error = SttError(
                grpc.StatusCode.UNAVAILABLE,
                "STT_SERVER_SHUTTING_DOWN",
                "the server is shutting down; audio received so far was transcribed",
            )
        except Exception:
            logger.exception("reading the stream failed")
            error = SttError(grpc.StatusCode.INTERNAL, "STT_INTERNAL", "internal server error")
        self._reading = False
        try:
            # Whatever was received before the end or the error is still transcribed.
            if not self._single_utterance_done:
                tail = self._recognizer.accept(self._decoder.flush())
                self._handle(tail + self._recognizer.finish())
            await self._deliver_finals()
        except SttError as exc:
            error = error or exc
        logger.info(
            "stream ended: %.1f s audio in %d chunks, %d utterances",
            self._received_seconds,
            self.chunks,
            self._recognizer.utterance_index,
        )
        self._out.put_nowait(error or _END)

    async def _accept(self, data: bytes) -> bool:
        """Feeds one chunk; returns False once the stream should stop reading."""
        started_ns = time.time_ns()
        limits = self.options
        self._large_request = self._large_request or len(data) >= LARGE_REQUEST_BYTES
        if len(data) > limits.max_chunk_bytes:
            raise out_of_range(
                "STT_CHUNK_TOO_LARGE",
                f"audio_content of {len(data)} bytes exceeds the limit of "
                f"{limits.max_chunk_bytes} bytes per message",
                "audio_content",
            )
        self.chunks += 1
        allowed = limits.max_stream_seconds - self._received_seconds
        seconds = self._decoder.seconds(len(data))
        too_long = seconds > allowed + 1e-9
        if too_long:
            data = data[: int(allowed * self._decoder.sample_rate) * self._decoder.frame_bytes]
            seconds = self._decoder.seconds(len(data))
        offset = self._received_seconds
        self._received_seconds += seconds
        keep_reading = await self._process(data)
        self.telemetry.chunk(
            self.chunks - 1, len(data), seconds, offset, started_ns, self._recognizer.in_speech
        )
        if not keep_reading:
            return False
        if too_long:
            raise out_of_range(
                "STT_STREAM_TOO_LONG",
                f"the stream exceeded the maximum duration of {limits.max_stream_seconds:g} s "
                "of audio; finals for the audio before the limit were delivered",
                "audio_content",
            )
        return True

    async def _process(self, data: bytes) -> bool:
        """Decodes, resamples and segments a chunk, at most ``STEP_SECONDS`` of its audio per
        step of the event loop; returns False when a single utterance is done."""
        for index, samples in enumerate(self._decoder.decode_in_slices(data, STEP_SECONDS)):
            if index:
                await asyncio.sleep(0)  # other streams and health checks run between steps
            if not self._handle(self._recognizer.accept(samples)):
                return False
        return True

    def _handle(self, events: list) -> bool:
        """Acts on recognizer events; returns False when a single utterance is done."""
        for event in events:
            if isinstance(event, SpeechStarted):
                self.telemetry.utterance_started(event.utterance_index, event.offset)
                self._event(stt_pb2.SpeechEvent.SPEECH_STARTED, event.offset, event.utterance_index)
            elif isinstance(event, InterimDue):
                self._start_interim(event)
            elif isinstance(event, EndpointLikely):
                self._speculate_final(event)
            elif isinstance(event, SpeechResumed):
                self._discard_speculation()
            elif isinstance(event, UtteranceEnded):
                self.telemetry.utterance_ended(
                    event.utterance_index, event.start, event.end, event.speech_end, event.reason
                )
                self._event(stt_pb2.SpeechEvent.SPEECH_ENDED, event.speech_end, event.utterance_index)
                self._start_final(event)
                if self.settings.streaming.single_utterance:
                    self._single_utterance_done = True
                    self._event(stt_pb2.SpeechEvent.END_OF_SINGLE_UTTERANCE, event.end, event.utterance_index)
                    return False
        return True

    def _event(self, kind: int, offset: float, index: int) -> None:
        self._put(
            stt_pb2.StreamingRecognizeResponse(
                speech_event=stt_pb2.SpeechEvent(type=kind, offset=duration(offset), utterance_index=index)
            )
        )

    def _put(self, response: stt_pb2.StreamingRecognizeResponse) -> None:
        response.total_billed_time.CopyFrom(duration(self._received_seconds))
        self._out.put_nowait(response)

    def _request(self, final: bool, plan: InterimPlan | None = None) -> DecodeRequest:
        return DecodeRequest(
            final=final,
            language=self.settings.language,
            prompt=self.settings.prompt,
            context=self._context.text,
            said_before=plan.said_before if plan else "",
            prefix=plan.prefix if plan else "",
            word_timestamps=(final and self.settings.word_time_offsets) or (plan is not None and plan.align),
            alternatives=self.settings.alternatives if final else 1,
        )

    def _start_interim(self, event: InterimDue) -> None:
        busy = self._interim is not None and not self._interim.done()
        if busy or self._speculation is not None or any(not task.done() for task in self._finals):
            return  # coalesced: the next interim covers this audio too
        if self._out.qsize() >= MAX_QUEUED_INTERIMS:
            return
        if self.scheduler.finals_waiting:
            return  # adapt to load: finals are queued, so interims step aside
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
        if event.utterance_index != self._recognizer.utterance_index:
            return  # the utterance ended meanwhile; its final supersedes this
        if not hypothesis.text or hypothesis.looped:
            return  # nothing, or a looping guess: the next interim or the final does better
        text, stability = window.update(hypothesis.text, hypothesis.words)
        self._put(
            stt_pb2.StreamingRecognizeResponse(
                result=stt_pb2.StreamingRecognitionResult(
                    alternatives=[
                        stt_pb2.SpeechRecognitionAlternative(
                            transcript=text, confidence=hypothesis.confidence
                        )
                    ],
                    is_final=False,
                    stability=stability,
                    stable_transcript=window.stable_text,
                    result_start_offset=duration(event.start),
                    result_end_offset=duration(event.end),
                    utterance_index=event.utterance_index,
                    language_code=hypothesis.language,
                )
            )
        )
        self.telemetry.interim_sent(event.utterance_index)

    def _decode_final(
        self, event: EndpointLikely | UtteranceEnded, window: InterimWindow, speculative: bool
    ) -> asyncio.Future:
        observer = self.telemetry.decode(
            "final", event.utterance_index, event.start, event.end, speculative=speculative
        )
        return asyncio.ensure_future(self._final_decode(event, window, observer, self._context_ready))

    async def _final_decode(
        self,
        event: EndpointLikely | UtteranceEnded,
        window: InterimWindow,
        observer: DecodeTelemetry,
        context_ready: asyncio.Future | None,
    ) -> tuple[Hypothesis, list[DecodeTelemetry]]:
        """The final's hypothesis, and the decodes that made it (for its latency breakdown)."""
        if context_ready is not None:
            await asyncio.shield(context_ready)  # the utterances before this one are in the context
        request = self._request(final=True)
        hypothesis = await self.scheduler.decode(event.audio, request, observer)
        decodes = [observer]
        cut = window.head_cut(hypothesis.text) if hypothesis.is_speech else None
        if cut is None:
            return hypothesis, decodes
        return await self._decode_in_two(event, request, cut, hypothesis, decodes), decodes

    async def _decode_in_two(
        self,
        event: EndpointLikely | UtteranceEnded,
        request: DecodeRequest,
        cut: float,
        whole: Hypothesis,
        decodes: list[DecodeTelemetry],
    ) -> Hypothesis:
        """The final of the whole utterance left out its first words, which the interims heard
        before ``cut`` seconds: decode the audio before and after a pause near it apart, the
        second part conditioned on the first as on an earlier utterance. Each decode's observer
        is added to ``decodes``."""
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
        decodes.append(self.telemetry.decode("final", index, start, start + cut))
        head = await self.scheduler.decode(event.audio[:split], request, decodes[-1])
        if not head.is_speech:
            return whole
        if len(event.audio) - split < TARGET_SAMPLE_RATE // 10:
            return head  # the pause is the utterance's end
        tail_request = dataclasses.replace(request, context=f"{request.context} {head.text}".strip())
        decodes.append(self.telemetry.decode("final", index, start + cut, event.end))
        tail = await self.scheduler.decode(event.audio[split:], tail_request, decodes[-1])
        return join_hypotheses(head, tail, cut)

    async def _remember(self, decode: asyncio.Future, before: asyncio.Future | None) -> None:
        """Adds an utterance's final to the context, after the finals before it."""
        if before is not None:
            await before
        try:
            hypothesis, _ = await asyncio.shield(decode)
            self._context.add(hypothesis)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._context.add(None)  # a failed decode: start afresh

    def _speculate_final(self, event: EndpointLikely) -> None:
        if self._interim is not None and not self._interim.done():
            self._interim.cancel()  # the speculative final covers all of its audio
        self._speculation = self._decode_final(event, self._window, speculative=True)

    def _discard_speculation(self) -> None:
        if self._speculation is not None:
            self._speculation.cancel()  # unrun: skipped; already running: its result is ignored
            self._speculation = None
            self.telemetry.speculation_resolved(used=False)

    def _take_speculation(self, event: UtteranceEnded) -> asyncio.Future | None:
        """The speculative decode, if the recognizer says it decoded this utterance's audio."""
        if self._speculation is None or not event.foreseen:
            self._discard_speculation()  # e.g. split at the length limit
            return None
        decode, self._speculation = self._speculation, None
        self.telemetry.speculation_resolved(used=True)
        return decode

    def _start_final(self, event: UtteranceEnded) -> None:
        if self._interim is not None and not self._interim.done():
            self._interim.cancel()
        window, self._window = self._window, InterimWindow(self.settings.streaming.interim_window_ms / 1000)
        # Delivered finals are dropped so an hours-long stream keeps a short list; a failed
        # one stays until _deliver_finals reports it.
        self._finals = [t for t in self._finals if not t.done() or (not t.cancelled() and t.exception())]
        previous = self._finals[-1] if self._finals else None
        decode = self._take_speculation(event) or self._decode_final(event, window, speculative=False)
        self._context_ready = asyncio.ensure_future(self._remember(decode, self._context_ready))
        self._finals.append(asyncio.create_task(self._run_final(event, decode, previous)))
        self._add_backlog(event.end - event.start)

    def _add_backlog(self, seconds: float) -> None:
        self._backlog_seconds += seconds
        if self._backlog_seconds > self.options.max_backlog_seconds:
            self._caught_up.clear()
        else:
            self._caught_up.set()

    async def _run_final(
        self, event: UtteranceEnded, decode: asyncio.Future, previous: asyncio.Task | None
    ) -> None:
        try:
            hypothesis, decodes = await decode
        finally:
            self._add_backlog(-(event.end - event.start))
            if previous is not None:
                await asyncio.wait([previous])  # results leave in utterance order
        if hypothesis.is_speech:
            self._put(
                stt_pb2.StreamingRecognizeResponse(result=final_result(hypothesis, event, self.settings))
            )
            self.telemetry.final_sent(event.utterance_index, event.speech_end, decodes)
        else:
            self.telemetry.utterance_done(event.utterance_index)

    async def _deliver_finals(self) -> None:
        if self._finals:
            await asyncio.wait(self._finals)
        for task in self._finals:
            if not task.cancelled() and task.exception() is not None:
                logger.error("final decode failed", exc_info=task.exception())
                raise SttError(
                    grpc.StatusCode.INTERNAL,
                    "STT_DECODE_FAILED",
                    "decoding an utterance failed on the server",
                )
