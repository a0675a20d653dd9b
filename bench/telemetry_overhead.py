"""Telemetry overhead: server CPU per audio second with OTLP export on vs OTEL_SDK_DISABLED.

Both configurations serve the same audio (the clips of ../shared/audio joined with
pauses) to the same number of concurrent streams, alternating on/off within one
run so machine noise hits both alike; the median over runs is reported. A
microbenchmark then times the per-chunk telemetry call (one chunk span, its
metrics) in microseconds, enabled vs disabled.

The input-audio and recognition-quality measures (``engine.quality``, ``otel.quality``) run
whether telemetry is on or not, so the on/off runs cannot show them; they are timed apart,
in CPU time: the audio meter inside the real recognizer over the same audio (per audio
second), and the quality telemetry of one utterance (span attributes, histograms, counters,
its log record, exported to a real OTLP receiver) against the same utterance without it.
Their sum per audio second is reported against the engine's CPU per audio second.

    python bench/telemetry_overhead.py --runs 3 --streams 2 --speed 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.streaming import cpu_seconds, long_form, start_server  # noqa: E402
from engine import __version__  # noqa: E402
from engine.api import stt_pb2  # noqa: E402
from engine.audio import float_to_linear16  # noqa: E402
from engine.client import SpeechClient, StreamConfig, chunk_bytes, paced  # noqa: E402
from tests.otlp_receiver import OtlpReceiver  # noqa: E402


def serve_and_measure(audio, streams: int, speed: float, env: dict, port: int) -> float:
    """Server CPU seconds per audio second for ``streams`` paced streams."""
    target = f"127.0.0.1:{port}"
    server = start_server(target, env=env)
    try:
        before = cpu_seconds(server.pid)

        def stream() -> None:
            pcm = float_to_linear16(audio)

            def requests():
                yield StreamConfig().first_request()
                # 100 ms chunks, sent every 100 ms / speed
                for chunk in paced(chunk_bytes(pcm, 3200), 0.1 / speed, realtime=True):
                    yield stt_pb2.StreamingRecognizeRequest(audio_content=chunk)

            with SpeechClient(target) as client:
                for _ in client.stream(requests()):
                    pass

        threads = [threading.Thread(target=stream) for _ in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu = cpu_seconds(server.pid) - before
    finally:
        server.terminate()
        server.wait(timeout=60)
    return cpu / (streams * len(audio) / 16000)


def chunk_call_microseconds(enabled: bool, endpoint: str, calls: int = 20000) -> float:
    """Time of one StreamTelemetry.chunk call (span + metrics), in microseconds."""
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(calls * 2)  # measure export, not dropping
    from otel import Telemetry, TelemetryOptions

    options = TelemetryOptions(enabled=enabled, system_metrics=False, max_chunk_spans=calls + 1)
    telemetry = Telemetry(options, __version__)
    stream = telemetry.stream("stt.v1.Speech/StreamingRecognize")
    started = time.perf_counter()
    for index in range(calls):
        stream.chunk(index, 3200, 0.1, index * 0.1, time.time_ns(), index % 2 == 0)
    elapsed = time.perf_counter() - started
    stream.finished("OK")
    telemetry.shutdown()
    return elapsed / calls * 1e6


class CpuTimer:
    """Adds up the CPU time spent in the functions it wraps."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args, **kwargs):
            started = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - started

        return timed


def meter_cpu_per_audio_second(audio, repeats: int = 5) -> tuple[float, int]:
    """CPU seconds the audio meter takes per audio second inside the real recognizer (its
    per-frame figures and each utterance's summary), median of ``repeats``; and the number
    of utterances."""
    from engine.options import StreamingOptions
    from engine.recognizer import StreamingRecognizer, UtteranceEnded

    runs, utterances = [], 0
    for _ in range(repeats):
        recognizer = StreamingRecognizer(StreamingOptions())
        meter, timer = recognizer.meter, CpuTimer()
        meter.process, meter.summary = timer.wrap(meter.process), timer.wrap(meter.summary)
        events = []
        for start in range(0, len(audio), 1600):
            events += recognizer.accept(audio[start : start + 1600])
        events += recognizer.finish()
        utterances = sum(isinstance(e, UtteranceEnded) for e in events)
        runs.append(timer.seconds / (len(audio) / 16000))
    return statistics.median(runs), utterances


