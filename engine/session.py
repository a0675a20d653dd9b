"""One StreamingRecognize stream: config, audio in, interim and final results out.

The session reads requests on its own task, so audio keeps flowing into the VAD while
decodes run on the inference threads; it admits audio within the stream's limits, stops
reading while the stream's finals are too far behind (backpressure), and turns what the
finalisation policy (``finalization.Finalizer``: endpoints, speculation, sentence finals,
context, repairs) produces into responses, delivered in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2

from .api import stt_pb2
from .audio import AudioDecoder, full_scale
from .errors import SttError, invalid_argument, out_of_range
from .finalization import Finalizer, FinalResult, InterimResult
from .memory import LARGE_REQUEST_BYTES, release_soon
from .model import SpeechModel
from .options import ServerOptions
from .recognizer import StreamingRecognizer
from .scheduler import InferenceScheduler
from .settings import RecognitionSettings, recognition_settings

if TYPE_CHECKING:
    from otel import StreamTelemetry

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


SPEECH_EVENTS = {
    "started": stt_pb2.SpeechEvent.SPEECH_STARTED,
    "ended": stt_pb2.SpeechEvent.SPEECH_ENDED,
    "end_of_single_utterance": stt_pb2.SpeechEvent.END_OF_SINGLE_UTTERANCE,
}


def final_result(final: FinalResult, settings: RecognitionSettings) -> stt_pb2.StreamingRecognitionResult:
    """The final result of an utterance, with word offsets from the stream start."""
    hypothesis = final.hypothesis
    best = stt_pb2.SpeechRecognitionAlternative(transcript=hypothesis.text, confidence=hypothesis.confidence)
    # Words may be aligned for the policy's own use; they are sent only when asked for.
    for word in hypothesis.words if settings.word_time_offsets else ():
        best.words.add(
            word=word.word,
            start_offset=duration(final.start + word.start),
            end_offset=duration(final.start + word.end),
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
        result_start_offset=duration(final.start),
        result_end_offset=duration(final.end),
        utterance_index=final.utterance_index,
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
        self._finalizer: Finalizer | None = None
        self._config_read: asyncio.Future | None = None
        self._large_request = False  # a message of megabytes: return the heap it used
        self._reading = False
        # Audio of ended utterances whose finals are not decoded yet, and whether it is
        # within the limit (reading waits for it).
        self._backlog_seconds = 0.0
        self._caught_up = asyncio.Event()
        self._caught_up.set()
        self._received_seconds = 0.0
        self._stopping = False
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
            self._recognizer = StreamingRecognizer(
                self.settings.streaming, full_scale(self.settings.encoding)
            )
            self._finalizer = Finalizer(
                self._recognizer,
                self.scheduler,
                self.settings,
                self.telemetry,
                self,
            )
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
        if self._finalizer is not None:
            self._finalizer.close()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        # A cancelled task keeps its CancelledError, whose traceback holds the task's frame and
        # so this session: a reference cycle that only Python's full collections free, and they
        # are rare. Under sustained load, ended sessions piled up with their audio.
        self._reader = None

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
            self._finalizer.finish(self._decoder.flush())
            await self._finalizer.wait_finals()
        except SttError as exc:
            error = error or exc
        audio = self._recognizer.meter.stream_summary()
        if audio is not None:
            self.telemetry.stream_audio(audio)
        logger.info(
            "stream ended: %.1f s audio in %d chunks, %d utterances",
            self._received_seconds,
            self.chunks,
            self._finalizer.utterances,
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
            self.chunks - 1, len(data), seconds, offset, started_ns, self._finalizer.in_speech
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
            self._finalizer.accept(samples)
            if self._finalizer.done:
                return False
        return True

    # Delivery: what the finalisation policy produces, as responses.

    def speech_event(self, kind: str, offset: float, utterance_index: int) -> None:
        self._put(
            stt_pb2.StreamingRecognizeResponse(
                speech_event=stt_pb2.SpeechEvent(
                    type=SPEECH_EVENTS[kind], offset=duration(offset), utterance_index=utterance_index
                )
            )
        )

    def interim(self, result: InterimResult) -> None:
        self._put(
            stt_pb2.StreamingRecognizeResponse(
                result=stt_pb2.StreamingRecognitionResult(
                    alternatives=[
                        stt_pb2.SpeechRecognitionAlternative(
                            transcript=result.transcript, confidence=result.confidence
                        )
                    ],
                    is_final=False,
                    stability=result.stability,
                    stable_transcript=result.stable_text,
                    result_start_offset=duration(result.start),
                    result_end_offset=duration(result.end),
                    utterance_index=result.utterance_index,
                    language_code=result.language,
                )
            )
        )

    def final(self, result: FinalResult) -> None:
        self._put(stt_pb2.StreamingRecognizeResponse(result=final_result(result, self.settings)))

    def pending_finals(self, seconds: float) -> None:
        self._backlog_seconds += seconds
        if self._backlog_seconds > self.options.max_backlog_seconds:
            self._caught_up.clear()
        else:
            self._caught_up.set()

    def can_take_interim(self) -> bool:
        return self._out.qsize() < MAX_QUEUED_INTERIMS

    def _put(self, response: stt_pb2.StreamingRecognizeResponse) -> None:
        response.total_billed_time.CopyFrom(duration(self._received_seconds))
        self._out.put_nowait(response)
