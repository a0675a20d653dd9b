"""Streaming benchmark: N concurrent real-time gRPC streams against offline faster-whisper.

Long-form audio is the clips of ../shared/audio joined with pauses (looped to
--minutes when asked). Every stream sends it at real-time pace in 100 ms chunks, each
chunk leaving when its last sample has been spoken, as from a microphone. Ground truth
is where each clip starts and ends in the joined audio, independent of the server's VAD.

Streams are independent speakers: stream i starts its long-form at clip i (the audio is
rotated, so every stream sends the same speech but no two reach a pause at the same moment).
``--synchronized`` sends every stream the same audio in phase, the worst case, in which every
stream's utterances end together and their finals queue behind each other.

Figures, per stream and clip or final:
- final latency from the last word: arrival of a final minus the end offset of its last
  word (word offsets are requested), the definition whisper_streaming's paper uses;
- final latency from the clip end: arrival of a clip's last final minus the clip's end
  (the endpoint silence counts);
- first result: arrival of a clip's first interim or final minus the clip's start;
- WER: the whole streamed transcript (every final, in order) against the whole
  reference, scored exactly as the offline transcript is;
- CPU: the server process's user+system seconds per second of audio of admitted streams;
- words said twice at piece joins (``words_said_twice``), per run: 0 expected;
- with ``--telemetry``, the server's own latency breakdown of every final (the ``stt.utterance``
  spans it exports, ``latency_breakdown``): p50 / p95 of the endpoint wait, queue wait, decode
  time, ordering wait and the decode time hidden before the endpoint, overall, by utterance
  length class and by endpoint reason. Its latency starts when the audio of the speech end (as
  the server's VAD places it) arrives, so it is shorter than the figures above, which start at
  the last word's end as the client sees it and include the trip back.
Offline faster-whisper (beam 5, same model, same threads, warmed up like the server) on the
same audio, in the same run, is the reference line.

    python bench/streaming.py --streams 1 4 --out bench/results
"""

from __future__ import annotations

import argparse
import csv
import difflib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.audio import read_audio_file  # noqa: E402
from engine.client import SpeechClient, StreamConfig, audio_requests  # noqa: E402
from engine.model import resolve_model_path  # noqa: E402
from otel.instruments import LENGTH_CLASSES  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Segment:
    start: float
    end: float
    transcript: str


@dataclass
class Final:
    start: float  # audio offsets (s)
    end: float
    arrival: float  # seconds after the stream's audio offset 0 was spoken
    text: str
    last_word_end: float | None  # audio offset of its last word's end


@dataclass
class StreamRecord:
    finals: list[Final] = field(default_factory=list)
    results: list[tuple[float, float]] = field(default_factory=list)  # start offset, arrival
    error: str | None = None
    wall: float = 0.0


