"""Streams that stall the event loop or hold slots, and the shutdown deadline (issue 25).

Like tests/test_hardening.py: each attack runs beside a good real-time stream, which must still
get its transcript with its last final within 2 s of its audio, and health must answer within
1 s throughout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest

from engine.api import stt_pb2
from engine.audio import float_to_linear16
from tests.helpers import JFK_TEXT, beside_good_stream, serving, wait_until
from tests.test_errors import (
    assert_error,
    audio_request,
    config_request,
    pcm,
    run_stream,
)

IDLE_SECONDS = 3


@pytest.fixture(scope="module")
def limited():
    # Six slots: the good stream, four keepalive streams and one more.
    with serving("--max-streams", "6", "--idle-timeout-seconds", str(IDLE_SECONDS)) as proc:
        yield proc


@pytest.fixture
def guarded(limited, jfk):
    """The good stream (JFK's 11 s) and the health watch around one attack."""
    wait_until(lambda: limited.active_streams() == 0, 30, what="earlier streams to end")
    with beside_good_stream(limited, jfk, JFK_TEXT):
        yield limited


def mulaw_config() -> stt_pb2.StreamingRecognizeRequest:
    request = config_request()
    request.streaming_config.config.encoding = stt_pb2.MULAW
    request.streaming_config.config.sample_rate_hertz = 8000
    return request


def test_large_chunks_leave_the_event_loop_to_others(guarded):
    # Two clients send 1 MiB MULAW messages (131 s of 8 kHz silence each) as fast as the server
    # reads them, reconnecting when --max-stream-seconds ends a stream. Decoded, resampled and
    # scored by the VAD in one go, each message held the event loop 0.6 s (health 3.9 s).
    chunk = audio_request(b"\xff" * (1 << 20))
    stop = threading.Event()
    sent = [0, 0]

    def attack(index: int) -> None:
        def requests():
            yield mulaw_config()
            while not stop.is_set():
                sent[index] += 1
                yield chunk

        while not stop.is_set():
            _, error = run_stream(guarded.target, requests())
            if error is not None:
                assert_error(error, grpc.StatusCode.OUT_OF_RANGE, "STT_STREAM_TOO_LONG")

    attackers = [threading.Thread(target=attack, args=(i,), daemon=True) for i in range(2)]
    for thread in attackers:
        thread.start()
    time.sleep(12)  # the good stream's 11 s, and its last final
    stop.set()
    for thread in attackers:
        thread.join(30)
    # Both kept the server busy: each sent minutes of audio (about a message a second on 2 cores).
    assert min(sent) > 5, sent


def test_keepalive_messages_do_not_hold_slots(guarded, jfk):
    # Four streams that only send an empty message, or one LINEAR16 sample (2 bytes), every 2 s:
    # they add no audio, and once held every slot until --max-stream-seconds, which they never reach.
    release = threading.Event()

    def keepalive(data: bytes):
        yield config_request()
        while not release.wait(2):
            yield audio_request(data)

    # A slow client, sending real audio at 0.6 of real time, is not idle (half real time is).
    slow_audio = float_to_linear16(jfk[: 16000 * 4])

    def slow():
        yield config_request()
        for i in range(0, len(slow_audio), 3200):
            time.sleep(0.1 / 0.6)
            yield audio_request(slow_audio[i : i + 3200])

    with guarded.client(retries=False) as client:
        started = time.monotonic()
        # A deadline, so that streams that are never ended fail the test rather than hang it.
        calls = [client.stream(keepalive(data), timeout=30) for data in (b"", b"", b"\0\0", b"\0\0")]
        slow_call = client.stream(slow())
        wait_until(lambda: guarded.active_streams() == 6, 10, what="all six slots taken")
        _, refused = run_stream(guarded.target, [config_request(), *pcm(jfk[:16000])])
        assert_error(refused, grpc.StatusCode.RESOURCE_EXHAUSTED, "STT_TOO_MANY_STREAMS")
        for call in calls:
            with pytest.raises(grpc.RpcError) as raised:
                list(call)
            assert_error(
                raised.value,
                grpc.StatusCode.OUT_OF_RANGE,
                "STT_AUDIO_TIMEOUT",
                f"no audio for {IDLE_SECONDS} s",
                field="audio_content",
            )
        ended_after = time.monotonic() - started
        release.set()
        assert ended_after < IDLE_SECONDS + 2, f"keepalive streams ended {ended_after:.1f} s after opening"
        # Their slots are free again.
        _, error = run_stream(guarded.target, [config_request(), *pcm(jfk[:16000])])
        assert error is None, error
        slow_finals = [r for r in slow_call if r.HasField("result") and r.result.is_final]
        assert slow_finals, "the slow stream was not transcribed"


@contextmanager
def busy_cpus() -> Iterator[None]:
    """Another process keeps every core this process may use busy (a loaded CI machine)."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(len(os.sched_getaffinity(0)))
    ]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_drain_ends_every_stream_by_the_deadline(server_factory, jfk):
    server = server_factory("--drain-seconds", "1", "--config-timeout-seconds", "60")
    data = float_to_linear16(np.tile(jfk, 6))  # 66 s sent at once, half-closed: finals pending
    results: dict[str, object] = {}

    def flood_then_wait():
        with server.client() as client:
            responses = []
            try:
                for response in client.stream(
                    [
                        config_request(),
                        *[audio_request(data[i : i + 32000]) for i in range(0, len(data), 32000)],
                    ]
                ):
                    responses.append(response)
                results["flood"] = None
            except grpc.RpcError as error:
                results["flood"] = error
            results["flood_finals"] = [r for r in responses if r.HasField("result") and r.result.is_final]

    def never_configured():
        with server.client() as client:
            release = threading.Event()

            def nothing():
                release.wait(60)
                yield from ()

            try:
                list(client.stream(nothing()))
                results["silent"] = None
            except grpc.RpcError as error:
                results["silent"] = error
            release.set()

    threads = [threading.Thread(target=f) for f in (flood_then_wait, never_configured)]
    for thread in threads:
        thread.start()
    wait_until(lambda: server.active_streams() == 2, 30, what="both streams")
    # On a loaded machine the finals outlast the grace, a decode is running at the deadline,
    # and the telemetry flush (no collector here) takes its 5 s: the exit came 10.8-12.6 s
    # after SIGTERM.
    with busy_cpus():
        time.sleep(1.0)
        started = time.monotonic()
        server.signal()
        server.process.wait(timeout=30)
        exited_in = time.monotonic() - started
    for thread in threads:
        thread.join(10)
    assert exited_in < 1 + 5 + 3, f"exited {exited_in:.1f} s after SIGTERM with --drain-seconds 1"
    assert_error(results["silent"], grpc.StatusCode.UNAVAILABLE, "STT_SERVER_SHUTTING_DOWN")
    if results["flood"] is not None:  # it may finish its finals within the grace
        assert_error(results["flood"], grpc.StatusCode.UNAVAILABLE, "STT_SERVER_SHUTTING_DOWN")
    assert results["flood_finals"], "finals decoded before the deadline were not delivered"
