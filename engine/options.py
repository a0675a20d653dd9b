"""Option dataclasses for the model, streaming recognition and the server."""

from __future__ import annotations

from dataclasses import dataclass, field

TARGET_SAMPLE_RATE = 16000


@dataclass(frozen=True)
class ModelOptions:
    """How the Whisper model is loaded.

    Attributes:
        model: ``tiny.en`` (the bundled default), a faster-whisper model name, or a
            path to a CTranslate2 Whisper model directory.
        device: ``cpu``, ``cuda`` or ``auto``.
        compute_type: CTranslate2 compute type (``int8``, ``int8_float16``, ``float16``...).
        cpu_threads: intra-op threads per inference worker.
        workers: inference calls that may run at the same time (CTranslate2 workers,
            and the size of the inference thread pool).
        download_root: where a named model may be cached when it is not bundled.
        warmup_runs: rounds of interim+final decodes before reporting SERVING (GPUs and
            large models reach steady speed only after a few).
        batch_size: most decodes one model call runs together (``SpeechModel.decode_batch``):
            a worker taking a decode also takes queued ones of the same kind and settings whose
            encoder lengths are within ``scheduler.BATCH_FRAME_TOLERANCE`` frames, and encodes
            and decodes them together, each exactly as alone. 1: every decode alone. On the CPU
            (tiny.en int8, one thread), ``bench/batching.py`` (12 finals, 24 interims) took
            0.92, 0.89 and 0.89 of the one-by-one CPU per audio second at 2, 4 and 8, with the
            same transcripts; a GPU gains far more from the larger matrix products. Batches
            form only from decodes already queued, so an idle server waits for none. Default 1:
            with 16 real-time streams on the 2-core machine, batches of 4 saved no CPU (0.110
            against 0.111 CPU-s per audio second, the interim mix of the microbenchmark is rare
            there) and a final waiting for its batch mates raised its latency after the last
            word from 0.88 / 1.63 to 1.24 / 2.26 s (p50 / p95, ``bench/streaming.py``). For GPUs.
    """

    model: str = "tiny.en"
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 1
    workers: int = 2
    download_root: str | None = None
    warmup_runs: int = 1
    batch_size: int = 1


@dataclass(frozen=True)
class DecodeOptions:
    """Decoder settings for the two kinds of decode.

    Attributes:
        final_beam_size: beam width for final results (offline Whisper quality).
        interim_beam_size: beam width for interim results (greedy is cheap and good enough
            for text that will be replaced).
        temperatures: fallback temperatures for finals whose beam output is repetitive or
            improbable, as in Whisper's transcribe loop.
        min_encoder_frames: shortest encoder input in mel frames (10 ms each). Whisper
            loops on very short inputs; padding short utterances to this many frames
            keeps it accurate while still far below the 3000-frame (30 s) window.
        interim_min_encoder_frames: the same floor for interim decodes, whose text is
            provisional: a shorter input costs less, and the token cap bounds any loop.
        encoder_frames_bucket: encoder input lengths are rounded up to a multiple of this
            (even) number of frames. Every new input length leaves buffers of a new size in
            CTranslate2's and the C allocator's caches; with few distinct shapes RSS stops
            growing (measured flat over 1500 decodes, against +30 MB unbucketed).
        tail_padding_frames: padding frames always appended after the audio of an interim,
            so the decoder sees where speech ends.
        final_padding_frames: the same for finals. Whisper learnt on 30 s windows mostly
            padded with silence; given a window that ends 1 s after the speech, it stopped
            early on long or multi-sentence utterances and dropped whole sentences (WER on
            continuous speech 9.5% against 3.6% with 10 s of padding; 13% more final CPU).
            3 s instead of 10 s cut final CPU by a quarter and the final's latency by 0.02-0.10 s
            (p50), and cost 1-2 WER points on real readings, slow and noisy speech
            (``bench/robustness.py``, same run). Server flag ``--final-padding-ms``.
        interim_context: whether interims, like finals, are prompted with the stream's
            previous finals. Finals never start from an interim's text, so the prompt changes
            only the provisional text, and it cost a third more interim CPU (0.073 -> 0.098
            CPU-s per audio-s, ``bench/decode_cost.py --context all`` vs ``finals``). Off.
        max_tokens_per_second: cap on generated tokens per second of audio, a guard
            against runaway repetition.
        no_speech_threshold: a decode whose no-speech probability is above this, and whose
            average log-probability is below ``log_prob_threshold``, is treated as silence.
        log_prob_threshold: see ``no_speech_threshold``; a final below it has low confidence,
            and triggers the temperature fallback when ``fallback_on_low_logprob``.
        fallback_on_low_logprob: whether an improbable (but not looping) beam result is
            decoded again by sampling, as Whisper does. Off (the default), sampling is only
            the way out of a loop, and an improbable beam result is sent as it is, flagged by
            low confidence: sampling an utterance the model is unsure of produced texts such as
            "s" or "I''" that pass Whisper's checks, and with the stream's context as
            prompt the WER on every robustness set was the same either way.
        compression_ratio_threshold: gzip compression ratio above which text is treated
            as a repetition loop (triggers temperature fallback).
        max_interim_wait: an interim that waited longer than this (seconds) for an inference
            worker is dropped unrun: the server is behind, and a newer interim or the final
            will cover its audio. Finals are never dropped.
    """

    final_beam_size: int = 5
    interim_beam_size: int = 1
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    min_encoder_frames: int = 1000
    interim_min_encoder_frames: int = 600
    tail_padding_frames: int = 100
    final_padding_frames: int = 1000
    encoder_frames_bucket: int = 50
    max_tokens_per_second: float = 8.0
    no_speech_threshold: float = 0.6
    log_prob_threshold: float = -1.0
    fallback_on_low_logprob: bool = False
    compression_ratio_threshold: float = 2.4
    interim_context: bool = False
    max_interim_wait: float = 0.5


