"""Memory: server RSS over one long stream, and across many short streams.

Long stream: the clips of ../shared/audio joined with pauses and looped to
--minutes of audio, sent in 100 ms chunks at --speed times real time (the server
does the same work per audio second; a 30-minute stream takes 3 minutes at 10x).
RSS is sampled against the audio position; the figure of merit is RSS at the end
over RSS after the first minute of audio. Short streams: --short-streams streams
of 3 s of speech each, four at a time; RSS after the first 100 and after all.

    python bench/memory.py --minutes 30 --speed 10 --short-streams 1000
    python bench/memory.py --minutes 0 --short-streams 8000 --allocator jemalloc

--allocator jemalloc preloads libjemalloc (Debian's libjemalloc2) into the server, as the
Dockerfile does; --malloc-conf sets its MALLOC_CONF.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.streaming import CLK_TCK, long_form, rss_mb, start_server  # noqa: E402
from engine.api import stt_pb2  # noqa: E402
from engine.audio import float_to_linear16, read_audio_file  # noqa: E402
from engine.client import SpeechClient, StreamConfig, chunk_bytes, final_transcripts, paced  # noqa: E402


def find_jemalloc() -> str | None:
    """Path of libjemalloc.so.2: the dynamic linker's cache first, then the usual directories."""
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    except OSError:
        cache = ""
    paths = [line.rsplit("=> ", 1)[1] for line in cache.splitlines() if "libjemalloc.so.2 " in line]
    for directory in ("/usr/lib/*", "/usr/lib*", "/usr/local/lib*"):
        paths += sorted(glob.glob(f"{directory}/libjemalloc.so.2"))
    for path in paths:
        if Path(path).is_file():
            return path
    return None


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid``: an allocator that returns memory eagerly pays in
    system time (madvise, then page faults)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def runs_jemalloc(pid: int) -> bool:
    return "/libjemalloc" in Path(f"/proc/{pid}/maps").read_text()


def long_stream(target: str, pid: int, minutes: float, speed: float) -> dict:
    audio, _ = long_form(REPO.parent / "shared" / "audio", 1.5, minutes)
    pcm = float_to_linear16(audio)
    position = [0.0]
    samples: list[tuple[float, float]] = []
    finals = [0]

    def requests():
        yield StreamConfig().first_request()
        for chunk in paced(chunk_bytes(pcm, 3200), 0.1 / speed, realtime=True):
            position[0] += 0.1
            yield stt_pb2.StreamingRecognizeRequest(audio_content=chunk)

    def run() -> None:
        with SpeechClient(target) as client:
            for response in client.stream(requests()):
                if response.HasField("result") and response.result.is_final:
                    finals[0] += 1

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive():
        samples.append((position[0], rss_mb(pid)))
        time.sleep(1.0)
    thread.join()
    samples.append((position[0], rss_mb(pid)))
    at_one_minute = next((rss for pos, rss in samples if pos >= 60), samples[-1][1])
    end = samples[-1][1]
    return {
        "audio_minutes": len(audio) / 16000 / 60,
        "speed": speed,
        "finals": finals[0],
        "rss_at_1_min_mb": at_one_minute,
        "rss_at_end_mb": end,
        "rss_max_mb": max(r for _, r in samples),
        "end_over_1_min": end / at_one_minute,
        "samples": samples[:: max(1, len(samples) // 60)],
    }


def short_streams(target: str, pid: int, count: int, idle_seconds: float = 12.0) -> dict:
    audio = read_audio_file(REPO / "engine" / "samples" / "jfk.wav")[: 16000 * 3]
    rss_after: dict[int, float] = {}
    done = [0]
    lock = threading.Lock()

    def one(_: int) -> int:
        with SpeechClient(target) as client:
            text = final_transcripts(client.stream_audio(audio, StreamConfig(), realtime=False))
        with lock:
            done[0] += 1
            if done[0] % 100 == 0 or done[0] == count:
                rss_after[done[0]] = rss_mb(pid)
                if done[0] % 1000 == 0:
                    print(f"{done[0]} streams: RSS {rss_after[done[0]]:.0f} MB", file=sys.stderr, flush=True)
        return len(text)

    cpu_before, started = cpu_times(pid), time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    user, system = (after - before for after, before in zip(cpu_times(pid), cpu_before))
    time.sleep(idle_seconds)  # freed memory goes back to the OS on the server's schedule
    rss_idle_after = rss_mb(pid)
    return {
        "streams": count,
        "streams_with_text": sum(1 for r in results if r),
        "rss_after_mb": rss_after,
        "growth_100_to_end_mb": rss_after[count] - rss_after[100],
        "rss_idle_after_mb": rss_idle_after,
        "wall_s": wall,
        # The server's CPU time while the streams ran: noisy on a shared machine.
        "server_cpu_ms_per_stream": 1000 * (user + system) / count,
        "server_sys_ms_per_stream": 1000 * system / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30, help="0 skips the long stream")
    parser.add_argument("--speed", type=float, default=10)
    parser.add_argument("--short-streams", type=int, default=1000)
    parser.add_argument("--allocator", choices=("glibc", "jemalloc"), default="glibc")
    parser.add_argument("--malloc-conf", default="", help="jemalloc's MALLOC_CONF for the server")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `stt-engine serve` argument, repeatable (e.g. --server-arg=--memory-release-seconds=0)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if args.malloc_conf and args.allocator != "jemalloc":
        parser.error("--malloc-conf needs --allocator jemalloc")
    port = 50600
    # LD_PRELOAD and MALLOC_CONF set from outside (the Dockerfile's) would skew a glibc run.
    env = {"OTEL_SDK_DISABLED": "true", "LD_PRELOAD": "", "MALLOC_CONF": args.malloc_conf}
    if args.allocator == "jemalloc":
        env["LD_PRELOAD"] = find_jemalloc() or parser.error(
            "libjemalloc.so.2 not found: install it (Debian: apt-get install libjemalloc2)"
        )
    server = start_server(f"127.0.0.1:{port}", "--max-stream-seconds", "7200", *args.server_arg, env=env)
    try:
        jemalloc = runs_jemalloc(server.pid)
        if jemalloc != (args.allocator == "jemalloc"):
            raise SystemExit(f"the server runs {'with' if jemalloc else 'without'} jemalloc")
        result = {
            "allocator": args.allocator,
            "malloc_conf": args.malloc_conf,
            "server_args": args.server_arg,
            "rss_idle_mb": rss_mb(server.pid),
        }
        if args.minutes > 0:
            result["long_stream"] = long_stream(f"127.0.0.1:{port}", server.pid, args.minutes, args.speed)
            print(json.dumps({k: v for k, v in result["long_stream"].items() if k != "samples"}), flush=True)
        result["short_streams"] = short_streams(f"127.0.0.1:{port}", server.pid, args.short_streams)
        print(json.dumps(result["short_streams"]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "memory.json" if args.allocator == "glibc" else f"memory-{args.allocator}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
