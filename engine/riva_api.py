"""nvidia.riva.asr.RivaSpeechRecognition on the engine: a translation layer over the stt.v1 service.

As for Google's API (``google_api``), a Riva client's requests become stt.v1 requests, the one
recognition core serves them, and its responses become Riva's. The messages are
``nvidia-riva-client``'s own generated classes (``riva.client.proto.riva_asr_pb2``), so the wire
format is the client's.

Riva has no speech events: the core's are dropped. Its word offsets are milliseconds, and every
result says how much audio was processed (``audio_processed``, seconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from riva.client.proto import riva_asr_pb2 as riva
from riva.client.proto import riva_audio_pb2 as riva_audio

from .api import stt_pb2
from .compat import OutputText, TranslatedStream, decode_all, duration_seconds, phrase_prompt, refuse
from .errors import invalid_argument

if TYPE_CHECKING:
    from otel import CallTelemetry

    from .service import SpeechService

RIVA_SERVICE_NAME = "nvidia.riva.asr.RivaSpeechRecognition"
RIVA_STREAMING_METHOD = f"{RIVA_SERVICE_NAME}/StreamingRecognize"
RIVA_RECOGNIZE_METHOD = f"{RIVA_SERVICE_NAME}/Recognize"
RIVA_CONFIG_METHOD = f"{RIVA_SERVICE_NAME}/GetRivaSpeechRecognitionConfig"

ENCODINGS = {
    riva_audio.LINEAR_PCM: stt_pb2.LINEAR16,
    riva_audio.MULAW: stt_pb2.MULAW,
    riva_audio.ALAW: stt_pb2.ALAW,
}
COMPRESSED = {riva_audio.FLAC: "FLAC", riva_audio.OGGOPUS: "OGG_OPUS"}  # decoded as they stream in
# Riva's endpointing parameters with no counterpart in the engine's VAD: refused when set.
UNMAPPED_ENDPOINTING = {
    "start_history": "the engine starts an utterance at the first speech frame",
    "stop_threshold": "the engine's VAD has one speech threshold: set start_threshold",
    "stop_history_eou": "the engine's early end of utterance is the server's --speculative-final-ms",
    "stop_threshold_eou": "the engine's early end of utterance is the server's --speculative-final-ms",
}


def translate_config(config: Any, field: str) -> stt_pb2.RecognitionConfig:
    """A Riva RecognitionConfig as the engine's, or SttError naming what it cannot honour."""
    f = field + "."
    encoding = ENCODINGS.get(config.encoding)
    compressed = COMPRESSED.get(config.encoding)
    if encoding is None and compressed is None:
        known = config.encoding in riva_audio.AudioEncoding.values()
        name = riva_audio.AudioEncoding.Name(config.encoding) if known else config.encoding
        raise invalid_argument(
            "STT_ENCODING_UNSUPPORTED",
            f"{f}encoding={name} is not supported by this server; use LINEAR_PCM, MULAW, ALAW, "
            "FLAC or OGGOPUS",
            f + "encoding",
        )
    if config.enable_separate_recognition_per_channel and config.audio_channel_count > 1:
        raise refuse(
            f + "enable_separate_recognition_per_channel",
            "channels are mixed to mono and recognised together; send each channel as its own stream",
        )
    if config.diarization_config.enable_speaker_diarization:
        raise refuse(f + "diarization_config", "speaker diarization is not supported")
    if config.custom_configuration:
        key = sorted(config.custom_configuration)[0]
        raise refuse(f"{f}custom_configuration[{key!r}]"[:200], "no custom configuration is supported")
    endpointing = stt_pb2.EndpointingConfig()
    riva_endpointing = config.endpointing_config
    for name, why in UNMAPPED_ENDPOINTING.items():
        if getattr(riva_endpointing, name) > 0:
            raise refuse(f"{f}endpointing_config.{name}", why)
    endpointing.silence_duration_ms = max(0, riva_endpointing.stop_history)
    endpointing.speech_threshold = max(0.0, riva_endpointing.start_threshold)
    rate, channels = config.sample_rate_hertz, config.audio_channel_count
    if compressed:  # decoded to 16 kHz mono LINEAR16 before the core (compat.AudioIn)
        encoding, rate, channels = stt_pb2.LINEAR16, 16000, 1
    return stt_pb2.RecognitionConfig(
        encoding=encoding,
        sample_rate_hertz=rate,
        audio_channel_count=channels,
        language_code=config.language_code,
        prompt=phrase_prompt(config.speech_contexts, f + "speech_contexts"),
        model=config.model,
        enable_word_time_offsets=config.enable_word_time_offsets,
        max_alternatives=config.max_alternatives,
        endpointing=endpointing,
    )


class RivaOutput:
    """How the core's results are written as Riva's, for one config."""

    def __init__(self, config: Any) -> None:
        self.text = OutputText(config.enable_automatic_punctuation, config.profanity_filter)
        self.word_offsets = config.enable_word_time_offsets
        self.language = config.language_code or "en-US"

    def alternative(self, alternative: stt_pb2.SpeechRecognitionAlternative) -> Any:
        out = riva.SpeechRecognitionAlternative(
            transcript=self.text(alternative.transcript),
            confidence=alternative.confidence,
            language_code=self.language,
        )
        for word in alternative.words if self.word_offsets else ():
            text = self.text(word.word.strip())
            if text:
                out.words.add(
                    word=text,
                    start_time=round(duration_seconds(word.start_offset) * 1000),
                    end_time=round(duration_seconds(word.end_offset) * 1000),
                    confidence=word.confidence,
                    language_code=self.language,
                )
        return out

    def recognition_result(self, result: stt_pb2.StreamingRecognitionResult, processed: float) -> Any:
        return riva.SpeechRecognitionResult(
            alternatives=[self.alternative(a) for a in result.alternatives],
            channel_tag=1,
            audio_processed=processed,
        )

    def streaming_result(self, result: stt_pb2.StreamingRecognitionResult, processed: float) -> Any:
        return riva.StreamingRecognitionResult(
            alternatives=[self.alternative(a) for a in result.alternatives],
            is_final=result.is_final,
            stability=result.stability,
            channel_tag=1,
            audio_processed=processed,
        )


