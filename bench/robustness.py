"""Robustness on audio like real users': nothing lost, WER at or below offline, latency per clip.

For each condition of bench/audio_sets.py (clips joined after every other clip with pauses
and 5-30 s of room noise; the continuous readings' utterances the same way; slowed speech;
8 kHz G.711 sent as MULAW / ALAW; noise at 20 and 10 dB SNR; quiet speech; over a minute of
continuous speech), every long-form is streamed to a real server over gRPC in 100 ms chunks,
``--streams`` at once, at ``--speed`` times real time (1: real time). Reported per condition:

- clips lost: clips of which no final word lies within the clip's time span;
- WER of the whole streamed transcript against the whole reference, and of offline
  faster-whisper (beam 5, same model, its defaults) on exactly the audio the server heard;
- final latency per clip, from the clip's end and from its last word (real time only);
- words said twice at piece joins (``bench.streaming.words_said_twice``): 0 expected;
- the input-audio measures the server reports for the set (``engine.quality``: speech level,
  noise floor, SNR, clipping, bandwidth, the share of utterances flagged by condition), computed
  here by the engine's own recognizer on exactly the wire bytes, so the link between the audio
  and the errors is visible beside the WER. ``--audio-only`` prints just these, without a server.

Offline transcripts are cached by the audio's hash under ``--out``/offline-cache.

    python bench/robustness.py                      # every condition, real time, 8 streams
    python bench/robustness.py --conditions joined slow --speed 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.audio_sets import CONDITIONS, LongForm, build  # noqa: E402
from bench.streaming import (  # noqa: E402
    cpu_seconds,
    fmt,
    percentile,
    seconds,
    start_server,
    words_said_twice,
)
from engine.api import stt_pb2  # noqa: E402
from engine.audio import AudioDecoder, full_scale  # noqa: E402
from engine.client import SpeechClient, chunk_bytes, paced  # noqa: E402
from engine.model import resolve_model_path  # noqa: E402
from engine.options import StreamingOptions  # noqa: E402
from engine.recognizer import StreamingRecognizer, UtteranceEnded  # noqa: E402


@dataclass
class StreamedFinal:
    text: str
    arrival: float  # seconds after the audio's offset 0 was spoken
    words: list[tuple[float, float]]  # (start, end) offsets


@dataclass
class Streamed:
    finals: list[StreamedFinal] = field(default_factory=list)
    error: str | None = None


def stream_form(target: str, form: LongForm, speed: float, config_fields: dict) -> Streamed:
    """Sends the long-form's wire bytes in 100 ms chunks at ``speed`` x real time."""
    record = Streamed()
    bytes_per_second = form.sample_rate * (2 if form.encoding == stt_pb2.LINEAR16 else 1)
    chunk = bytes_per_second // 10
    config = stt_pb2.RecognitionConfig(
        encoding=form.encoding,
        sample_rate_hertz=form.sample_rate,
        language_code="en",
        enable_word_time_offsets=True,
        **config_fields,
    )
    started = time.monotonic()

    def requests():
        yield stt_pb2.StreamingRecognizeRequest(
            streaming_config=stt_pb2.StreamingRecognitionConfig(config=config, interim_results=True)
        )
        for part in paced(chunk_bytes(form.wire, chunk), 0.1 / speed, True, started):
            yield stt_pb2.StreamingRecognizeRequest(audio_content=part)

    with SpeechClient(target) as client:
        try:
            for response in client.stream(requests()):
                if response.HasField("result") and response.result.is_final:
                    best = response.result.alternatives[0]
                    words = [(seconds(w.start_offset), seconds(w.end_offset)) for w in best.words]
                    arrival = (time.monotonic() - started) * speed
                    record.finals.append(StreamedFinal(best.transcript, arrival, words))
        except Exception as exc:  # recorded and reported
            record.error = repr(exc)
    return record


def offline_transcript(form: LongForm, cache: Path, model_holder: dict) -> str:
    """faster-whisper beam 5 with its defaults on what the server heard (cached)."""
    key = hashlib.md5(form.audio.astype(np.float32).tobytes()).hexdigest()
    path = cache / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())["text"]
    if "model" not in model_holder:
        from faster_whisper import WhisperModel

        model_holder["model"] = WhisperModel(
            resolve_model_path("tiny.en"), compute_type="int8", cpu_threads=2
        )
    segments, _ = model_holder["model"].transcribe(form.audio, beam_size=5)
    text = " ".join(s.text.strip() for s in segments)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"form": form.name, "text": text}))
    return text