def long_form(audio_dir: Path, pause: float, minutes: float) -> tuple[np.ndarray, list[Segment]]:
    with (audio_dir / "manifest.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    gap = np.zeros(int(pause * 16000), np.float32)
    parts, segments, cursor = [gap], [], pause
    while True:
        for row in rows:
            clip = read_audio_file(audio_dir / row["file"])
            segments.append(Segment(cursor, cursor + len(clip) / 16000, row["transcript"]))
            parts += [clip, gap]
            cursor += len(clip) / 16000 + pause
        if cursor >= minutes * 60:
            break
    return np.concatenate(parts), segments


def continuous_form(tempo: float = 0.8) -> tuple[np.ndarray, list[Segment]]:
    """Continuous speech: the clips of ../shared/audio trimmed of their edge silence and joined
    with 0.2-0.4 s of room noise into over 60 s (``bench.audio_sets.continuous_set``), then
    slowed with sox ``tempo`` (pauses too: 0.25-0.5 s), as a fluent, unhurried talker."""
    from bench.audio_sets import continuous_set, short_clips, sox

    form = continuous_set(short_clips(), forms=1)[0]
    audio = sox(form.audio, "tempo", "-s", str(tempo))
    scale = len(audio) / len(form.audio)
    return audio, [Segment(c.start * scale, c.end * scale, c.transcript) for c in form.clips]


def rotate(audio: np.ndarray, segments: list[Segment], clip: int) -> tuple[np.ndarray, list[Segment]]:
    """The long-form starting in the pause before ``clip``; what came before it follows at
    the end. The two pause halves that meet at the join make one pause."""
    if clip % len(segments) == 0:
        return audio, segments
    first = segments[clip % len(segments)]
    before = segments[clip % len(segments) - 1]
    cut_seconds = (before.end + first.start) / 2  # the middle of the pause before it
    cut, total = round(cut_seconds * 16000), len(audio) / 16000
    rotated = np.concatenate([audio[cut:], audio[:cut]])
    moved = [
        Segment(
            s.start - cut_seconds if s.start >= cut_seconds else s.start + total - cut_seconds,
            s.end - cut_seconds if s.start >= cut_seconds else s.end + total - cut_seconds,
            s.transcript,
        )
        for s in segments
    ]
    return rotated, sorted(moved, key=lambda s: s.start)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def seconds(value) -> float:
    return value.ToTimedelta().total_seconds()


def run_stream(
    target: str,
    audio: np.ndarray,
    record: StreamRecord,
    words: bool = True,
    token: str | None = None,
    cancel: threading.Event | None = None,
    api: str = "stt",
) -> None:
    """``token``: a bearer token for the call; ``cancel``: cancels the stream when set;
    ``api``: the API the stream speaks (stt, google or riva), with the same audio and settings."""
    if api != "stt":
        run_translated_stream(target, audio, record, words, api)
        return
    config = StreamConfig(enable_word_time_offsets=words)
    with SpeechClient(target, token=token) as client:
        started = time.monotonic()  # offset 0 of the audio is spoken now
        call = client.stream_audio(audio, config, realtime=True, started=started)
        if cancel is not None:
            threading.Thread(target=lambda: cancel.wait() and call.cancel(), daemon=True).start()
        try:
            for response in call:
                at = time.monotonic() - started
                if not response.HasField("result"):
                    continue
                result = response.result
                start = result.result_start_offset.ToTimedelta().total_seconds()
                record.results.append((start, at))
                if result.is_final:
                    best = result.alternatives[0]
                    end = result.result_end_offset.ToTimedelta().total_seconds()
                    last_word = seconds(best.words[-1].end_offset) if best.words else None
                    record.finals.append(Final(start, end, at, best.transcript, last_word))
        except Exception as exc:  # recorded, counted as an error
            record.error = repr(exc)
        record.wall = time.monotonic() - started


def run_translated_stream(
    target: str, audio: np.ndarray, record: StreamRecord, words: bool, api: str
) -> None:
    """One real-time stream through Google's or Riva's API, with the messages their clients send.
    Neither API gives a result's start offset, so a final's start is its first word's, and
    there is no first-result figure."""
    if api == "google":
        from google.cloud.speech_v1 import types as google

        encoding = google.RecognitionConfig.AudioEncoding.LINEAR16
        config = google.RecognitionConfig.pb()(
            encoding=encoding, sample_rate_hertz=16000, language_code="en-US",
            enable_automatic_punctuation=True, enable_word_time_offsets=words,
        )  # fmt: skip
        first = google.StreamingRecognitionConfig.pb()(config=config, interim_results=True)
        Request, Response = google.StreamingRecognizeRequest.pb(), google.StreamingRecognizeResponse.pb()
        method = "/google.cloud.speech.v1.Speech/StreamingRecognize"
    else:
        from riva.client.proto import riva_asr_pb2 as riva
        from riva.client.proto import riva_audio_pb2

        config = riva.RecognitionConfig(
            encoding=riva_audio_pb2.LINEAR_PCM, sample_rate_hertz=16000, language_code="en-US",
            enable_automatic_punctuation=True, enable_word_time_offsets=words,
        )  # fmt: skip
        first = riva.StreamingRecognitionConfig(config=config, interim_results=True)
        Request, Response = riva.StreamingRecognizeRequest, riva.StreamingRecognizeResponse
        method = "/nvidia.riva.asr.RivaSpeechRecognition/StreamingRecognize"
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            method, request_serializer=Request.SerializeToString, response_deserializer=Response.FromString
        )
        started = time.monotonic()
        requests = itertools.chain(
            [Request(streaming_config=first)],
            (Request(audio_content=r.audio_content) for r in audio_requests(audio, 100, True, started)),
        )
        try:
            for response in call(requests):
                at = time.monotonic() - started
                for result in response.results:
                    if not result.is_final or not result.alternatives:
                        continue
                    best = result.alternatives[0]
                    if api == "google":
                        span = [(seconds(w.start_time), seconds(w.end_time)) for w in best.words]
                    else:
                        span = [(w.start_time / 1000, w.end_time / 1000) for w in best.words]
                    start = span[0][0] if span else 0.0
                    last_word = span[-1][1] if span else None
                    record.finals.append(Final(start, last_word or start, at, best.transcript, last_word))
        except Exception as exc:  # recorded, counted as an error
            record.error = repr(exc)
        record.wall = time.monotonic() - started