class RivaStream(TranslatedStream):
    """One Riva stream: its requests as stt.v1 requests, the core's responses as Riva's."""

    request_type = riva.StreamingRecognizeRequest

    def __init__(self, requests: AsyncIterator[Any], max_message_bytes: int) -> None:
        super().__init__(requests, max_message_bytes)
        self.output: RivaOutput | None = None
        self.request_id: Any = None

    def check(self, request: Any) -> None:
        if request.runtime_config:
            key = sorted(request.runtime_config)[0]
            raise refuse(f"runtime_config[{key!r}]"[:200], "no runtime configuration is supported")

    def configure(self, request: Any) -> tuple[stt_pb2.StreamingRecognitionConfig, str | None]:
        streaming = request.streaming_config
        config = translate_config(streaming.config, "streaming_config.config")
        self.output = RivaOutput(streaming.config)
        if request.HasField("id"):
            self.request_id = request.id
        translated = stt_pb2.StreamingRecognitionConfig(
            config=config, interim_results=streaming.interim_results
        )
        return translated, COMPRESSED.get(streaming.config.encoding)

    def response(self, response: stt_pb2.StreamingRecognizeResponse) -> Any | None:
        """The Riva response for the core's ``response``; None for speech events (Riva has none)."""
        if not response.HasField("result"):
            return None
        processed = duration_seconds(response.total_billed_time)
        out = riva.StreamingRecognizeResponse(
            results=[self.output.streaming_result(response.result, processed)]
        )
        if self.request_id is not None:
            out.id.CopyFrom(self.request_id)
        return out


class RivaSpeechService:
    """The nvidia.riva.asr.RivaSpeechRecognition methods, served by the engine's ``SpeechService``."""

    def __init__(self, core: SpeechService) -> None:
        self.core = core

    async def StreamingRecognize(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext):
        stream = RivaStream(requests, self.core.options.max_chunk_bytes)
        async for response in self.core.serve_stream(RIVA_STREAMING_METHOD, stream, context):
            translated = stream.response(response)
            if translated is not None:
                yield translated

    async def Recognize(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        received: list[Any] = []

        async def translate(request: Any, call: CallTelemetry) -> stt_pb2.RecognizeRequest:
            if not request.HasField("config"):
                raise invalid_argument("STT_CONFIG_MISSING", "config is required", "config")
            received.append(request)
            config = translate_config(request.config, "config")
            audio = request.audio
            compressed = COMPRESSED.get(request.config.encoding)
            if compressed:  # minutes of audio: off the event loop
                audio = await asyncio.to_thread(
                    decode_all, compressed, audio, self.core.options.max_recognize_seconds
                )
            return stt_pb2.RecognizeRequest(config=config, audio_content=audio)

        response = await self.core.serve_recognize(RIVA_RECOGNIZE_METHOD, requests, context, translate)
        request = received[0]
        output = RivaOutput(request.config)
        processed = duration_seconds(response.total_billed_time)
        out = riva.RecognizeResponse(
            results=[output.recognition_result(r, processed) for r in response.results]
        )
        if request.HasField("id"):
            out.id.CopyFrom(request.id)
        return out

    async def GetRivaSpeechRecognitionConfig(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> Any:
        """The loaded model, its languages and what it serves, as Riva describes a model."""
        request, model = await self.core.read_info_request(RIVA_CONFIG_METHOD, requests, context)
        response = riva.RivaSpeechRecognitionConfigResponse()
        if model is not None and request.model_name in ("", model.name, model.path):
            config = response.model_config.add(model_name=model.name)
            languages = ["en-US"] if not model.multilingual else model.languages
            config.parameters.update(
                {
                    "language_code": ",".join(languages),
                    "type": "online",
                    "streaming": "true",
                    "offline": "true",
                    "sample_rate": "16000",
                    "device": model.device,
                    "compute_type": model.options.compute_type,
                    "engine": "stt-engine (faster-whisper)",
                }
            )
        return response


def add_riva_service(service: RivaSpeechService, server: grpc.aio.Server) -> None:
    """Registers nvidia.riva.asr.RivaSpeechRecognition, with ``add_google_service``'s parsing
    and unary handling (the messages' descriptors, service included, come with the package)."""
    from .service import tolerant

    def parse(message: Any) -> Any:
        return tolerant(message.FromString, message.DESCRIPTOR.full_name)

    handlers = {
        "StreamingRecognize": grpc.stream_stream_rpc_method_handler(
            service.StreamingRecognize,
            request_deserializer=parse(riva.StreamingRecognizeRequest),
            response_serializer=riva.StreamingRecognizeResponse.SerializeToString,
        ),
        "Recognize": grpc.stream_unary_rpc_method_handler(
            service.Recognize,
            request_deserializer=parse(riva.RecognizeRequest),
            response_serializer=riva.RecognizeResponse.SerializeToString,
        ),
        "GetRivaSpeechRecognitionConfig": grpc.stream_unary_rpc_method_handler(
            service.GetRivaSpeechRecognitionConfig,
            request_deserializer=parse(riva.RivaSpeechRecognitionConfigRequest),
            response_serializer=riva.RivaSpeechRecognitionConfigResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RIVA_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(RIVA_SERVICE_NAME, handlers)
