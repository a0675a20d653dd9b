"""Abuse benchmark: server RSS and a good stream's final latency while each attack runs.

One server with its default limits. A good client streams the long-form (the clips of
../shared/audio joined with 1.5 s pauses) at real-time pace, once alone and then once beside
each attack; the attack runs in background threads for the whole good stream. Reported per
run: the good stream's final latency (after its last word, p50/p95) and WER, and the
server's peak RSS.

    python bench/abuse.py                       # every attack
    python bench/abuse.py --attacks flood idle  # some of them
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.streaming import StreamRecord, long_form, rss_mb, run_stream, score, start_server  # noqa: E402
from engine.api import stt_pb2  # noqa: E402
from engine.audio import float_to_linear16  # noqa: E402
from engine.client import SpeechClient  # noqa: E402

Attack = Callable[[str, threading.Event], None]


def _config(**fields) -> stt_pb2.StreamingRecognizeRequest:
    config = stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16, sample_rate_hertz=16000, **fields)
    return stt_pb2.StreamingRecognizeRequest(
        streaming_config=stt_pb2.StreamingRecognitionConfig(config=config, interim_results=True)
    )


def _call(target: str, requests, stop: threading.Event) -> None:
    """One stream; errors are the point of most attacks, so they are swallowed."""
    with SpeechClient(target) as client:
        call = client.stream(requests, timeout=600)
        watcher = threading.Thread(target=lambda: stop.wait() or call.cancel(), daemon=True)
        watcher.start()
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass


def huge_prompt(target: str, stop: threading.Event) -> None:
    """20 MB prompts, one stream after another (issue 10, defect 1)."""
    prompt = "hot words " * 2_000_000
    while not stop.is_set():
        _call(
            target,
            [_config(prompt=prompt), stt_pb2.StreamingRecognizeRequest(audio_content=b"\0" * 3200)],
            stop,
        )


def long_recognize(target: str, stop: threading.Event) -> None:
    """2.3 h of MULAW in one Recognize, then 280 s of speech-like noise, in a loop (defect 2)."""
    mulaw = stt_pb2.RecognizeRequest(
        config=stt_pb2.RecognitionConfig(encoding=stt_pb2.MULAW, sample_rate_hertz=8000),
        audio_content=b"\x7f" * (8000 * 8280),
    )
    noise = (0.01 * np.random.default_rng(0).standard_normal(16000 * 280)).astype(np.float32)
    long_pcm = stt_pb2.RecognizeRequest(
        config=stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16), audio_content=float_to_linear16(noise)
    )
    with SpeechClient(target) as client:
        while not stop.is_set():
            for request in (mulaw, long_pcm):
                try:
                    client.speech.Recognize(request, timeout=120)
                except grpc.RpcError:
                    pass


def idle(target: str, stop: threading.Event) -> None:
    """Connections that never send a byte, reopened as they time out (defect 3)."""

    def nothing():
        stop.wait()
        yield from ()

    def one():
        while not stop.is_set():
            _call(target, nothing(), stop)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def flood(target: str, stop: threading.Event, audio: np.ndarray | None = None) -> None:
    """Three clients sending 30 minutes of speech as fast as the server reads (defect 4)."""
    data = float_to_linear16(np.tile(audio, int(np.ceil(1800 / (len(audio) / 16000)))))

    def requests():
        yield _config()
        for i in range(0, len(data), 3200):
            if stop.is_set():
                return
            yield stt_pb2.StreamingRecognizeRequest(audio_content=data[i : i + 3200])

    threads = [threading.Thread(target=_call, args=(target, requests(), stop), daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def long_strings(target: str, stop: threading.Event) -> None:
    """10 MB of NULs as the model name and 100 KB language codes, repeated (defect 6)."""
    while not stop.is_set():
        _call(target, [_config(model="\0" * 10_000_000)], stop)
        _call(target, [_config(language_code="x" * 100_000)], stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    attacks: dict[str, Attack] = {
        "huge_prompt": huge_prompt,
        "long_recognize": long_recognize,
        "idle": idle,
        "flood": flood,
        "long_strings": long_strings,
    }
    parser.add_argument("--attacks", nargs="+", choices=list(attacks), default=list(attacks))
    args = parser.parse_args()
    audio, segments = long_form(args.audio_dir, 1.5, 0)
    target = "127.0.0.1:50290"
    server = start_server(target, env={"OTEL_SDK_DISABLED": "true"})
    rows = []
    try:
        for name in ["none", *args.attacks]:
            stop = threading.Event()
            attack = functools.partial(flood, audio=audio) if name == "flood" else attacks.get(name)
            thread = threading.Thread(target=attack, args=(target, stop), daemon=True) if attack else None
            if thread:
                thread.start()
                time.sleep(2)  # the attack is under way before the good stream starts
            record = StreamRecord()
            peak = [rss_mb(server.pid)]
            good = threading.Thread(target=run_stream, args=(target, audio, record))
            good.start()
            while good.is_alive():
                peak.append(rss_mb(server.pid))
                good.join(0.5)
            stop.set()
            if thread:
                thread.join(30)
            result = score([record], [segments])
            row = {
                "attack": name,
                "word_latency_p50": result["word_latency_p50"],
                "word_latency_p95": result["word_latency_p95"],
                "wer": result["wer"],
                "errors": result["errors"],
                "rss_max_mb": max(peak),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    base = rows[0]["word_latency_p95"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abuse.json").write_text(json.dumps(rows, indent=2))
    print(
        "\n| attack | good stream final after last word p50 / p95 (s) | p95 vs alone | WER % | RSS max (MB) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['attack']} | {row['word_latency_p50']:.2f} / {row['word_latency_p95']:.2f} "
            f"| {row['word_latency_p95'] / base:.2f}x | {100 * row['wer']:.2f} | {row['rss_max_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
