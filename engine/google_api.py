"""google.cloud.speech.v1.Speech on the engine: a translation layer over the stt.v1 service.

A Google client's requests become stt.v1 requests (config in), the one recognition core
(``SpeechService.serve_stream`` / ``serve_recognize``: admission, security, session, telemetry)
serves them, and its responses become Google's (results and events out). The messages are the
ones the official client itself sends: the protobuf classes behind ``google-cloud-speech``'s
proto-plus types, so the wire format is the client's by construction.

A field the engine cannot honour is refused with INVALID_ARGUMENT naming it; the fields Google
itself treats as hints (``metadata``, ``model``, ``use_enhanced``) are accepted and recorded on
the call's span.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from google.cloud.speech_v1 import types as google
from google.longrunning import operations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool

from .api import stt_pb2
from .audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from .compat import OutputText, TranslatedStream, decode_all, duration_seconds, phrase_prompt, refuse
from .errors import SttError, invalid_argument

if TYPE_CHECKING:
    from otel import CallTelemetry

    from .service import SpeechService

GOOGLE_SERVICE_NAME = "google.cloud.speech.v1.Speech"
GOOGLE_STREAMING_METHOD = f"{GOOGLE_SERVICE_NAME}/StreamingRecognize"
GOOGLE_RECOGNIZE_METHOD = f"{GOOGLE_SERVICE_NAME}/Recognize"
GOOGLE_LONG_RUNNING_METHOD = f"{GOOGLE_SERVICE_NAME}/LongRunningRecognize"

StreamingRequest = google.StreamingRecognizeRequest.pb()
StreamingResponse = google.StreamingRecognizeResponse.pb()
RecognizeRequest = google.RecognizeRequest.pb()
RecognizeResponse = google.RecognizeResponse.pb()
LongRunningRequest = google.LongRunningRecognizeRequest.pb()
GoogleConfig = google.RecognitionConfig.pb()
GoogleEncoding = google.RecognitionConfig.AudioEncoding
SpeechEventType = google.StreamingRecognizeResponse.SpeechEventType

ENCODINGS = {GoogleEncoding.LINEAR16: stt_pb2.LINEAR16, GoogleEncoding.MULAW: stt_pb2.MULAW}
# Compressed encodings, decoded as they stream in (``compressed``). SPEEX_WITH_HEADER_BYTE is not:
# a block may hold several Speex frames, and FFmpeg's decoder, without Ogg's header, takes one.
COMPRESSED = {
    GoogleEncoding.FLAC: "FLAC",
    GoogleEncoding.OGG_OPUS: "OGG_OPUS",
    GoogleEncoding.WEBM_OPUS: "WEBM_OPUS",
    GoogleEncoding.MP3: "MP3",
    GoogleEncoding.AMR: "AMR",
    GoogleEncoding.AMR_WB: "AMR_WB",
}
SPEECH_EVENTS = {
    stt_pb2.SpeechEvent.SPEECH_STARTED: SpeechEventType.SPEECH_ACTIVITY_BEGIN,
    stt_pb2.SpeechEvent.SPEECH_ENDED: SpeechEventType.SPEECH_ACTIVITY_END,
    stt_pb2.SpeechEvent.END_OF_SINGLE_UTTERANCE: SpeechEventType.END_OF_SINGLE_UTTERANCE,
}


class GoogleSettings:
    """What a Google config asks of the output: punctuation, masking, word confidence, events."""

    def __init__(self, config: Any, streaming: Any | None = None) -> None:
        self.text = OutputText(config.enable_automatic_punctuation, config.profanity_filter)
        self.word_confidence = config.enable_word_confidence
        self.word_offsets = config.enable_word_time_offsets or config.enable_word_confidence
        self.language = (config.language_code or "en-US").lower()
        self.voice_events = streaming is not None and streaming.enable_voice_activity_events

    def alternative(self, alternative: stt_pb2.SpeechRecognitionAlternative, final: bool) -> Any:
        out = google.SpeechRecognitionAlternative.pb()(
            transcript=self.text(alternative.transcript),
            # Google scores only final results; interims carry 0.
            confidence=alternative.confidence if final else 0.0,
        )
        for word in alternative.words if self.word_offsets else ():
            text = self.text(word.word.strip())
            if not text:
                continue  # a lone punctuation mark stripped away
            info = out.words.add(word=text)
            info.start_time.CopyFrom(word.start_offset)
            info.end_time.CopyFrom(word.end_offset)
            if self.word_confidence:
                info.confidence = word.confidence
        return out

    def recognition_result(self, result: stt_pb2.StreamingRecognitionResult) -> Any:
        out = google.SpeechRecognitionResult.pb()(
            alternatives=[self.alternative(a, True) for a in result.alternatives],
            language_code=self.language,
        )
        out.result_end_time.CopyFrom(result.result_end_offset)
        return out

    def streaming_result(self, result: stt_pb2.StreamingRecognitionResult) -> Any:
        out = google.StreamingRecognitionResult.pb()(
            alternatives=[self.alternative(a, result.is_final) for a in result.alternatives],
            is_final=result.is_final,
            stability=0.0 if result.is_final else result.stability,
            language_code=self.language,
        )
        out.result_end_time.CopyFrom(result.result_end_offset)
        return out


def compressed_encoding(config: Any) -> str | None:
    """The name of the config's compressed encoding (decoded by ``compat.AudioIn``), or None."""
    return COMPRESSED.get(config.encoding)


