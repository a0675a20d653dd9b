"""Where the CPU goes: one stream's recognition work, without gRPC, split by stage.

Feeds the long-form audio (the clips of ../shared/audio joined with pauses) through
the streaming recognizer in 100 ms chunks and runs every interim and final decode
it asks for on one inference thread, then reports process CPU seconds per audio
second for VAD, interims and finals. The options are the levers: run it once per
setting to see what each one is worth.

    python bench/decode_cost.py                                   # the defaults
    python bench/decode_cost.py --blas-threads 2                  # numpy BLAS unrestricted
    python bench/decode_cost.py --interim-min-frames 1000 --interim-interval-ms 700
    python bench/decode_cost.py --context all                     # interims prompted with it too
    python bench/decode_cost.py --interim-window-ms 0             # every interim: whole utterance
    python bench/decode_cost.py --final-beam-size 1 --final-padding-frames 300   # cheaper finals
    python bench/decode_cost.py --audio-set continuous --long-utterance-ms 0   # no short-pause cut
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.streaming import continuous_form, long_form  # noqa: E402
from engine.context import SpokenContext  # noqa: E402
from engine.model import DecodeRequest, SpeechModel  # noqa: E402
from engine.options import DecodeOptions, ModelOptions, StreamingOptions  # noqa: E402
from engine.recognizer import InterimDue, InterimWindow, StreamingRecognizer, UtteranceEnded  # noqa: E402


def wer(references: list[str], hypotheses: list[str]) -> float | None:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    pairs = [(normalise(r), normalise(h)) for r, h in zip(references, hypotheses) if normalise(r).strip()]
    if not pairs:
        return None
    return jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio")
    parser.add_argument("--interim-min-frames", type=int, default=DecodeOptions.interim_min_encoder_frames)
    parser.add_argument("--final-min-frames", type=int, default=DecodeOptions.min_encoder_frames)
    parser.add_argument("--final-padding-frames", type=int, default=DecodeOptions.final_padding_frames)
    parser.add_argument("--final-beam-size", type=int, default=DecodeOptions.final_beam_size)
    parser.add_argument("--interim-interval-ms", type=int, default=StreamingOptions.interim_interval_ms)
    parser.add_argument("--interim-window-ms", type=int, default=StreamingOptions.interim_window_ms)
    parser.add_argument("--first-interim-ms", type=int, default=StreamingOptions.first_interim_ms)
    parser.add_argument("--long-utterance-ms", type=int, default=StreamingOptions.long_utterance_ms)
    parser.add_argument(
        "--long-interim-interval-ms", type=int, default=StreamingOptions.long_interim_interval_ms
    )
    parser.add_argument("--max-utterance-ms", type=int, default=StreamingOptions.max_utterance_ms)
    parser.add_argument("--audio-set", choices=("joined", "continuous"), default="joined")
    parser.add_argument("--blas-threads", type=int, default=1, help="numpy BLAS threads (engine: 1)")
    parser.add_argument("--threads", type=int, default=1, help="CTranslate2 threads")
    parser.add_argument(
        "--context",
        choices=("all", "finals", "none"),
        default="finals",
        help="which decodes get the previous finals' text as prompt (engine: finals)",
    )
    args = parser.parse_args()

    if args.audio_set == "continuous":
        audio, segments = continuous_form()
    else:
        audio, segments = long_form(args.audio_dir, 1.5, 0)
    decode_options = DecodeOptions(
        min_encoder_frames=args.final_min_frames,
        interim_min_encoder_frames=args.interim_min_frames,
        final_padding_frames=args.final_padding_frames,
        final_beam_size=args.final_beam_size,
        interim_context=args.context == "all",
    )
    model = SpeechModel(ModelOptions(cpu_threads=args.threads, workers=1), decode_options)
    if args.blas_threads != 1:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.blas_threads, user_api="blas")
    model.warm_up()
    options = dataclasses.replace(
        StreamingOptions(),
        interim_interval_ms=args.interim_interval_ms,
        interim_window_ms=args.interim_window_ms,
        first_interim_ms=args.first_interim_ms,
        long_utterance_ms=args.long_utterance_ms,
        long_interim_interval_ms=args.long_interim_interval_ms,
        max_utterance_ms=args.max_utterance_ms,
    )
    recognizer, context = StreamingRecognizer(options), SpokenContext()
    window = InterimWindow(options.interim_window_ms / 1000)
    cpu = {"vad": 0.0, "interim": 0.0, "final": 0.0}
    counts = {"interim": 0, "final": 0}
    last_interims, finals = [], []
    interim = ""
    transcript, lengths = [], []
    chunks = [audio[start : start + 1600] for start in range(0, len(audio), 1600)]
    for chunk in [*chunks, None]:  # None: the end of the stream
        began = time.process_time()
        events = recognizer.accept(chunk) if chunk is not None else recognizer.finish()
        cpu["vad"] += time.process_time() - began
        for event in events:
            began = time.process_time()
            if isinstance(event, InterimDue):
                plan = window.plan(len(event.audio) / 16000)
                request = DecodeRequest(
                    final=False,
                    context=context.text if args.context == "all" else "",
                    said_before=plan.said_before,
                    prefix=plan.prefix,
                    word_timestamps=plan.align,
                )
                hypothesis = model.decode(event.audio[int(plan.start * 16000) :], request)
                if hypothesis.text and not hypothesis.looped:
                    interim, _ = window.update(hypothesis.text, hypothesis.words)
                cpu["interim"] += time.process_time() - began
                counts["interim"] += 1
            elif isinstance(event, UtteranceEnded):
                spoken = context.text if args.context != "none" else ""
                final = model.decode(event.audio, DecodeRequest(final=True, context=spoken))
                context.add(final)
                cpu["final"] += time.process_time() - began
                counts["final"] += 1
                transcript.append(final.text)
                lengths.append(event.end - event.start)
                if interim:
                    last_interims.append(interim)
                    finals.append(final.text)
                window, interim = InterimWindow(options.interim_window_ms / 1000), ""
    seconds = len(audio) / 16000
    result = {
        "settings": vars(args) | {"audio_dir": str(args.audio_dir)},
        "audio_seconds": seconds,
        "decodes": counts,
        "cpu_per_audio_second": {k: v / seconds for k, v in cpu.items()}
        | {"total": sum(cpu.values()) / seconds},
        "wer": wer([" ".join(s.transcript for s in segments)], [" ".join(transcript)]),
        "utterance_seconds": {"mean": sum(lengths) / len(lengths), "max": max(lengths)},
        # How far the last interim of each utterance is from its final: interim quality.
        "last_interim_wer_vs_final": wer(finals, last_interims),
        "final_and_last_interim": list(zip(finals, last_interims)),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
