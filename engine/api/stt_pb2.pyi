import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    LINEAR16: _ClassVar[AudioEncoding]
    MULAW: _ClassVar[AudioEncoding]
    ALAW: _ClassVar[AudioEncoding]
ENCODING_UNSPECIFIED: AudioEncoding
LINEAR16: AudioEncoding
MULAW: AudioEncoding
ALAW: AudioEncoding

class RecognitionConfig(_message.Message):
    __slots__ = ("encoding", "sample_rate_hertz", "audio_channel_count", "language_code", "prompt", "model", "enable_word_time_offsets", "max_alternatives", "endpointing")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHANNEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENABLE_WORD_TIME_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    MAX_ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTING_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate_hertz: int
    audio_channel_count: int
    language_code: str
    prompt: str
    model: str
    enable_word_time_offsets: bool
    max_alternatives: int
    endpointing: EndpointingConfig
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hertz: _Optional[int] = ..., audio_channel_count: _Optional[int] = ..., language_code: _Optional[str] = ..., prompt: _Optional[str] = ..., model: _Optional[str] = ..., enable_word_time_offsets: _Optional[bool] = ..., max_alternatives: _Optional[int] = ..., endpointing: _Optional[_Union[EndpointingConfig, _Mapping]] = ...) -> None: ...

class EndpointingConfig(_message.Message):
    __slots__ = ("silence_duration_ms", "max_utterance_ms", "speech_threshold")
    SILENCE_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_UTTERANCE_MS_FIELD_NUMBER: _ClassVar[int]
    SPEECH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    silence_duration_ms: int
    max_utterance_ms: int
    speech_threshold: float
    def __init__(self, silence_duration_ms: _Optional[int] = ..., max_utterance_ms: _Optional[int] = ..., speech_threshold: _Optional[float] = ...) -> None: ...

class StreamingRecognitionConfig(_message.Message):
    __slots__ = ("config", "interim_results", "single_utterance", "interim_interval_ms")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    SINGLE_UTTERANCE_FIELD_NUMBER: _ClassVar[int]
    INTERIM_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    interim_results: bool
    single_utterance: bool
    interim_interval_ms: int
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., interim_results: _Optional[bool] = ..., single_utterance: _Optional[bool] = ..., interim_interval_ms: _Optional[int] = ...) -> None: ...

class StreamingRecognizeRequest(_message.Message):
    __slots__ = ("streaming_config", "audio_content")
    STREAMING_CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CONTENT_FIELD_NUMBER: _ClassVar[int]
    streaming_config: StreamingRecognitionConfig
    audio_content: bytes
    def __init__(self, streaming_config: _Optional[_Union[StreamingRecognitionConfig, _Mapping]] = ..., audio_content: _Optional[bytes] = ...) -> None: ...