def translate_config(config: Any, field: str, call: CallTelemetry) -> stt_pb2.RecognitionConfig:
    """A Google RecognitionConfig as the engine's, or SttError naming what it cannot honour.
    Compressed audio reaches the core decoded, as 16 kHz mono LINEAR16."""
    f = field + "."
    encoding = ENCODINGS.get(config.encoding)
    compressed = compressed_encoding(config)
    if encoding is None and compressed is None:
        known = config.encoding in set(GoogleEncoding)
        name = GoogleEncoding(config.encoding).name if known else config.encoding
        raise invalid_argument(
            "STT_ENCODING_UNSUPPORTED",
            f"{f}encoding={name} is not supported by this server; use LINEAR16, MULAW, FLAC, "
            "OGG_OPUS, WEBM_OPUS, MP3, AMR or AMR_WB",
            f + "encoding",
        )
    if config.enable_separate_recognition_per_channel and config.audio_channel_count > 1:
        raise refuse(
            f + "enable_separate_recognition_per_channel",
            "channels are mixed to mono and recognised together; send each channel as its own stream",
        )
    if config.alternative_language_codes:
        raise refuse(f + "alternative_language_codes", "the engine does not choose between languages")
    if config.HasField("adaptation"):
        raise refuse(f + "adaptation", "adaptation resources are not supported; use speech_contexts")
    if config.HasField("transcript_normalization"):
        raise refuse(f + "transcript_normalization", "transcript normalization is not supported")
    if config.diarization_config.enable_speaker_diarization:
        raise refuse(f + "diarization_config", "speaker diarization is not supported")
    for name in ("enable_spoken_punctuation", "enable_spoken_emojis"):
        if config.HasField(name) and getattr(config, name).value:
            raise refuse(f + name, "spoken punctuation and emojis are not supported")
    prompt = phrase_prompt(config.speech_contexts, f + "speech_contexts")
    # Hints Google itself may ignore: recorded, not refused. Its model names are not ours.
    call.configured(
        {
            "google.model": config.model[:64] or "default",
            "google.use_enhanced": config.use_enhanced,
        }
    )
    if compressed:
        # The rate and channels are the decoder's to find; a rate given must still be a rate.
        if config.sample_rate_hertz and not MIN_SAMPLE_RATE <= config.sample_rate_hertz <= MAX_SAMPLE_RATE:
            raise invalid_argument(
                "STT_CONFIG_OUT_OF_RANGE",
                f"{f}sample_rate_hertz={config.sample_rate_hertz} is out of range: must be "
                f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz",
                f + "sample_rate_hertz",
            )
        encoding, rate, channels = stt_pb2.LINEAR16, 16000, 1
    else:
        rate, channels = config.sample_rate_hertz, config.audio_channel_count
    return stt_pb2.RecognitionConfig(
        encoding=encoding,
        sample_rate_hertz=rate,
        audio_channel_count=channels,
        language_code=config.language_code,
        prompt=prompt,
        enable_word_time_offsets=config.enable_word_time_offsets or config.enable_word_confidence,
        max_alternatives=config.max_alternatives,
    )


class VoiceActivityTimeout:
    """Google's ``voice_activity_timeout``, counted in audio time: the stream closes when no
    speech has begun ``start`` seconds into its audio, or when none follows ``end`` seconds after
    the last speech ended. Audio time, not wall time, so a client that sends ahead, or falls
    behind, gets the same answer as a real-time one."""

    def __init__(self, start: float, end: float, bytes_per_second: float) -> None:
        self.start = start  # 0: no limit
        self.end = end
        self.bytes_per_second = bytes_per_second
        self.heard = 0.0  # seconds of audio received
        self.in_speech = False
        self.ended_at: float | None = None  # offset of the last speech end

    def audio(self, num_bytes: int) -> None:
        self.heard += num_bytes / self.bytes_per_second

    def speech(self, started: bool, offset: float) -> None:
        self.in_speech = started
        if not started:
            self.ended_at = offset

    @property
    def expired(self) -> bool:
        if self.in_speech:
            return False
        if self.ended_at is None:
            return self.start > 0 and self.heard >= self.start
        return self.end > 0 and self.heard >= self.ended_at + self.end


