"""Validation of a client's RecognitionConfig into the settings a stream runs with.

Every rejection names the offending field and value, with a stable reason.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .api import stt_pb2
from .audio import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SUPPORTED_ENCODINGS
from .errors import invalid_argument, shown
from .model import SpeechModel
from .options import StreamingOptions

MAX_UTTERANCE_MS = 28000  # one Whisper window (30 s) minus padding
MAX_ALTERNATIVES = 5
# Whisper reads at most 111 tokens of hot words (half its previous-text budget), about
# 500 characters of English; a longer prompt is cut, and one of megabytes would be
# tokenized again on every decode.
MAX_PROMPT_CHARS = 1000
# A BCP-47 tag as clients send them (``en``, ``en-US``, ``zh-Hant-TW``; ``en_US`` too): the
# whole tag is checked, not only its language, so that nothing unbounded rides along in it.
# 35 characters is the length BCP-47 asks every implementation to accept.
LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*")
MAX_LANGUAGE_TAG_CHARS = 35


@dataclass(frozen=True)
class RecognitionSettings:
    """A validated configuration.

    Attributes:
        encoding, sample_rate, channels: how the wire audio is laid out.
        language: language code, or None to detect it (multilingual models only).
        prompt: hot words given to the decoder.
        word_time_offsets: include word timings in finals.
        alternatives: hypotheses per final result.
        streaming: segmentation and interim settings.
    """

    encoding: int
    sample_rate: int
    channels: int
    language: str | None
    prompt: str
    word_time_offsets: bool
    alternatives: int
    streaming: StreamingOptions


def _check_range(value: int | float, low: float, high: float, field: str, unit: str) -> None:
    if not low <= value <= high:
        raise invalid_argument(
            "STT_CONFIG_OUT_OF_RANGE",
            f"{field}={value} is out of range: must be {low:g}..{high:g} {unit}".rstrip(),
            field,
        )


def recognition_settings(
    config: stt_pb2.RecognitionConfig,
    model: SpeechModel,
    defaults: StreamingOptions,
    streaming: stt_pb2.StreamingRecognitionConfig | None = None,
    field_prefix: str = "config",
) -> RecognitionSettings:
    """Validates ``config`` (and the streaming options) against the loaded model."""
    f = field_prefix + "."
    if config.encoding == stt_pb2.ENCODING_UNSPECIFIED:
        raise invalid_argument(
            "STT_ENCODING_UNSUPPORTED", f"{f}encoding is required (LINEAR16, MULAW or ALAW)", f + "encoding"
        )
    if config.encoding not in SUPPORTED_ENCODINGS:
        raise invalid_argument(
            "STT_ENCODING_UNSUPPORTED",
            f"{f}encoding={config.encoding} is not supported; use LINEAR16, MULAW or ALAW",
            f + "encoding",
        )
    sample_rate = config.sample_rate_hertz or (16000 if config.encoding == stt_pb2.LINEAR16 else 8000)
    _check_range(sample_rate, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, f + "sample_rate_hertz", "Hz")
    channels = config.audio_channel_count or 1
    _check_range(channels, 1, MAX_CHANNELS, f + "audio_channel_count", "")

    language = _language(config.language_code, model, f + "language_code")
    if config.model and config.model not in (model.name, model.path):
        raise invalid_argument(
            "STT_MODEL_UNAVAILABLE",
            f"{f}model={shown(config.model)} is not loaded; this server serves {model.name!r}",
            f + "model",
        )
    if len(config.prompt) > MAX_PROMPT_CHARS:
        raise invalid_argument(
            "STT_PROMPT_TOO_LONG",
            f"{f}prompt has {len(config.prompt)} characters; at most {MAX_PROMPT_CHARS} "
            "(Whisper reads about 500 characters of hot words)",
            f + "prompt",
        )
    alternatives = config.max_alternatives or 1
    _check_range(alternatives, 1, MAX_ALTERNATIVES, f + "max_alternatives", "")

    options = defaults
    endpointing = config.endpointing
    if endpointing.silence_duration_ms:
        _check_range(endpointing.silence_duration_ms, 100, 5000, f + "endpointing.silence_duration_ms", "ms")
        options = dataclasses.replace(options, silence_duration_ms=endpointing.silence_duration_ms)
    if endpointing.max_utterance_ms:
        _check_range(
            endpointing.max_utterance_ms, 2000, MAX_UTTERANCE_MS, f + "endpointing.max_utterance_ms", "ms"
        )
        options = dataclasses.replace(
            options,
            max_utterance_ms=endpointing.max_utterance_ms,
            split_search_ms=min(options.split_search_ms, endpointing.max_utterance_ms // 2),
        )
    if endpointing.speech_threshold:
        _check_range(endpointing.speech_threshold, 0.05, 0.95, f + "endpointing.speech_threshold", "")
        options = dataclasses.replace(options, speech_threshold=endpointing.speech_threshold)
    if streaming is not None:
        options = dataclasses.replace(
            options,
            interim_results=streaming.interim_results,
            single_utterance=streaming.single_utterance,
        )
        if streaming.interim_interval_ms:
            _check_range(
                streaming.interim_interval_ms, 200, 10000, "streaming_config.interim_interval_ms", "ms"
            )
            options = dataclasses.replace(options, interim_interval_ms=streaming.interim_interval_ms)
    else:
        options = dataclasses.replace(options, interim_results=False)

    return RecognitionSettings(
        encoding=config.encoding,
        sample_rate=sample_rate,
        channels=channels,
        language=language,
        prompt=config.prompt,
        word_time_offsets=config.enable_word_time_offsets,
        alternatives=alternatives,
        streaming=options,
    )


def _language(code: str, model: SpeechModel, field: str) -> str | None:
    if not code:
        return None if model.multilingual else "en"
    supported = ", ".join(model.languages[:10]) + ("..." if len(model.languages) > 10 else "")
    if len(code) > MAX_LANGUAGE_TAG_CHARS or not LANGUAGE_TAG.fullmatch(code):
        raise invalid_argument(
            "STT_LANGUAGE_UNSUPPORTED",
            f"{field}={shown(code)} is not a language tag such as 'en' or 'en-US' (at most "
            f"{MAX_LANGUAGE_TAG_CHARS} characters); model {model.name!r} supports: {supported}",
            field,
        )
    primary = re.split("[-_]", code, maxsplit=1)[0].lower()
    if not model.supports_language(primary):
        raise invalid_argument(
            "STT_LANGUAGE_UNSUPPORTED",
            f"{field}={shown(code)} is not supported by model {model.name!r} (supports: {supported})",
            field,
        )
    return primary
