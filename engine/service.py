"""The stt.v1.Speech gRPC service (asyncio): admission, then a session per stream."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from . import __version__
from .api import stt_pb2, stt_pb2_grpc
from .audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SUPPORTED_ENCODINGS
from .errors import SttError, invalid_argument, out_of_range
from .model import SpeechModel
from .options import ServerOptions
from .scheduler import InferenceScheduler
from .session import StreamSession, duration, recognize
from .settings import recognition_settings

logger = logging.getLogger(__name__)

SERVICE_NAME = stt_pb2.DESCRIPTOR.services_by_name["Speech"].full_name


async def abort_with(context: grpc.aio.ServicerContext, error: SttError) -> None:
    """Ends the call with the error's status and google.rpc details."""
    logger.warning("stream failed: %s (%s, %s)", error.message, error.code.name, error.reason)
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


class SpeechService(stt_pb2_grpc.SpeechServicer):
    """Admits streams within the limits and hands each one to a StreamSession."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.model: SpeechModel | None = None
        self.scheduler: InferenceScheduler | None = None
        self.sessions: set[StreamSession] = set()
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and not self.draining

    def attach(self, model: SpeechModel, scheduler: InferenceScheduler) -> None:
        self.model = model
        self.scheduler = scheduler

    def _admit(self) -> None:
        if self.draining:
            raise SttError(
                grpc.StatusCode.UNAVAILABLE,
                "STT_SERVER_DRAINING",
                "the server is draining for shutdown; retry on another instance",
            )
        if self.scheduler is None:
            raise SttError(
                grpc.StatusCode.UNAVAILABLE,
                "STT_MODEL_LOADING",
                "the model is still loading; retry when health reports SERVING",
            )

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[stt_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[stt_pb2.StreamingRecognizeResponse]:
        try:
            self._admit()
            if len(self.sessions) >= self.options.max_concurrent_streams:
                raise SttError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "STT_TOO_MANY_STREAMS",
                    f"the server is at its limit of {self.options.max_concurrent_streams} "
                    "concurrent streams; retry later or on another instance",
                )
        except SttError as error:
            await abort_with(context, error)
        session = StreamSession(self.model, self.scheduler, self.options)
        self.sessions.add(session)
        try:
            async for response in session.run(request_iterator):
                yield response
        except SttError as error:
            await abort_with(context, error)
        finally:
            self.sessions.discard(session)

    async def Recognize(
        self, request: stt_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> stt_pb2.RecognizeResponse:
        try:
            self._admit()
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
            return await recognize(request.audio_content, settings, self.model, self.scheduler)
        except SttError as error:
            await abort_with(context, error)

    async def GetServerInfo(
        self, request: stt_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> stt_pb2.ServerInfo:
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
        return info