def _timeout_seconds(duration: Any, field: str) -> float:
    value = duration_seconds(duration)
    if value < 0:
        raise invalid_argument("STT_CONFIG_OUT_OF_RANGE", f"{field} must not be negative", field)
    return value


class GoogleStream(TranslatedStream):
    """One Google stream: its requests as stt.v1 requests, the core's responses as Google's."""

    request_type = StreamingRequest

    def __init__(self, requests: AsyncIterator[Any], max_message_bytes: int) -> None:
        super().__init__(requests, max_message_bytes)
        self._call: CallTelemetry | None = None
        self.settings: GoogleSettings | None = None
        self.timeout: VoiceActivityTimeout | None = None
        self.timed_out = False

    def bind(self, call: CallTelemetry) -> None:
        """The call's telemetry, which records the config's hints."""
        self._call = call

    def audio_sent(self, num_bytes: int) -> None:
        if self.timeout is not None:
            self.timeout.audio(num_bytes)

    async def input_ended(self) -> bool:
        if self.timeout is None:
            return False
        # The core's events for the audio just read are queued; let them be translated (and so
        # seen here) before the timeout is judged.
        await asyncio.sleep(0)
        self.timed_out = self.timeout.expired  # the end of the input: its finals still come
        return self.timed_out

    def configure(self, request: Any) -> tuple[stt_pb2.StreamingRecognitionConfig, str | None]:
        streaming = request.streaming_config
        config = translate_config(streaming.config, "streaming_config.config", self._call)
        if streaming.HasField("voice_activity_timeout"):
            self.timeout = self._voice_activity_timeout(streaming, config)
        self.settings = GoogleSettings(streaming.config, streaming)
        translated = stt_pb2.StreamingRecognitionConfig(
            config=config,
            interim_results=streaming.interim_results,
            single_utterance=streaming.single_utterance,
        )
        return translated, compressed_encoding(streaming.config)

    @staticmethod
    def _voice_activity_timeout(streaming: Any, config: stt_pb2.RecognitionConfig) -> VoiceActivityTimeout:
        field = "streaming_config.voice_activity_timeout"
        if not streaming.enable_voice_activity_events:
            raise invalid_argument(
                "STT_CONFIG_UNSUPPORTED",
                f"{field} needs streaming_config.enable_voice_activity_events (as Google's API does)",
                field,
            )
        timeout = streaming.voice_activity_timeout
        start = _timeout_seconds(timeout.speech_start_timeout, field + ".speech_start_timeout")
        end = _timeout_seconds(timeout.speech_end_timeout, field + ".speech_end_timeout")
        linear = config.encoding == stt_pb2.LINEAR16
        rate = config.sample_rate_hertz or (16000 if linear else 8000)
        return VoiceActivityTimeout(
            start, end, (2 if linear else 1) * max(1, config.audio_channel_count) * rate
        )

    def timeout_event(self) -> Any:
        """The SPEECH_ACTIVITY_TIMEOUT response that ends a stream closed by the timeout: at
        the audio offset where it expired, which is all the audio the stream took."""
        out = StreamingResponse(speech_event_type=SpeechEventType.SPEECH_ACTIVITY_TIMEOUT)
        out.speech_event_time.FromNanoseconds(round(self.timeout.heard * 1e9))
        out.total_billed_time.FromNanoseconds(round(self.timeout.heard * 1e9))
        return out

    def response(self, response: stt_pb2.StreamingRecognizeResponse) -> Any | None:
        """The Google response for the core's ``response``; None when Google sends none."""
        out = StreamingResponse()
        out.total_billed_time.CopyFrom(response.total_billed_time)
        if response.HasField("speech_event"):
            kind = response.speech_event.type
            if self.timeout is not None and kind != stt_pb2.SpeechEvent.END_OF_SINGLE_UTTERANCE:
                offset = response.speech_event.offset
                self.timeout.speech(kind == stt_pb2.SpeechEvent.SPEECH_STARTED, duration_seconds(offset))
            if kind != stt_pb2.SpeechEvent.END_OF_SINGLE_UTTERANCE and not self.settings.voice_events:
                return None
            out.speech_event_type = SPEECH_EVENTS[kind]
            out.speech_event_time.CopyFrom(response.speech_event.offset)
            return out
        out.results.append(self.settings.streaming_result(response.result))
        return out