def is_refused(record: StreamRecord) -> bool:
    return record.error is not None and "RESOURCE_EXHAUSTED" in record.error


def score(records: list[StreamRecord], forms: list[list[Segment]]) -> dict:
    """Figures over the admitted streams; ``forms[i]`` is where record i's clips are."""
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    clip_end_latencies, word_latencies, first_results, references, hypotheses = [], [], [], [], []
    admitted = [(r, f) for r, f in zip(records, forms) if not is_refused(r)]
    repeats = []
    for record, segments in admitted:
        reference = " ".join(seg.transcript for seg in segments)
        references.append(normalize(reference))
        hypotheses.append(normalize(" ".join(f.text for f in record.finals)))
        repeats += words_said_twice([f.text for f in record.finals], reference)
        word_latencies += [f.arrival - f.last_word_end for f in record.finals if f.last_word_end is not None]
        for seg in segments:
            mine = [f for f in record.finals if seg.start - 0.5 <= f.start < seg.end]
            if mine:
                clip_end_latencies.append(max(f.arrival for f in mine) - seg.end)
            early = [at - seg.start for start, at in record.results if seg.start - 0.5 <= start < seg.end]
            if early:
                first_results.append(min(early))
    refused = [r for r in records if is_refused(r)]
    return {
        "wer": jiwer.wer(references, hypotheses) if hypotheses else None,
        "word_latency_p50": percentile(word_latencies, 50),
        "word_latency_p95": percentile(word_latencies, 95),
        "word_latency_max": max(word_latencies, default=None),
        "final_latency_p50": percentile(clip_end_latencies, 50),
        "final_latency_p95": percentile(clip_end_latencies, 95),
        "first_result_p50": percentile(first_results, 50),
        "first_result_p95": percentile(first_results, 95),
        "admitted": len(admitted),
        "errors": sum(r.error is not None for r, _ in admitted),
        "refused": len(refused),
        "refused_within_s": max((r.wall for r in refused), default=None),
        "behind_real_time": sum(r.wall > len_seconds(segments) + 5 for r, segments in admitted),
        "duplicated_words": sum(len(phrase.split()) for phrase in repeats),
        "duplicated_phrases": repeats[:20],
    }


def words_said_twice(finals: list[str], reference: str) -> list[str]:
    """The words a stream said twice where one final ends and the next begins.

    Both sides are normalised with Whisper's English normaliser and split into words. For
    each pair of consecutive non-empty finals A, B of a stream, take the largest k in 3, 2, 1
    for which A's last k words equal B's first k words. That is a repeat of k words unless
    the reference says them twice at that point: the finals' words, joined in order, are
    aligned to the reference's words (``difflib``, longest matching blocks), and the
    reference holds the doubled phrase (the k words, then the same k words) starting within
    2k + 3 words of where the join falls. Returns the repeated phrase of every repeat
    counted; the figure reported is the number of words in them.
    """
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    pieces = [words for words in (normalize(text).split() for text in finals) if words]
    said = [word for words in pieces for word in words]
    heard = normalize(reference).split()
    blocks = difflib.SequenceMatcher(None, said, heard, autojunk=False).get_matching_blocks()
    repeats, join = [], 0
    for before, after in zip(pieces, pieces[1:]):
        join += len(before)
        size = next(
            (k for k in (3, 2, 1) if len(before) >= k and len(after) >= k and before[-k:] == after[:k]), 0
        )
        if not size:
            continue
        doubled = after[:size] * 2
        at = _aligned(blocks, join)
        starts = range(max(0, at - 2 * size - 3), at + 4)
        if not any(heard[i : i + 2 * size] == doubled for i in starts):
            repeats.append(" ".join(after[:size]))
    return repeats