@dataclass(frozen=True)
class StreamingOptions:
    """Segmentation and interim-result settings of one stream.

    Attributes:
        speech_threshold: VAD probability at or above which a 32 ms frame is speech.
        silence_duration_ms: trailing silence that ends an utterance (endpointing).
        min_speech_ms: speech shorter than this, followed by the endpoint silence, is
            dropped as a click or breath rather than decoded.
        speech_pad_ms: audio kept before speech onset and after its end in the utterance
            that is decoded, so word edges are not clipped.
        max_utterance_ms: longest utterance; a longer one is split at the quietest frame of
            its last ``split_search_ms``.
        split_search_ms: window, at the end of an over-long utterance, searched for a pause.
        interim_results: whether interim results are produced at all.
        first_interim_ms: speech after onset before the first interim decode (a quick first
            response; later interims follow every ``interim_interval_ms``).
        interim_interval_ms: new speech audio between two interim decodes. This sets most
            of the interim CPU cost.
        long_interim_interval_ms: new speech between two interims once the utterance is
            longer than ``interim_window_ms``. By then the interim text is mostly words that
            interims agreed on; what changes is its tail. On continuous speech, 1500 instead
            of 1000 ms cut interim CPU by 15%. Never below ``interim_interval_ms``; 0: always that.
        interim_window_ms: most audio an interim decodes. Beyond it the window moves past
            the words interims agree on, which are then given as previous text (see
            ``recognizer.InterimWindow``), so an interim costs the same at any point of a
            long utterance. 0: every interim decodes the whole utterance so far.
        single_utterance: end the stream after the first utterance.
        short_utterance_ms, short_utterance_silence_ms: an utterance with less speech than
            ``short_utterance_ms`` ends only after ``short_utterance_silence_ms`` of silence
            instead of ``silence_duration_ms``. A slow speaker's single words ("one", pause,
            "two") otherwise become utterances of their own, each decoded almost without
            acoustic context (slowed speech: WER 8.9% -> 6.2%). Costs such a short phrase up
            to 0.8 s more final latency. 0 disables it.
        long_utterance_ms, long_utterance_silence_ms: once an utterance is
            ``long_utterance_ms`` long, ``long_utterance_silence_ms`` of silence ends it.
            Continuous speech rarely pauses for the endpoint silence, so its utterances run
            to ``max_utterance_ms``; a breath between phrases would end them instead and keep
            finals short (sooner). Off by default: the next utterance then starts right after
            a short pause, without its pre-roll, and on continuous speech WER rose from 3.3%
            to 8.5% (8000/300). 0 disables it.
        vad_refresh_ms: the VAD's second, fresh recurrent state is reset after every this
            much audio scored as non-speech; each frame's probability is the higher of the
            fresh and the carried state's. Carried through long silence or room noise,
            Silero's state drifts and scores the next speech lower and lower: after 30 s of
            room noise at -55 dBFS, a sentence peaking at -30 dBFS was not detected at all,
            and fresh it was whole. In noise at 10 dB SNR the drift takes hold within 2 s; 1 s
            lost no clip on any robustness set. A reset state alone scores an onset right
            after it lower than the carried one (JFK's "ask not" 1 s after "Americans" was
            lost), hence both. 0: the carried state only.
        speculative_final_ms: trailing silence after which the final decode starts before
            the endpoint is certain. The final's audio ends ``speech_pad_ms`` after the
            speech, so once this much silence has passed that audio is complete; if speech
            resumes before ``silence_duration_ms`` the decode is discarded. It hides up to
            ``silence_duration_ms - speculative_final_ms`` of decode time, and with
            ``early_finals`` a confident final ends the utterance as soon as it is decoded
            (``finalization.Finalizer``); 0 disables it.
        early_finals: what a final decoded in a pause may do before the endpoint.
            ``confident``: when it ends a sentence and continues what the interims heard, it
            ends the utterance at once, without waiting for ``silence_duration_ms``.
            ``sentence``: that, and when speech resumed while it was decoded, the utterance is
            cut at the pause and the final delivered while the speaker goes on (only for
            utterances with ``finalization.MIN_SENTENCE_SECONDS`` of speech, not with
            ``single_utterance``). ``off``: finals come at the endpoint only.
    """

    speech_threshold: float = 0.5
    silence_duration_ms: int = 700
    min_speech_ms: int = 150
    speech_pad_ms: int = 300
    max_utterance_ms: int = 20000
    split_search_ms: int = 4000
    interim_results: bool = True
    first_interim_ms: int = 500
    interim_interval_ms: int = 1000
    interim_window_ms: int = 4000
    long_interim_interval_ms: int = 1500
    single_utterance: bool = False
    speculative_final_ms: int = 250
    early_finals: str = "sentence"
    vad_refresh_ms: int = 1000
    short_utterance_ms: int = 1000
    short_utterance_silence_ms: int = 1500
    long_utterance_ms: int = 0
    long_utterance_silence_ms: int = 300