class GoogleSpeechService:
    """The google.cloud.speech.v1.Speech methods, served by the engine's ``SpeechService``."""

    def __init__(self, core: SpeechService) -> None:
        self.core = core

    async def StreamingRecognize(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext):
        stream = GoogleStream(requests, self.core.options.max_chunk_bytes)
        async for response in self.core.serve_stream(GOOGLE_STREAMING_METHOD, stream, context, stream.bind):
            translated = stream.response(response)
            if translated is not None:
                yield translated
        if stream.timed_out:
            yield stream.timeout_event()

    async def Recognize(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        settings: list[GoogleSettings] = []

        async def translate(request: Any, call: CallTelemetry) -> stt_pb2.RecognizeRequest:
            if not request.HasField("config"):
                raise invalid_argument("STT_CONFIG_MISSING", "config is required", "config")
            if request.audio.WhichOneof("audio_source") == "uri":
                raise refuse("audio.uri", "the engine does not fetch audio; send it in audio.content")
            settings.append(GoogleSettings(request.config))
            config = translate_config(request.config, "config", call)
            audio = request.audio.content
            compressed = compressed_encoding(request.config)
            if compressed:  # minutes of audio: off the event loop
                audio = await asyncio.to_thread(
                    decode_all, compressed, audio, self.core.options.max_recognize_seconds
                )
            return stt_pb2.RecognizeRequest(config=config, audio_content=audio)

        response = await self.core.serve_recognize(GOOGLE_RECOGNIZE_METHOD, requests, context, translate)
        out = RecognizeResponse(results=[settings[0].recognition_result(r) for r in response.results])
        out.total_billed_time.CopyFrom(response.total_billed_time)
        return out

    async def LongRunningRecognize(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext):
        error = SttError(
            grpc.StatusCode.UNIMPLEMENTED,
            "STT_METHOD_UNIMPLEMENTED",
            "LongRunningRecognize is not served: stream the audio with StreamingRecognize, or send up "
            "to the Recognize limit with Recognize",
        )
        await self.core.refuse_call(GOOGLE_LONG_RUNNING_METHOD, context, error)


def _service_file() -> descriptor_pb2.FileDescriptorProto:
    """The Speech service's descriptor, for reflection: the client package's proto-plus types
    register the messages, not the service."""
    types_file = StreamingRequest.DESCRIPTOR.file.name
    file = descriptor_pb2.FileDescriptorProto(
        name="stt-engine/google/cloud/speech/v1/speech_service.proto",
        package="google.cloud.speech.v1",
        dependency=[types_file, operations_pb2.DESCRIPTOR.name],
        syntax="proto3",
    )
    service = file.service.add(name="Speech")
    for name, request, response, client_streaming, server_streaming in (
        ("Recognize", RecognizeRequest, RecognizeResponse, False, False),
        ("LongRunningRecognize", LongRunningRequest, operations_pb2.Operation, False, False),
        ("StreamingRecognize", StreamingRequest, StreamingResponse, True, True),
    ):
        service.method.add(
            name=name,
            input_type="." + request.DESCRIPTOR.full_name,
            output_type="." + response.DESCRIPTOR.full_name,
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )
    return file


def register_descriptor() -> None:
    """Adds the service to the default descriptor pool once (reflection reads it there)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(GOOGLE_SERVICE_NAME)
    except KeyError:
        pool.Add(_service_file())


def add_google_service(service: GoogleSpeechService, server: grpc.aio.Server) -> None:
    """Registers google.cloud.speech.v1.Speech. As for stt.v1, requests that do not parse reach
    the method as ``MalformedRequest``, and the unary methods read their message only after
    the call is authenticated and admitted."""
    from .service import tolerant

    register_descriptor()

    def parse(message: Any) -> Any:
        return tolerant(message.FromString, message.DESCRIPTOR.full_name)

    handlers = {
        "StreamingRecognize": grpc.stream_stream_rpc_method_handler(
            service.StreamingRecognize,
            request_deserializer=parse(StreamingRequest),
            response_serializer=StreamingResponse.SerializeToString,
        ),
        "Recognize": grpc.stream_unary_rpc_method_handler(
            service.Recognize,
            request_deserializer=parse(RecognizeRequest),
            response_serializer=RecognizeResponse.SerializeToString,
        ),
        "LongRunningRecognize": grpc.stream_unary_rpc_method_handler(
            service.LongRunningRecognize,
            request_deserializer=tolerant(
                LongRunningRequest.FromString, LongRunningRequest.DESCRIPTOR.full_name
            ),
            response_serializer=operations_pb2.Operation.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(GOOGLE_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(GOOGLE_SERVICE_NAME, handlers)