class WordInfo(_message.Message):
    __slots__ = ("start_offset", "end_offset", "word", "confidence")
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    WORD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    start_offset: _duration_pb2.Duration
    end_offset: _duration_pb2.Duration
    word: str
    confidence: float
    def __init__(self, start_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., word: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class SpeechRecognitionAlternative(_message.Message):
    __slots__ = ("transcript", "confidence", "words")
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    transcript: str
    confidence: float
    words: _containers.RepeatedCompositeFieldContainer[WordInfo]
    def __init__(self, transcript: _Optional[str] = ..., confidence: _Optional[float] = ..., words: _Optional[_Iterable[_Union[WordInfo, _Mapping]]] = ...) -> None: ...

class StreamingRecognitionResult(_message.Message):
    __slots__ = ("alternatives", "is_final", "stability", "result_end_offset", "result_start_offset", "utterance_index", "language_code", "stable_transcript")
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    RESULT_END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RESULT_START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_CODE_FIELD_NUMBER: _ClassVar[int]
    STABLE_TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    alternatives: _containers.RepeatedCompositeFieldContainer[SpeechRecognitionAlternative]
    is_final: bool
    stability: float
    result_end_offset: _duration_pb2.Duration
    result_start_offset: _duration_pb2.Duration
    utterance_index: int
    language_code: str
    stable_transcript: str
    def __init__(self, alternatives: _Optional[_Iterable[_Union[SpeechRecognitionAlternative, _Mapping]]] = ..., is_final: _Optional[bool] = ..., stability: _Optional[float] = ..., result_end_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., result_start_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., utterance_index: _Optional[int] = ..., language_code: _Optional[str] = ..., stable_transcript: _Optional[str] = ...) -> None: ...

class SpeechEvent(_message.Message):
    __slots__ = ("type", "offset", "utterance_index")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SPEECH_EVENT_UNSPECIFIED: _ClassVar[SpeechEvent.Type]
        SPEECH_STARTED: _ClassVar[SpeechEvent.Type]
        SPEECH_ENDED: _ClassVar[SpeechEvent.Type]
        END_OF_SINGLE_UTTERANCE: _ClassVar[SpeechEvent.Type]
    SPEECH_EVENT_UNSPECIFIED: SpeechEvent.Type
    SPEECH_STARTED: SpeechEvent.Type
    SPEECH_ENDED: SpeechEvent.Type
    END_OF_SINGLE_UTTERANCE: SpeechEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    type: SpeechEvent.Type
    offset: _duration_pb2.Duration
    utterance_index: int
    def __init__(self, type: _Optional[_Union[SpeechEvent.Type, str]] = ..., offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., utterance_index: _Optional[int] = ...) -> None: ...

class StreamingRecognizeResponse(_message.Message):
    __slots__ = ("result", "speech_event", "total_billed_time")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SPEECH_EVENT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BILLED_TIME_FIELD_NUMBER: _ClassVar[int]
    result: StreamingRecognitionResult
    speech_event: SpeechEvent
    total_billed_time: _duration_pb2.Duration
    def __init__(self, result: _Optional[_Union[StreamingRecognitionResult, _Mapping]] = ..., speech_event: _Optional[_Union[SpeechEvent, _Mapping]] = ..., total_billed_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RecognizeRequest(_message.Message):
    __slots__ = ("config", "audio_content")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CONTENT_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    audio_content: bytes
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., audio_content: _Optional[bytes] = ...) -> None: ...

class RecognizeResponse(_message.Message):
    __slots__ = ("results", "total_billed_time")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BILLED_TIME_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StreamingRecognitionResult]
    total_billed_time: _duration_pb2.Duration
    def __init__(self, results: _Optional[_Iterable[_Union[StreamingRecognitionResult, _Mapping]]] = ..., total_billed_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_concurrent_streams", "max_stream_duration", "max_chunk_bytes", "max_recognize_bytes", "min_sample_rate_hertz", "max_sample_rate_hertz")
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_DURATION_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RECOGNIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    max_concurrent_streams: int
    max_stream_duration: _duration_pb2.Duration
    max_chunk_bytes: int
    max_recognize_bytes: int
    min_sample_rate_hertz: int
    max_sample_rate_hertz: int
    def __init__(self, max_concurrent_streams: _Optional[int] = ..., max_stream_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_chunk_bytes: _Optional[int] = ..., max_recognize_bytes: _Optional[int] = ..., min_sample_rate_hertz: _Optional[int] = ..., max_sample_rate_hertz: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "model", "device", "compute_type", "languages", "encodings", "limits", "active_streams", "ready")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TYPE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGES_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: str
    device: str
    compute_type: str
    languages: _containers.RepeatedScalarFieldContainer[str]
    encodings: _containers.RepeatedScalarFieldContainer[AudioEncoding]
    limits: ServerLimits
    active_streams: int
    ready: bool
    def __init__(self, version: _Optional[str] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., compute_type: _Optional[str] = ..., languages: _Optional[_Iterable[str]] = ..., encodings: _Optional[_Iterable[_Union[AudioEncoding, str]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., active_streams: _Optional[int] = ..., ready: _Optional[bool] = ...) -> None: ...
