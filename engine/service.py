"""The stt.v1.Speech gRPC service (asyncio): admission, then a session per stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

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
from .session import StreamSession, duration
from .settings import recognition_settings
from .unary import recognize

logger = logging.getLogger(__name__)

STREAMING_METHOD = f"{SERVICE_NAME}/StreamingRecognize"
RECOGNIZE_METHOD = f"{SERVICE_NAME}/Recognize"
INFO_METHOD = f"{SERVICE_NAME}/GetServerInfo"


@dataclass(frozen=True)
class MalformedRequest:
    """What a Speech method receives instead of a request whose bytes do not parse (bad UTF-8
    in a string field, random bytes): the client's mistake, refused with INVALID_ARGUMENT,
    where gRPC would end the call UNKNOWN (or mid-stream, the session INTERNAL) with a
    traceback at ERROR, which the availability SLO counts as the server's failure."""

    message_type: str
    size: int  # bytes

    def error(self, index: int | None = None) -> SttError:
        which = "the request" if index is None else f"message {index} of the stream"
        return invalid_argument(
            "STT_MESSAGE_MALFORMED",
            f"{which} ({self.size} bytes) is not a valid {self.message_type}: not protobuf wire "
            "format, or a string field that is not UTF-8",
        )


def tolerant(deserializer: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return MalformedRequest(message_type, len(data))

    return parse


class _HandlerRecorder:
    """Stands in for the server while the generated code registers the Speech handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = handlers


def add_speech_service(service: SpeechService, server: grpc.aio.Server) -> None:
    """Registers the Speech methods as the generated ``add_SpeechServicer_to_server`` does, with
    request parsers that hand a method a ``MalformedRequest`` instead of failing the call."""
    recorder = _HandlerRecorder()
    stt_pb2_grpc.add_SpeechServicer_to_server(service, recorder)
    inputs = {
        method.name: method.input_type.full_name
        for method in stt_pb2.DESCRIPTOR.services_by_name["Speech"].methods
    }
    handlers = {
        name: handler._replace(request_deserializer=tolerant(handler.request_deserializer, inputs[name]))
        for name, handler in recorder.handlers.items()
    }
    # The unary methods are read as client streams of their one message (the same on the wire),
    # so that a call is authenticated and admitted before its message (up to 16 MiB, unknown
    # fields included) is received and parsed: refused calls cost the server none of it (400
    # refused 16 MB Recognize calls from 16 threads took it from 250 MB to 1.8-3 GB), and a
    # refusal's abort holds no request in its reference cycle.
    for name in ("Recognize", "GetServerInfo"):
        unary = handlers[name]
        handlers[name] = grpc.stream_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=unary.request_deserializer,
            response_serializer=unary.response_serializer,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class _CheckedRequests:
    """A stream's requests, ending the stream with STT_MESSAGE_MALFORMED at the first that did
    not parse (a plain iterator, not a generator: the session cancels reads on timeouts)."""

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self._requests = requests
        self._index = 0

    def __aiter__(self) -> _CheckedRequests:
        return self

    async def __anext__(self) -> Any:
        request = await anext(self._requests)
        if isinstance(request, MalformedRequest):
            if request.size >= LARGE_REQUEST_BYTES:
                release_soon()
            raise request.error(self._index)
        self._index += 1
        return request


@asynccontextmanager
async def _single_request(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The one message of a unary method registered as client-streaming (``add_speech_service``);
    SttError when the call ended without it or it did not parse. A large one (unknown fields
    included) is handed back to the allocator when the block ends: grpc.aio's request iterator
    holds its last message in a reference cycle (memory.py)."""
    request = await anext(requests, None)
    try:
        if request is None:
            raise invalid_argument("STT_MESSAGE_MALFORMED", "the call ended without its request")
        if isinstance(request, MalformedRequest):
            raise request.error()
        yield request
    finally:
        if isinstance(request, MalformedRequest):
            size = request.size
        else:
            size = request.ByteSize() if request is not None else 0
        if size >= LARGE_REQUEST_BYTES:
            release_soon()


async def abort_with(context: grpc.aio.ServicerContext, call: CallTelemetry, error: SttError) -> None:
    """Logs the error once (in the call's trace), records it, ends the call with its status.
    By ``context.abort``, for unary calls too: gRPC then answers with trailers only, which a
    client's retry policy may retry (after ``set_code`` the call counts as answered)."""
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
        if self.active_calls >= self.options.max_concurrent_streams:
            raise retryable(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "STT_TOO_MANY_STREAMS",
                f"the server is at its limit of {self.options.max_concurrent_streams} "
                "concurrent streams and Recognize calls; retry later or on another instance",
            )

    @property
    def active_calls(self) -> int:
        """Streams and Recognize calls holding a slot of ``max_concurrent_streams``."""
        return len(self.sessions) + self.recognizing

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[stt_pb2.StreamingRecognizeRequest | MalformedRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[stt_pb2.StreamingRecognizeResponse]:
        async for response in self.serve_stream(STREAMING_METHOD, request_iterator, context):
            yield response

    async def serve_stream(
        self,
        method: str,
        request_iterator: AsyncIterator[stt_pb2.StreamingRecognizeRequest | MalformedRequest],
        context: grpc.aio.ServicerContext,
        observe: Callable[[CallTelemetry], None] | None = None,
    ) -> AsyncIterator[stt_pb2.StreamingRecognizeResponse]:
        """One stream of ``method`` (this API's, or another API translated to it): admission,
        a session, telemetry and the final status. ``observe`` is given the call's telemetry."""
        call = self.telemetry.stream(method, context.invocation_metadata(), context.peer())
        if observe is not None:
            observe(call)
        if call.trace_id:
            # The client (and the CLI) can paste this into Jaeger.
            await context.send_initial_metadata(
                (("x-trace-id", call.trace_id), ("traceparent", call.traceparent))
            )
        try:
            self.guard.check(context, call, holds_slot=True)
            self._admit()
        except SttError as error:
            await abort_with(context, call, error)
        session = StreamSession(self.model, self.scheduler, self.options, call)
        self.sessions.add(session)
        try:
            async for response in session.run(_CheckedRequests(request_iterator)):
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
        self,
        requests: AsyncIterator[stt_pb2.RecognizeRequest | MalformedRequest],
        context: grpc.aio.ServicerContext,
    ) -> stt_pb2.RecognizeResponse:
        """A unary call, registered as client-streaming (``add_speech_service``): its one message
        is read only once the call is authenticated and admitted."""
        return await self.serve_recognize(RECOGNIZE_METHOD, requests, context)

    async def serve_recognize(
        self,
        method: str,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        translate: Callable[[Any, CallTelemetry], Awaitable[stt_pb2.RecognizeRequest]] | None = None,
    ) -> stt_pb2.RecognizeResponse:
        """One Recognize call of ``method``; ``translate`` turns another API's request into
        this API's (raising SttError for what it cannot honour)."""
        call = self.telemetry.call(method, context.invocation_metadata(), context.peer())
        try:
            return await self._recognize(requests, context, call, translate)
        except SttError as error:
            await abort_with(context, call, error)
        except asyncio.CancelledError:
            call.finished("CANCELLED", "STT_CLIENT_CANCELLED", "the client cancelled or disconnected")
            raise

    async def _recognize(
        self,
        requests: AsyncIterator[stt_pb2.RecognizeRequest | MalformedRequest],
        context: grpc.aio.ServicerContext,
        call: CallTelemetry,
        translate: Callable[[Any, CallTelemetry], Awaitable[stt_pb2.RecognizeRequest]] | None = None,
    ) -> stt_pb2.RecognizeResponse:
        """The response, or SttError. No initial metadata before admission: a client's gRPC
        retry policy retries a refusal only while the call has received no headers."""
        # A Recognize call holds a slot as a stream does, and so one of its identity's.
        self.guard.check(context, call, holds_slot=True)
        self._admit()
        self.recognizing += 1
        try:
            async with _single_request(requests) as received:
                request = await translate(received, call) if translate else received
                audio = request.audio_content  # a copy of the bytes at each access (upb): take one
                if len(audio) > self.options.max_recognize_bytes:
                    raise out_of_range(
                        "STT_AUDIO_TOO_LARGE",
                        f"audio_content of {len(audio)} bytes exceeds the limit of "
                        f"{self.options.max_recognize_bytes} bytes for Recognize",
                        "audio_content",
                    )
                if not request.HasField("config"):
                    raise invalid_argument("STT_CONFIG_MISSING", "config is required", "config")
                settings = recognition_settings(request.config, self.model, self.options.default_streaming)
                response = await recognize(
                    audio,
                    settings,
                    self.model,
                    self.scheduler,
                    call,
                    self.options.max_recognize_seconds,
                )
                call.finished("OK")
                return response
        finally:
            self.recognizing -= 1

    async def read_info_request(
        self, method: str, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> tuple[Any, SpeechModel | None]:
        """The message of an informational call of ``method`` (GetServerInfo, Riva's
        GetRivaSpeechRecognitionConfig), read once the caller is authenticated, and the loaded
        model (None while loading); the call counts as answered."""
        call = self.telemetry.call(method, context.invocation_metadata(), context.peer())
        try:
            self.guard.check(context, call)
            async with _single_request(requests) as request:
                pass
        except SttError as error:
            await abort_with(context, call, error)
        call.finished("OK")
        return request, self.model

    async def refuse_call(self, method: str, context: grpc.aio.ServicerContext, error: SttError) -> None:
        """Ends a call of a method the engine does not serve with ``error``, once the caller is
        authenticated (an unauthenticated caller learns nothing about the server)."""
        call = self.telemetry.call(method, context.invocation_metadata(), context.peer())
        try:
            self.guard.check(context, call)
        except SttError as refused:
            error = refused
        await abort_with(context, call, error)

    async def GetServerInfo(
        self,
        requests: AsyncIterator[stt_pb2.GetServerInfoRequest | MalformedRequest],
        context: grpc.aio.ServicerContext,
    ) -> stt_pb2.ServerInfo:
        """A unary call, registered as client-streaming (``add_speech_service``): its message is
        read only once the call is authenticated."""
        # The message is read only to be checked: its unknown fields may be megabytes too.
        await self.read_info_request(INFO_METHOD, requests, context)
        info = stt_pb2.ServerInfo(
            version=__version__,
            encodings=list(SUPPORTED_ENCODINGS),
            # Recognize calls too: they hold the same slots, and a client comparing this with
            # limits.max_concurrent_streams must see the room that is really left.
            active_streams=self.active_calls,
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