def _aligned(blocks, index: int) -> int:
    """The reference position that word ``index`` of the transcript aligns with."""
    position = 0
    for block in blocks:
        if block.a > index:
            break
        position = block.b + min(index - block.a, block.size)
    return position


def span_attributes(span) -> dict:
    """An OTLP span's attributes as a dict of plain values."""
    values = {}
    for pair in span.attributes:
        kind = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, kind) if kind else None
    return values


BREAKDOWN_PARTS = {
    "latency": "stt.final.latency",
    "endpoint_wait": "stt.final.endpoint_wait",
    "queue_wait": "stt.final.queue_wait",
    "decode": "stt.final.decode_duration",
    "ordering_wait": "stt.final.ordering_wait",
    "hidden_decode": "stt.final.hidden_decode_duration",
}


def latency_breakdown(spans) -> dict:
    """p50 / p95 of each part of the server's final latency, from the ``stt.utterance`` spans
    of finals: overall, by ``stt.utterance.length_class`` and by endpoint reason."""
    finals = [a for a in map(span_attributes, spans) if "stt.final.latency" in a]

    def stats(group: list[dict]) -> dict:
        figures: dict = {
            "finals": len(group),
            "speculative_share": sum(a["stt.final.speculative"] for a in group) / len(group),
        }
        for part, key in BREAKDOWN_PARTS.items():
            values = [a[key] for a in group]
            figures[part] = {"p50": percentile(values, 50), "p95": percentile(values, 95)}
        return figures

    def grouped(key: str, order: list[str] | None = None) -> dict:
        present = {a[key] for a in finals}
        names = [n for n in order or [] if n in present] + sorted(present - set(order or []))
        return {name: stats([a for a in finals if a[key] == name]) for name in names}

    if not finals:
        return {"overall": None, "by_length_class": {}, "by_endpoint_reason": {}}
    return {
        "overall": stats(finals),
        "by_length_class": grouped("stt.utterance.length_class", [name for name, _ in LENGTH_CLASSES]),
        "by_endpoint_reason": grouped("stt.utterance.endpoint_reason"),
    }


def early_endpoints(spans, silence: float = 0.7, pre_roll: float = 0.3) -> dict:
    """How often speech resumed after a confident early final: utterances that ended by a
    ``confident`` final, and how many of them the next utterance of the same stream followed
    within ``silence`` (the endpoint silence) of their speech end, so that without the early
    final they would have been one utterance. An utterance's ``start_offset`` is its audio's,
    ``pre_roll`` before its speech."""
    streams: dict[bytes, list[dict]] = {}
    for span in spans:
        if span.name == "stt.utterance":
            streams.setdefault(span.trace_id, []).append(span_attributes(span))
    confident = resumed = 0
    for utterances in streams.values():
        utterances.sort(key=lambda a: a.get("stt.utterance.start_offset", 0.0))
        for this, after in zip(utterances, utterances[1:] + [None]):
            if this.get("stt.utterance.endpoint_reason") != "confident":
                continue
            confident += 1
            onset = after["stt.utterance.start_offset"] + pre_roll if after else None
            resumed += onset is not None and onset - this["stt.utterance.speech_end_offset"] < silence
    return {"confident": confident, "resumed_within_endpoint": resumed}


