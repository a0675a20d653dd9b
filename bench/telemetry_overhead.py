"""Telemetry overhead: server CPU per audio second with OTLP export on vs OTEL_SDK_DISABLED.

Both configurations serve the same audio (the clips of ../shared/audio joined with
pauses) to the same number of concurrent streams, alternating on/off within one
run so machine noise hits both alike; the median over runs is reported. A
microbenchmark then times the per-chunk telemetry call (one chunk span, its
metrics) in microseconds, enabled vs disabled.

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
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "telemetry_overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