def lost_clips(form: LongForm, streamed: Streamed, margin: float = 0.2) -> list[str]:
    words = [w for final in streamed.finals for w in final.words]
    return [
        clip.name
        for clip in form.clips
        if not any(end > clip.start - margin and start < clip.end + margin for start, end in words)
    ]


def clip_latencies(form: LongForm, streamed: Streamed) -> tuple[list[float], list[float]]:
    """Per clip: last final covering it minus its end; per final: arrival minus last word end."""
    clip_end, word_end = [], []
    for clip in form.clips:
        covering = [
            f for f in streamed.finals if any(clip.start - 0.2 < s < clip.end + 0.2 for s, _ in f.words)
        ]
        if covering:
            clip_end.append(max(f.arrival for f in covering) - clip.end)
    word_end = [f.arrival - f.words[-1][1] for f in streamed.finals if f.words]
    return clip_end, word_end


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    return jiwer.wer([normalize(r) for r in references], [normalize(h) or "<empty>" for h in hypotheses])


def measured_audio(form: LongForm) -> tuple[object, list]:
    """The stream summary and per-utterance ``AudioQuality`` the server computes for the
    long-form: its wire bytes decoded and segmented as a stream, in 100 ms chunks."""
    decoder = AudioDecoder(form.encoding, form.sample_rate)
    recognizer = StreamingRecognizer(StreamingOptions(), full_scale(form.encoding))
    chunk = form.sample_rate * (2 if form.encoding == stt_pb2.LINEAR16 else 1) // 10
    events = []
    for part in chunk_bytes(form.wire, chunk):
        events += recognizer.accept(decoder.decode(part))
    events += recognizer.accept(decoder.flush()) + recognizer.finish()
    return recognizer.meter.stream_summary(), [
        e.audio_quality for e in events if isinstance(e, UtteranceEnded)
    ]


def audio_row(forms: list[LongForm]) -> dict:
    """Medians over the long-forms of their stream measures, and the share of utterances
    flagged for each condition."""
    summaries, utterances = [], []
    for form in forms:
        summary, parts = measured_audio(form)
        summaries.append(summary)
        utterances += [(q, form.sample_rate) for q in parts]

    def median(name: str) -> float | None:
        values = [getattr(q, name) for q in summaries if getattr(q, name) is not None]
        return float(np.median(values)) if values else None

    flagged = {}
    for quality, rate in utterances:
        for condition in quality.conditions(rate):
            flagged[condition] = flagged.get(condition, 0) + 1
    return {
        "speech_level_dbfs": median("speech_level"),
        "noise_level_dbfs": median("noise_level"),
        "snr_db": median("snr"),
        "peak_level_dbfs": median("peak_level"),
        "clipped_share": median("clipped_share"),
        "bandwidth_hz": median("bandwidth"),
        "vad_uncertain_share": median("vad_uncertain_share"),
        "utterances": len(utterances),
        "flagged_share": {k: v / max(1, len(utterances)) for k, v in sorted(flagged.items())},
    }