@dataclass(frozen=True)
class ServerOptions:
    """Server-wide settings and limits.

    Attributes:
        address: listen address; ``0.0.0.0`` so Kubernetes gRPC probes reach the pod IP.
        max_concurrent_streams: streams served at once; more are refused with
            RESOURCE_EXHAUSTED rather than slowing everyone down.
        max_stream_seconds: audio a stream may send before it ends with OUT_OF_RANGE.
        max_chunk_bytes: largest audio chunk in one message.
        max_recognize_bytes: largest audio buffer for the unary Recognize. gRPC's receive
            limit is per server, not per method, so this (plus 64 KiB) is also the largest
            message a stream can make the server receive before its own 1 MiB chunk limit
            refuses it: kept at 16 MiB (300 s of 16 kHz LINEAR16 fits; longer audio streams).
        max_recognize_seconds: longest audio for the unary Recognize; longer audio belongs
            in a stream. It bounds the memory and the inference time one call can take.
        config_timeout_seconds: a stream must send its ``streaming_config`` within this
            long of opening, or it ends with OUT_OF_RANGE ``STT_CONFIG_TIMEOUT``: an
            unconfigured stream holds a slot while doing nothing.
        idle_timeout_seconds: a configured stream that sends no audio for this long ends
            with OUT_OF_RANGE ``STT_AUDIO_TIMEOUT`` (its finals delivered). Real-time clients
            send audio, silence included, every 100 ms or so. Messages without audio do not
            count, nor does audio slower than half real time (``session.IdleClock``).
        max_backlog_seconds: audio of a stream that has ended utterances not yet decoded.
            Beyond it the server stops reading the stream until its finals catch up, and gRPC
            flow control pushes back on the sender, so a client sending faster than the
            server decodes holds bounded memory and cannot flood the inference queue.
        drain_seconds: on SIGTERM, how long in-flight streams may continue before they
            are finalised and closed; the process exits at the latest 7 s later.
        default_streaming: defaults for what a client's config leaves unset.
        decode: decoder settings.
        memory_release_seconds: how often freed heap memory is returned to the OS
            (glibc ``malloc_trim``); without it RSS creeps up across many streams. 0 disables.
        max_connection_age_seconds: a client connection older than this gets an HTTP/2
            GOAWAY: its open streams run to their end, new calls open a new connection. A
            client balancing over DNS (``dns:///``) re-resolves then and finds servers added
            since (gRPC resolves again only when a connection closes). 0: connections live on.
        stream_window_bytes: the HTTP/2 stream window, what a call's client may send before
            the engine reads it. gRPC's own tuning grows it with the measured bandwidth-delay
            product, on a fast link past a whole 16 MiB message, so a call refused before its
            request is read (unauthenticated, at capacity) was received all the same: 400
            refused 16 MB calls from 16 threads added 26-399 MB to peak RSS (median 47). At
            4 MiB they add 4-50 MB (median 10). The price is upload time on long links: a
            16 MB Recognize takes 0.28 s at 50 ms RTT, against 0.09 s on a connection gRPC
            has tuned (0.23 s on a new one); 2 MB takes 0.06 s either way
            (``bench/upload_window.py``). 0: gRPC's tuning.
    """

    address: str = "0.0.0.0:50051"
    max_concurrent_streams: int = 32
    max_stream_seconds: float = 3600.0
    max_chunk_bytes: int = 1 << 20
    max_recognize_bytes: int = 16 << 20
    max_recognize_seconds: float = 300.0
    config_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 15.0
    max_backlog_seconds: float = 60.0
    drain_seconds: float = 30.0
    default_streaming: StreamingOptions = field(default_factory=StreamingOptions)
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    memory_release_seconds: float = 10.0
    max_connection_age_seconds: float = 0.0
    stream_window_bytes: int = 4 << 20