def len_seconds(segments: list[Segment]) -> float:
    return segments[-1].end


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def offline_reference(
    audio: np.ndarray, reference_text: str, threads: int, words: bool, runs: int = 3
) -> dict:
    """Offline faster-whisper, beam 5, on the same audio: CPU per audio second (median of
    ``runs``, after a warm-up decode as the server does before SERVING) and WER. With
    ``words`` it aligns words too, as the streams asked the server to: the same output."""
    import jiwer
    from faster_whisper import WhisperModel
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    model = WhisperModel(resolve_model_path("tiny.en"), compute_type="int8", cpu_threads=threads)
    warm = (0.01 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    list(model.transcribe(warm, beam_size=5)[0])
    costs = []
    for _ in range(runs):
        started = time.process_time()
        segments, _ = model.transcribe(audio, beam_size=5, word_timestamps=words)
        text = " ".join(s.text for s in segments)
        costs.append(time.process_time() - started)
    return {
        "cpu_per_audio_second": float(np.median(costs)) / (len(audio) / 16000),
        "wer": jiwer.wer(normalize(reference_text), normalize(text)),
        "text": text,
    }


def start_server(
    target: str, *args: str, env: dict | None = None, repo: Path = REPO, log: Path | None = None
) -> subprocess.Popen:
    """``stt-engine serve`` on ``target`` in a subprocess, returned once health reports SERVING.
    ``repo``: the checkout whose code serves (``python -m engine`` imports it from its working
    directory), so one bench measures two versions; ``log``: a file for its stdout and stderr."""
    output = log.open("wb") if log else None
    server = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--address", target, "--log-level", "WARNING", *args],
        cwd=repo,
        env={**os.environ, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT if output else None,
    )
    if output:
        output.close()  # the server holds its own copy
    try:
        with SpeechClient(target) as client:
            client.wait_until_serving(120)
    except BaseException:
        server.kill()
        raise
    return server


def bench_server(audio, segments, streams: int, args, api: str = "stt") -> dict:
    port = 50200 + streams
    target = f"127.0.0.1:{port}"
    env = {"OTEL_SDK_DISABLED": "true"}
    if args.telemetry:  # export everything to a real OTLP receiver in this process
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": args.receiver.endpoint}
    max_streams = str(args.max_streams or max(streams, 32))
    spans_before = len(args.receiver.spans()) if args.telemetry else 0
    server = start_server(
        target,
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
        "--max-streams",
        max_streams,
        *args.server_arg,
        env=env,
    )
    try:
        rss = [(0.0, rss_mb(server.pid))]
        cpu_before = cpu_seconds(server.pid)
        records = [StreamRecord() for _ in range(streams)]
        forms = [
            (audio, segments) if args.synchronized else rotate(audio, segments, i) for i in range(streams)
        ]
        threads = [
            threading.Thread(target=run_stream, args=(target, form, r, args.words), kwargs={"api": api})
            for r, (form, _) in zip(records, forms)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            rss.append((time.monotonic() - started, rss_mb(server.pid)))
        cpu = cpu_seconds(server.pid) - cpu_before
    finally:
        server.terminate()
        server.wait(timeout=60)  # its telemetry is flushed before it exits
    result = score(records, [segs for _, segs in forms])
    if args.telemetry:
        spans = args.receiver.spans()[spans_before:]
        result["latency_breakdown"] = latency_breakdown(spans)
        result["early_endpoints"] = early_endpoints(spans)
    audio_seconds = result["admitted"] * len(audio) / 16000  # refused streams sent nothing
    result.update(
        streams=streams,
        api=api,
        cpu_per_audio_second=cpu / audio_seconds,
        rss_start_mb=rss[0][1],
        rss_end_mb=rss[-1][1],
        rss_max_mb=max(r for _, r in rss),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--minutes", type=float, default=0.0, help="loop the clips to this length")
    parser.add_argument("--pause", type=float, default=1.5)
    parser.add_argument(
        "--audio-set",
        choices=("joined", "continuous"),
        default="joined",
        help="joined: the clips with --pause between them; continuous: 60 s of speech with "
        "0.25-0.5 s pauses, slowed to tempo 0.8",
    )
    parser.add_argument(
        "--api",
        nargs="+",
        choices=("stt", "google", "riva"),
        default=["stt"],
        help="the API the streams speak: stt.v1, Google Cloud Speech v1, Riva (same audio and settings); "
        "several: each in turn at every stream count, side by side",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each API at every stream count")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--telemetry",
        action="store_true",
        help="server exports OTLP to a receiver here (default: OTEL_SDK_DISABLED)",
    )
    parser.add_argument("--plot", action="store_true", help="write latency_vs_streams.png")
    parser.add_argument(
        "--synchronized",
        action="store_true",
        help="every stream sends the same audio in phase (worst case) instead of starting at its own clip",
    )
    parser.add_argument(
        "--max-streams",
        type=int,
        default=None,
        help="server admission limit (overload: the rest are refused)",
    )
    parser.add_argument(
        "--no-words",
        dest="words",
        action="store_false",
        help="do not request word offsets (no word-end latency; finals skip word alignment)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `stt-engine serve` argument, repeatable (e.g. --server-arg=--speculative-final-ms=0)",
    )
    args = parser.parse_args()
    if args.telemetry:
        from tests.otlp_receiver import OtlpReceiver

        args.receiver = OtlpReceiver().start()

    if args.audio_set == "continuous":
        audio, segments = continuous_form()
    else:
        audio, segments = long_form(args.audio_dir, args.pause, args.minutes)
    print(f"{args.audio_set} audio: {len(audio) / 16000:.1f} s, {len(segments)} clips", flush=True)
    reference_text = " ".join(seg.transcript for seg in segments)
    offline = offline_reference(audio, reference_text, args.workers * args.threads, args.words)
    print(f"offline faster-whisper beam 5: {json.dumps(offline)}", flush=True)
    rows = []
    for streams in args.streams:
        for _ in range(args.rounds):
            for api in args.api:  # interleaved, so each API sees the machine's same moods
                row = bench_server(audio, segments, streams, args, api)
                row["cpu_ratio_vs_offline"] = row["cpu_per_audio_second"] / offline["cpu_per_audio_second"]
                row["wer_delta_points"] = 100 * (row["wer"] - offline["wer"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # Both latency definitions within 1.5 s at p95, no errors, nobody behind real time.
    capacity = max(
        (
            r["streams"]
            for r in rows
            if r["errors"] == 0
            and r["behind_real_time"] == 0
            and max(r["final_latency_p95"] or 99, r["word_latency_p95"] or 0) <= 1.5
        ),
        default=0,
    )
    suffix = "" if args.audio_set == "joined" else f"-{args.audio_set}"
    (args.out / f"streaming{suffix}.json").write_text(
        json.dumps({"offline": offline, "runs": rows, "capacity": capacity}, indent=2)
    )
    print(markdown(offline, rows))
    if len(args.api) > 1:
        print("\n" + api_markdown(rows))
    if args.telemetry:
        print("\nWhere the server's final latency went (stt.utterance spans):\n")
        print(breakdown_markdown(rows))
        for r in rows:
            print(f"{r['streams']} streams, confident early finals: {r['early_endpoints']}")
    print(f"\ncapacity: {capacity} real-time streams, p95 final latency <= 1.5 s by both definitions")
    if args.plot:
        plot(rows, args.out / f"latency_vs_streams{suffix}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = [r["streams"] for r in rows]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(streams, [r["word_latency_p50"] for r in rows], "o-", label="final after last word p50")
    axis.plot(streams, [r["word_latency_p95"] for r in rows], "s-", label="final after last word p95")
    axis.plot(streams, [r["final_latency_p95"] for r in rows], "s--", label="final after clip end p95")
    axis.plot(streams, [r["first_result_p50"] for r in rows], "^-", label="first result p50")
    axis.axhline(1.5, color="grey", linestyle="--", label="p95 target 1.5 s")
    axis.set_xlabel("concurrent real-time streams")
    axis.set_ylabel("seconds")
    axis.set_title("stt-engine on 2 CPU cores, tiny.en int8")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def api_markdown(rows: list[dict]) -> str:
    """Medians over the rounds of each API at each stream count, and their ratio to stt.v1."""
    lines = [
        "| streams | api | rounds | final after last word p50 / p95 (s) | CPU-s per audio-s | "
        "CPU vs stt | p95 vs stt | WER % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for streams in sorted({r["streams"] for r in rows}):
        medians = {}
        for api in dict.fromkeys(r["api"] for r in rows):
            mine = [r for r in rows if r["streams"] == streams and r["api"] == api]
            medians[api] = {
                key: float(np.median([r[key] for r in mine if r[key] is not None] or [np.nan]))
                for key in ("word_latency_p50", "word_latency_p95", "cpu_per_audio_second", "wer")
            } | {"rounds": len(mine)}
        base = medians.get("stt")
        for api, m in medians.items():
            cpu_ratio = f"{m['cpu_per_audio_second'] / base['cpu_per_audio_second']:.3f}" if base else "-"
            p95_ratio = f"{m['word_latency_p95'] / base['word_latency_p95']:.3f}" if base else "-"
            lines.append(
                f"| {streams} | {api} | {m['rounds']} | {fmt(m['word_latency_p50'])} / "
                f"{fmt(m['word_latency_p95'])} | {m['cpu_per_audio_second']:.4f} | {cpu_ratio} | "
                f"{p95_ratio} | {100 * m['wer']:.2f} |"
            )
    return "\n".join(lines)


def markdown(offline: dict, rows: list[dict]) -> str:
    lines = [
        f"Offline faster-whisper beam 5: {offline['cpu_per_audio_second']:.3f} CPU-s per audio-s, "
        f"WER {100 * offline['wer']:.2f}%",
        "",
        "| streams | final after last word p50 / p95 / max (s) | final after clip end p50 / p95 (s) | "
        "first result p50 (s) | CPU-s per audio-s | "
        "vs offline | WER % | WER delta (points) | errors / refused | RSS start / max (MB) | "
        "words said twice |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['streams']}{'' if r.get('api', 'stt') == 'stt' else ' (' + r['api'] + ')'} | "
            f"{fmt(r['word_latency_p50'])} / {fmt(r['word_latency_p95'])} / "
            f"{fmt(r.get('word_latency_max'))} | "
            f"{fmt(r['final_latency_p50'])} / {fmt(r['final_latency_p95'])} | "
            f"{fmt(r['first_result_p50'])} | {r['cpu_per_audio_second']:.3f} | "
            f"{r['cpu_ratio_vs_offline']:.2f}x | {100 * r['wer']:.2f} | {r['wer_delta_points']:+.2f} | "
            f"{r['errors']} / {r.get('refused', 0)} | {r['rss_start_mb']:.0f} / {r['rss_max_mb']:.0f} | "
            f"{r.get('duplicated_words', '-')} |"
        )
    return "\n".join(lines)


def breakdown_markdown(rows: list[dict]) -> str:
    """One line per run and group (all finals, each length class, each endpoint reason):
    p50 / p95 of every part of the final latency, in seconds."""
    parts = list(BREAKDOWN_PARTS)
    header = " | ".join(f"{part.replace('_', ' ')} p50 / p95" for part in parts)
    lines = [
        f"| streams | finals of | count | speculative | {header} |",
        "|---|---|---|---|" + "---|" * len(parts),
    ]
    for r in rows:
        breakdown = r.get("latency_breakdown") or {}
        groups = [("all", breakdown.get("overall"))]
        groups += list((breakdown.get("by_length_class") or {}).items())
        groups += [(f"ended by {k}", v) for k, v in (breakdown.get("by_endpoint_reason") or {}).items()]
        for name, figures in groups:
            if not figures:
                continue
            cells = " | ".join(f"{fmt(figures[p]['p50'])} / {fmt(figures[p]['p95'])}" for p in parts)
            lines.append(
                f"| {r['streams']} | {name} | {figures['finals']} | "
                f"{100 * figures['speculative_share']:.0f}% | {cells} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
