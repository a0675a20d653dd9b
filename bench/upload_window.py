"""The HTTP/2 stream window: what refused calls cost the server, and what large uploads cost the client.

``--stream-window-bytes`` caps what gRPC takes of a call's request before the engine reads it.
For each window (0 is gRPC's own bandwidth-delay tuning) a fresh server is started with a
tokens file, and two things are measured side by side:

- **refused calls:** 400 unauthenticated 16 MB ``Recognize`` calls from 16 threads over 4
  connections, as ``tests/test_hardening_calls.py`` sends them; the server's peak RSS (VmHWM)
  above its RSS before, median over ``--rounds``;
- **uploads:** an authenticated ``GetServerInfo`` carrying ``--sizes`` MB of unknown fields (the
  server reads and parses it, and answers at once: the time is the upload's) through a TCP proxy
  that delays each direction by half of each ``--rtts``; on a new connection per call (gRPC's
  tuning starts from 64 KiB there) and on one warm connection; medians over ``--runs``.

    python bench/upload_window.py
    python bench/upload_window.py --windows 0 4194304 --rtts 50 --sizes 16
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.abuse import peak_rss_mb  # noqa: E402
from bench.streaming import rss_mb, start_server  # noqa: E402
from engine.api import stt_pb2  # noqa: E402

MB = 1 << 20
TOKEN = "bench-token-0123456789"
SEND_UNLIMITED = [("grpc.max_send_message_length", -1)]


def _identity(data: bytes) -> bytes:
    return data


def unary(channel: grpc.Channel, method: str):
    """A Speech method taking and returning raw bytes, so any request can be sent."""
    return channel.unary_unary(
        f"/stt.v1.Speech/{method}", request_serializer=_identity, response_deserializer=_identity
    )


def request_of(megabytes: float) -> bytes:
    """A RecognizeRequest of about ``megabytes``: to GetServerInfo, unknown fields."""
    config = stt_pb2.RecognitionConfig(encoding=stt_pb2.LINEAR16, sample_rate_hertz=16000, language_code="en")
    audio = b"\0" * (int(megabytes * MB) - 1024)
    return stt_pb2.RecognizeRequest(config=config, audio_content=audio).SerializeToString()


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS


class DelayProxy:
    """A TCP proxy on loopback that delays every byte by ``one_way`` seconds in each direction,
    as a link with that half round trip would (unlimited bandwidth)."""

    def __init__(self, target_port: int, one_way: float) -> None:
        self.target_port = target_port
        self.one_way = one_way
        self.port = 0
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(1 << 16):
                await queue.put((loop.time() + self.one_way, data))
        finally:
            await queue.put((loop.time() + self.one_way, b""))
            await delivering

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer), return_exceptions=True
        )

    def _run(self) -> None:
        async def serve() -> None:
            server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            async with server:
                await server.serve_forever()

        asyncio.run(serve())


def refused_peak(target: str, pid: int) -> tuple[float, int]:
    """400 unauthenticated 16 MB Recognize calls from 16 threads: peak RSS above the RSS before,
    and how many were refused UNAUTHENTICATED."""
    request = request_of(16)
    refused = []

    def send(channel: grpc.Channel) -> None:
        call = unary(channel, "Recognize")
        for _ in range(25):
            try:
                call(request, timeout=60)
            except grpc.RpcError as error:
                refused.append(error.code() == grpc.StatusCode.UNAUTHENTICATED)

    channels = [grpc.insecure_channel(target, options=SEND_UNLIMITED) for _ in range(4)]
    try:
        before = rss_mb(pid)
        reset_peak_rss(pid)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(send, channels * 4))
        return peak_rss_mb(pid) - before, sum(refused)
    finally:
        for channel in channels:
            channel.close()


def upload_seconds(port: int, megabytes: float, runs: int) -> tuple[float, float]:
    """Median seconds of an authenticated GetServerInfo carrying ``megabytes``: each on a new
    connection, and each on one warm connection."""
    request = request_of(megabytes)
    metadata = [("authorization", f"Bearer {TOKEN}")]
    target = f"127.0.0.1:{port}"

    def timed(channel: grpc.Channel) -> float:
        call = unary(channel, "GetServerInfo")
        started = time.perf_counter()
        call(request, timeout=120, metadata=metadata)
        return time.perf_counter() - started

    fresh = []
    for _ in range(runs):
        with grpc.insecure_channel(target, options=SEND_UNLIMITED) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            fresh.append(timed(channel))
    with grpc.insecure_channel(target, options=SEND_UNLIMITED) as channel:
        timed(channel)  # connects, and lets gRPC's tuning learn the link
        warm = [timed(channel) for _ in range(runs)]
    return statistics.median(fresh), statistics.median(warm)


def measure(window: int, args: argparse.Namespace, tokens: Path, port: int) -> dict:
    target = f"127.0.0.1:{port}"
    server = start_server(
        target, "--auth-tokens-file", str(tokens), "--stream-window-bytes", str(window),
        env={"OTEL_SDK_DISABLED": "true"}, log=tokens.parent / f"server-{window}.log",
    )  # fmt: skip
    try:
        peaks, refused = [], 0
        for _ in range(args.rounds):
            peak, count = refused_peak(target, server.pid)
            peaks.append(peak)
            refused += count
            time.sleep(1.5)  # the release after large calls, and the periodic trim
        uploads = {}
        for rtt in args.rtts:
            proxy = DelayProxy(port, rtt / 2000)
            for size in args.sizes:
                fresh, warm = upload_seconds(proxy.port, size, args.runs)
                uploads[f"{rtt:g} ms, {size:g} MB"] = {"new_connection_s": fresh, "warm_connection_s": warm}
        return {
            "window_bytes": window,
            "refused_peak_mb": statistics.median(peaks),
            "refused_peaks_mb": peaks,
            "refused_unauthenticated": f"{refused} of {400 * args.rounds}",
            "uploads": uploads,
        }
    finally:
        server.terminate()
        server.wait(30)


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0]["uploads"])
    head = (
        "| window | refused calls: peak RSS added, median (max) | "
        + " | ".join(f"upload {k} (new / warm)" for k in keys)
        + " |"
    )
    lines = [head, "|" + "---|" * (2 + len(keys))]
    for row in rows:
        window = "gRPC tuning (0)" if row["window_bytes"] == 0 else f"{row['window_bytes'] / MB:g} MiB"
        cells = [
            f"{row['uploads'][k]['new_connection_s']:.2f} / {row['uploads'][k]['warm_connection_s']:.2f} s"
            for k in keys
        ]
        peaks = f"+{row['refused_peak_mb']:.0f} MB (max +{max(row['refused_peaks_mb']):.0f})"
        lines.append(f"| {window} | {peaks} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 1 * MB, 4 * MB])
    parser.add_argument("--rtts", type=float, nargs="+", default=[10, 50, 100], help="round trips, ms")
    parser.add_argument("--sizes", type=float, nargs="+", default=[2, 16], help="request sizes, MB")
    parser.add_argument("--runs", type=int, default=5, help="uploads per size, link and connection kind")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 400 refused calls")
    parser.add_argument("--port", type=int, default=50290)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "upload_window.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        tokens = Path(directory) / "tokens"
        tokens.write_text(f"bench {hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
        rows = []
        for window in args.windows:
            rows.append(measure(window, args, tokens, args.port))
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
