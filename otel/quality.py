"""Input-audio and recognition-quality telemetry: span attributes, metrics and the
per-utterance log record, from the engine's ``quality.AudioQuality`` and
``quality.RecognitionQuality`` (read by field name; this package imports nothing of the engine).

Attributes follow the semantic-convention style: ``stt.audio.*`` for the audio, ``stt.recognition.*``
for the model's side. Levels on spans and logs are dBFS; the level histograms hold the linear RMS
(fraction of full scale), as OpenTelemetry histograms take no negative values.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .instruments import Instruments

logger = logging.getLogger(__name__)


def sample_rate_class(sample_rate: int) -> str:
    """``narrowband`` (telephone, up to 8 kHz), ``wideband`` (up to 16 kHz) or ``fullband``."""
    if sample_rate <= 8000:
        return "narrowband"
    return "wideband" if sample_rate <= 16000 else "fullband"


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def audio_attributes(audio: Any, sample_rate: int) -> dict[str, Any]:
    """``stt.audio.*`` span and log attributes of an ``AudioQuality``; unknown measures are left out."""
    values = {
        "stt.audio.speech_level": _rounded(audio.speech_level, 1),
        "stt.audio.noise_level": _rounded(audio.noise_level, 1),
        "stt.audio.snr": _rounded(audio.snr, 1),
        "stt.audio.peak_level": _rounded(audio.peak_level, 1),
        "stt.audio.clipped_share": _rounded(audio.clipped_share, 5),
        "stt.audio.dc_offset": _rounded(audio.dc_offset, 5),
        "stt.audio.vad_uncertain_share": _rounded(audio.vad_uncertain_share, 3),
        "stt.audio.bandwidth": audio.bandwidth,
        "stt.audio.speech_duration": _rounded(audio.speech_seconds, 3),
        "stt.audio.conditions": audio.conditions(sample_rate),
    }
    return {key: value for key, value in values.items() if value is not None}


def recognition_attributes(recognition: Any) -> dict[str, Any]:
    """``stt.recognition.*`` span and log attributes of a ``RecognitionQuality``."""
    values = {
        "stt.recognition.avg_logprob": round(recognition.avg_logprob, 3),
        "stt.recognition.confidence": round(recognition.confidence, 3),
        "stt.recognition.no_speech_prob": round(recognition.no_speech_prob, 3),
        "stt.recognition.compression_ratio": round(recognition.compression_ratio, 3),
        "stt.recognition.temperature": recognition.temperature,
        "stt.recognition.fallback_reason": recognition.fallback_reason or None,
        "stt.recognition.loop_cut": recognition.loop_cut,
        "stt.recognition.repair": recognition.repair or None,
        "stt.recognition.low_probability_word_share": _rounded(recognition.low_probability_word_share, 3),
    }
    return {key: value for key, value in values.items() if value is not None}


def _rms(level_dbfs: float | None) -> float | None:
    return None if level_dbfs is None else 10 ** (level_dbfs / 20)


def record_audio(
    instruments: Instruments, audio: Any, sample_rate: int, attributes: dict[str, Any], context: Any = None
) -> None:
    """One utterance's audio measures into the histograms and the per-condition counters;
    ``context``: the utterance span's, so that exemplars lead to its trace."""
    for histogram, value in (
        (instruments.audio_speech_rms, _rms(audio.speech_level)),
        (instruments.audio_noise_rms, _rms(audio.noise_level)),
        (instruments.audio_snr, None if audio.snr is None else max(0.0, audio.snr)),
        (instruments.audio_clipped_share, audio.clipped_share),
        (instruments.audio_bandwidth, audio.bandwidth),
        (instruments.audio_vad_uncertain_share, audio.vad_uncertain_share),
    ):
        if value is not None:
            histogram.record(value, attributes, context=context)
    instruments.audio_utterances.add(1, attributes)
    for condition in audio.conditions(sample_rate):
        instruments.audio_flagged_utterances.add(1, {**attributes, "stt.audio.condition": condition})


def record_recognition(
    instruments: Instruments, recognition: Any, attributes: dict[str, Any], context: Any = None
) -> None:
    """One final's recognition measures into the histograms and counters; ``context``: the
    utterance span's, so that exemplars lead to its trace."""
    for histogram, value in (
        (instruments.recognition_confidence, recognition.confidence),
        (instruments.recognition_no_speech_prob, recognition.no_speech_prob),
        (instruments.recognition_compression_ratio, recognition.compression_ratio),
        (instruments.recognition_low_probability_words, recognition.low_probability_word_share),
    ):
        if value is not None:
            histogram.record(value, attributes, context=context)
    if recognition.fallback_reason:
        instruments.recognition_fallbacks.add(
            1, {**attributes, "stt.recognition.fallback_reason": recognition.fallback_reason}
        )
    repairs = [recognition.repair] if recognition.repair else []
    for repair in repairs + (["loop_cut"] if recognition.loop_cut else []):
        instruments.recognition_repairs.add(1, {**attributes, "stt.recognition.repair": repair})


def _format(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "?"
    if isinstance(value, float) and not math.isfinite(value):
        return "?"
    return f"{value:.{digits}f}{unit}"


def log_utterance(index: int, audio: dict[str, Any], recognition: dict[str, Any] | None) -> None:
    """The one summary record of an utterance (in its span's context, so Loki links it to the
    trace): the audio measures, and the recognition measures of its final (none when the
    utterance held no words)."""
    final = (
        "no words"
        if recognition is None
        else (
            f"confidence {_format(recognition.get('stt.recognition.confidence'), digits=2)}, "
            f"avg logprob {_format(recognition.get('stt.recognition.avg_logprob'), digits=2)}, "
            f"temperature {_format(recognition.get('stt.recognition.temperature'))}"
        )
    )
    conditions = ", ".join(audio.get("stt.audio.conditions", [])) or "none"
    logger.info(
        "utterance %d quality: speech %s dBFS, noise %s dBFS, SNR %s dB, clipped %s, bandwidth %s Hz, "
        "flagged: %s; %s",
        index,
        _format(audio.get("stt.audio.speech_level")),
        _format(audio.get("stt.audio.noise_level")),
        _format(audio.get("stt.audio.snr")),
        _format(100 * audio.get("stt.audio.clipped_share", 0.0), "%", 2),
        _format(audio.get("stt.audio.bandwidth"), digits=0),
        conditions,
        final,
        extra={"stt.utterance.index": index, **audio, **(recognition or {})},
    )