def run_condition(condition: str, target: str, pid: int, args, model_holder: dict) -> dict:
    forms = build(condition)
    cpu_before = cpu_seconds(pid)
    with ThreadPoolExecutor(args.streams) as pool:
        streamed = list(pool.map(lambda f: stream_form(target, f, args.speed, {}), forms))
    cpu = cpu_seconds(pid) - cpu_before
    offline = [offline_transcript(form, args.offline_cache, model_holder) for form in forms]
    references = [form.transcript for form in forms]
    hypotheses = [" ".join(f.text for f in s.finals) for s in streamed]
    lost = {form.name: lost_clips(form, s) for form, s in zip(forms, streamed)}
    repeats = [
        phrase
        for form, s in zip(forms, streamed)
        for phrase in words_said_twice([f.text for f in s.finals], form.transcript)
    ]
    clip_end, word_end = [], []
    for form, s in zip(forms, streamed):
        a, b = clip_latencies(form, s)
        clip_end += a
        word_end += b
    offline_lost = [
        form.name for form, text in zip(forms, offline) if not text.strip()
    ]  # a whole long-form without text
    audio_seconds = sum(form.seconds for form in forms)
    row = {
        "condition": condition,
        "forms": len(forms),
        "clips": sum(len(form.clips) for form in forms),
        "audio_seconds": audio_seconds,
        "lost": sum(len(v) for v in lost.values()),
        "lost_clips": {k: v for k, v in lost.items() if v},
        "errors": [s.error for s in streamed if s.error],
        "wer_streaming": corpus_wer(references, hypotheses),
        "wer_offline": corpus_wer(references, offline),
        "cpu_per_audio_second": cpu / audio_seconds,
        "offline_forms_without_text": offline_lost,
        "duplicated_words": sum(len(phrase.split()) for phrase in repeats),
        "duplicated_phrases": repeats[:20],
        "audio": audio_row(forms),
    }
    if args.speed == 1:
        row.update(
            clip_end_latency_p50=percentile(clip_end, 50),
            clip_end_latency_p95=percentile(clip_end, 95),
            word_end_latency_p50=percentile(word_end, 50),
            word_end_latency_p95=percentile(word_end, 95),
        )
    if args.show_text:
        row["text"] = [
            {"form": f.name, "reference": r, "streaming": h, "offline": o}
            for f, r, h, o in zip(forms, references, hypotheses, offline)
        ]
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| condition | long-forms / clips / audio | clips lost | WER streaming | WER offline | "
        "final after clip end p50 / p95 (s) | final after last word p50 / p95 (s) | words said twice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['condition']} | {r['forms']} / {r['clips']} / {r['audio_seconds'] / 60:.1f} min | "
            f"{r['lost']} | "
            f"{100 * r['wer_streaming']:.2f}% | {100 * r['wer_offline']:.2f}% | "
            f"{fmt(r.get('clip_end_latency_p50'))} / {fmt(r.get('clip_end_latency_p95'))} | "
            f"{fmt(r.get('word_end_latency_p50'))} / {fmt(r.get('word_end_latency_p95'))} | "
            f"{r.get('duplicated_words', '-')} |"
        )
    return "\n".join(lines)


def audio_markdown(rows: list[dict]) -> str:
    """The measured audio of each set beside its WER."""
    lines = [
        "| condition | speech level (dBFS) | noise floor (dBFS) | SNR (dB) | peak (dBFS) | clipped | "
        "bandwidth (kHz) | VAD unsure | utterances flagged | WER streaming | WER offline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["audio"]
        flagged = ", ".join(f"{k} {100 * v:.0f}%" for k, v in a["flagged_share"].items()) or "none"
        wer = (
            (f"{100 * r['wer_streaming']:.2f}%", f"{100 * r['wer_offline']:.2f}%")
            if "wer_streaming" in r
            else ("-", "-")
        )
        lines.append(
            f"| {r['condition']} | {fmt(a['speech_level_dbfs'], 1)} | {fmt(a['noise_level_dbfs'], 1)} | "
            f"{fmt(a['snr_db'], 1)} | {fmt(a['peak_level_dbfs'], 1)} | {100 * a['clipped_share']:.3f}% | "
            f"{a['bandwidth_hz'] / 1000:.1f} | {100 * a['vad_uncertain_share']:.1f}% | {flagged} of "
            f"{a['utterances']} | {wer[0]} | {wer[1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--streams", type=int, default=8, help="long-forms streamed at once")
    parser.add_argument("--speed", type=float, default=1.0, help="times real time (latency only at 1)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--show-text", action="store_true", help="keep every transcript in the JSON")
    parser.add_argument(
        "--offline-cache",
        type=Path,
        default=REPO / "bench" / "results" / "offline-cache",
        help="offline transcripts",
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra `stt-engine serve` argument, repeatable"
    )
    parser.add_argument(
        "--audio-only", action="store_true", help="only the measured audio of each set, no server"
    )
    args = parser.parse_args()
    if args.audio_only:
        rows = [{"condition": c, "audio": audio_row(build(c))} for c in args.conditions]
        print(json.dumps(rows, indent=2))
        print(audio_markdown(rows))
        return
    target = "127.0.0.1:50190"
    server = start_server(target, "--max-streams", "64", *args.server_arg, env={"OTEL_SDK_DISABLED": "true"})
    rows, model_holder = [], {}
    try:
        for condition in args.conditions:
            row = run_condition(condition, target, server.pid, args, model_holder)
            rows.append(row)
            summary = {k: v for k, v in row.items() if k != "text"}
            print(json.dumps(summary), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robustness.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    print()
    print(audio_markdown(rows))


if __name__ == "__main__":
    main()