def quality_telemetry_us_per_utterance(endpoint: str, utterances: int = 2000) -> float:
    """CPU microseconds the quality telemetry adds to one utterance (attributes, histograms,
    counters, the log record, exported over OTLP): utterances with their measures minus the
    same utterances without, median of three."""
    import logging

    from engine.model import Hypothesis, Word
    from engine.quality import AudioQuality, recognition_quality
    from otel import Telemetry, TelemetryOptions, configure_logging

    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(utterances * 4)
    os.environ["OTEL_BLRP_MAX_QUEUE_SIZE"] = str(utterances * 4)
    audio = AudioQuality(-23.1, -61.7, 38.5, -3.2, 0.0, 0.0001, 0.05, 8000.0, 4.2, 5.1)
    words = [Word("word", 0.1 * i, 0.1 * i + 0.08, 0.9) for i in range(12)]
    recognition = recognition_quality(Hypothesis("text", avg_logprob=-0.2, confidence=0.82, words=words))
    telemetry = Telemetry(TelemetryOptions(system_metrics=False), __version__)
    configure_logging("INFO", logger_provider=telemetry.logger_provider)
    logging.getLogger().handlers[0].setLevel(logging.CRITICAL)  # OTLP only, no console lines

    def run(with_quality: bool) -> float:
        stream = telemetry.stream("stt.v1.Speech/StreamingRecognize")
        stream.configured({"encoding": "LINEAR16", "sample_rate": 16000})
        started = time.process_time()
        for index in range(utterances):
            stream.utterance_started(index, index * 5.0)
            stream.utterance_ended(index, index * 5.0, index * 5.0 + 4, index * 5.0 + 3.8, "silence",
                                   audio if with_quality else None)  # fmt: skip
            stream.utterance_done(index, recognition if with_quality else None)
        elapsed = time.process_time() - started
        stream.finished("OK")
        return elapsed / utterances * 1e6

    differences = [run(True) - run(False) for _ in range(3)]
    telemetry.shutdown()
    return statistics.median(differences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--speed", type=float, default=2.0, help="pace as a multiple of real time")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    audio, _ = long_form(args.audio_dir, 1.5, 0)
    receiver = OtlpReceiver().start()
    on_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "5000"}
    off_env = {"OTEL_SDK_DISABLED": "true"}
    on, off = [], []
    for run in range(args.runs):
        off.append(serve_and_measure(audio, args.streams, args.speed, off_env, 50300 + run))
        on.append(serve_and_measure(audio, args.streams, args.speed, on_env, 50400 + run))
        print(f"run {run + 1}: off {off[-1]:.4f}  on {on[-1]:.4f} CPU-s per audio-s", flush=True)
    spans_received = len(receiver.spans())
    meter_cpu, utterances = meter_cpu_per_audio_second(audio)
    utterance_us = quality_telemetry_us_per_utterance(receiver.endpoint)
    quality_cpu = meter_cpu + utterance_us / 1e6 * utterances / (len(audio) / 16000)
    chunk_on = statistics.median(chunk_call_microseconds(True, receiver.endpoint) for _ in range(3))
    chunk_off = statistics.median(chunk_call_microseconds(False, receiver.endpoint) for _ in range(3))
    receiver.stop()
    result = {
        "audio_seconds": len(audio) / 16000,
        "streams": args.streams,
        "speed": args.speed,
        "cpu_per_audio_second_off": statistics.median(off),
        "cpu_per_audio_second_on": statistics.median(on),
        "overhead_percent": 100 * (statistics.median(on) / statistics.median(off) - 1),
        "runs_off": off,
        "runs_on": on,
        "chunk_call_us_on": chunk_on,
        "chunk_call_us_off": chunk_off,
        "spans_received": spans_received,
        "quality_meter_cpu_per_audio_second": meter_cpu,
        "quality_telemetry_us_per_utterance": utterance_us,
        "utterances": utterances,
        "quality_cpu_per_audio_second": quality_cpu,
        "quality_percent_of_engine_cpu": 100 * quality_cpu / statistics.median(on),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "telemetry_overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
