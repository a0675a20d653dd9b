"""The stt.v1.Speech gRPC service (asyncio): admission, then a session per stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from otel import CallTelemetry, Telemetry

from . import __version__
from .api import SERVICE_NAME, stt_pb2, stt_pb2_grpc
from .audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SUPPORTED_ENCODINGS
from .errors import SttError, invalid_argument, out_of_range, retryable
from .memory import LARGE_REQUEST_BYTES, release_soon
from .model import SpeechModel
from .options import ServerOptions
from .scheduler import InferenceScheduler
from .security import Guard
from .session import StreamSession, duration, recognize
from .settings import recognition_settings

logger = logging.getLogger(__name__)

STREAMING_METHOD = f"{SERVICE_NAME}/StreamingRecognize"
RECOGNIZE_METHOD = f"{SERVICE_NAME}/Recognize"
INFO_METHOD = f"{SERVICE_NAME}/GetServerInfo"


async def abort_with(context: grpc.aio.ServicerContext, call: CallTelemetry, error: SttError) -> None:
    """Logs the error once (in the call's trace), records it, ends the call with its status."""
    call.context.copy().run(
        logger.warning,
        "%s failed: %s (%s, %s)",
        call.method,
        error.message,
        error.code.name,
        error.reason,
        extra={"stt.error.reason": error.reason, "rpc.response.status_code": error.code.name},
    )
    call.finished(error.code.name, error.reason, error.message)
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


class SpeechService(stt_pb2_grpc.SpeechServicer):
    """Admits streams within the limits and hands each one to a StreamSession."""

    def __init__(self, options: ServerOptions, telemetry: Telemetry) -> None:
        self.options = options
        self.telemetry = telemetry
        self.model: SpeechModel | None = None
        self.scheduler: InferenceScheduler | None = None
        self.sessions: set[StreamSession] = set()
        self.recognizing = 0  # unary Recognize calls in progress
        self.draining = False
        self.guard = Guard()  # the server sets the configured one

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and not self.draining

    def attach(self, model: SpeechModel, scheduler: InferenceScheduler) -> None:
        self.model = model
        self.scheduler = scheduler

    def _admit(self) -> None:
        """Refuses work the server cannot take now, saying when to retry (errors.RETRY_DELAYS)."""
        if self.draining:
            raise retryable(
                grpc.StatusCode.UNAVAILABLE,
                "STT_SERVER_DRAINING",
                "the server is draining for shutdown; retry on another instance",
            )
        if self.scheduler is None:
            raise retryable(
                grpc.StatusCode.UNAVAILABLE,
                "STT_MODEL_LOADING",
                "the model is still loading; retry when health reports SERVING",
            )
        # One limit for streams and unary calls: each holds audio and inference work.
        if len(self.sessions) + self.recognizing >= self.options.max_concurrent_streams:
            raise retryable(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "STT_TOO_MANY_STREAMS",
                f"the server is at its limit of {self.options.max_concurrent_streams} "
                "concurrent streams and Recognize calls; retry later or on another instance",
            )

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[stt_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[stt_pb2.StreamingRecognizeResponse]:
        call = self.telemetry.stream(STREAMING_METHOD, context.invocation_metadata(), context.peer())
        if call.trace_id:
            # The client (and the CLI) can paste this into Jaeger.
            await context.send_initial_metadata(
                (("x-trace-id", call.trace_id), ("traceparent", call.traceparent))
            )
        try:
            self.guard.check(context, call, stream=True)
            self._admit()
        except SttError as error:
            await abort_with(context, call, error)
        session = StreamSession(self.model, self.scheduler, self.options, call)
        self.sessions.add(session)
        try:
            async for response in session.run(request_iterator):
                yield response
            call.finished("OK")
        except SttError as error:
            await abort_with(context, call, error)
        except asyncio.CancelledError:
            call.finished("CANCELLED", "STT_CLIENT_CANCELLED", "the client cancelled or disconnected")
            raise
        except Exception as exc:
            if not isinstance(exc, grpc.aio.AbortError):
                call.context.copy().run(logger.exception, "stream failed")
                call.finished("INTERNAL", "STT_INTERNAL", type(exc).__name__)
            raise
        finally:
            self.sessions.discard(session)

    async def Recognize(
        self, request: stt_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> stt_pb2.RecognizeResponse:
        call = self.telemetry.call(RECOGNIZE_METHOD, context.invocation_metadata(), context.peer())
        # No initial metadata before admission: a client's gRPC retry policy retries a refusal
        # only while the call has received no headers.
        try:
            self.guard.check(context, call)
            self._admit()
        except SttError as error:
            await abort_with(context, call, error)
        self.recognizing += 1
        try:
            if len(request.audio_content) > self.options.max_recognize_bytes:
                raise out_of_range(
                    "STT_AUDIO_TOO_LARGE",
                    f"audio_content of {len(request.audio_content)} bytes exceeds the limit of "
                    f"{self.options.max_recognize_bytes} bytes for Recognize",
                    "audio_content",
                )
            if not request.HasField("config"):
                raise invalid_argument("STT_CONFIG_MISSING", "config is required", "config")
            settings = recognition_settings(request.config, self.model, self.options.default_streaming)
            response = await recognize(
                request.audio_content,
                settings,
                self.model,
                self.scheduler,
                call,
                self.options.max_recognize_seconds,
            )
            call.finished("OK")
            return response
        except SttError as error:
            await abort_with(context, call, error)
        finally:
            self.recognizing -= 1
            if len(request.audio_content) >= LARGE_REQUEST_BYTES:
                release_soon()

    async def GetServerInfo(
        self, request: stt_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> stt_pb2.ServerInfo:
        call = self.telemetry.call(INFO_METHOD, context.invocation_metadata(), context.peer())
        try:
            self.guard.check(context, call)
        except SttError as error:
            await abort_with(context, call, error)
        info = stt_pb2.ServerInfo(
            version=__version__,
            encodings=list(SUPPORTED_ENCODINGS),
            active_streams=len(self.sessions),
            ready=self.ready,
            limits=stt_pb2.ServerLimits(
                max_concurrent_streams=self.options.max_concurrent_streams,
                max_stream_duration=duration(self.options.max_stream_seconds),
                max_chunk_bytes=self.options.max_chunk_bytes,
                max_recognize_bytes=self.options.max_recognize_bytes,
                min_sample_rate_hertz=MIN_SAMPLE_RATE,
                max_sample_rate_hertz=MAX_SAMPLE_RATE,
            ),
        )
        if self.model is not None:
            info.model = self.model.name
            info.device = self.model.device
            info.compute_type = self.model.options.compute_type
            info.languages.extend(self.model.languages)
        call.finished("OK")
        return info
