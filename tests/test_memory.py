"""Freed heap memory goes back to the OS (what the server does every few seconds), with
glibc's malloc and with jemalloc preloaded as in the Docker image."""

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from bench.memory import find_jemalloc, runs_jemalloc
from engine.client import SpeechClient, StreamConfig, final_transcripts
from engine.memory import ALLOCATOR, can_release_memory, release_free_memory
from tests.helpers import REPO, normalize, wait_until

JEMALLOC = find_jemalloc()
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc.so.2 is not installed")


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 1e6


@pytest.mark.skipif(not can_release_memory(), reason="not glibc: malloc_trim is unavailable")
def test_release_returns_free_heap_pages_held_below_the_top():
    assert ALLOCATOR == "glibc"
    # 100 KB blocks come from the heap (below the mmap threshold). Keeping the last one
    # pins the heap top, so glibc's own trimming cannot give back the freed ones.
    blocks = [bytearray(100_000) for _ in range(600)]
    keep = blocks[-1]
    del blocks
    held = rss_mb()
    release_free_memory()
    assert held - rss_mb() > 30, "60 MB of free heap was not returned"
    assert len(keep) == 100_000


@needs_jemalloc
def test_release_purges_jemalloc_arenas_when_it_is_preloaded():
    # jemalloc keeps freed pages dirty for its decay time (10 s by default); glibc's
    # malloc_trim cannot see them, so release_free_memory must purge jemalloc's arenas.
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from engine.memory import ALLOCATOR, can_release_memory, release_free_memory

        def rss_mb():
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * 4096 / 1e6

        assert ALLOCATOR == "jemalloc" and can_release_memory(), ALLOCATOR
        blocks = [bytearray(100_000) for _ in range(600)]
        keep = blocks[-1]
        del blocks
        held = rss_mb()
        release_free_memory()
        assert held - rss_mb() > 30, f"60 MB of free heap not returned: {{held:.0f}} -> {{rss_mb():.0f}} MB"
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "LD_PRELOAD": JEMALLOC},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@needs_jemalloc
def test_server_with_jemalloc_preloaded_serves_a_stream(server_factory, jfk):
    server = server_factory("--memory-release-seconds", "0.2", env={"LD_PRELOAD": JEMALLOC})
    assert runs_jemalloc(server.process.pid)
    with server.client() as client:
        finals = final_transcripts(client.stream_audio(jfk, StreamConfig(), realtime=False))
    assert "ask not what your country can do for you" in normalize(" ".join(finals))
    assert "Traceback" not in server.log()  # the periodic release (every 0.2 s) purged quietly


def test_a_finished_stream_is_freed_without_the_cycle_collector(jfk):
    # A session left in a reference cycle (a cancelled task's error -> its frame -> the session
    # -> the task) waits, with its audio, for a full collection, and those are rare: RSS grew
    # by 17 KB per stream. With the collector off, every ended stream's session must be gone.
    from engine.options import ModelOptions, ServerOptions
    from engine.server import SttServer
    from engine.session import StreamSession

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(120)

    server = SttServer(ServerOptions(address="127.0.0.1:0", memory_release_seconds=0), ModelOptions())
    port = call(server.start())
    try:
        call(server.load())
        gc.collect()
        gc.disable()
        with SpeechClient(f"127.0.0.1:{port}") as client:
            for _ in range(4):  # 3 s of speech: interims, a speculative final, a final
                audio = jfk[: 3 * 16000]
                assert final_transcripts(client.stream_audio(audio, StreamConfig(), realtime=False))
        wait_until(lambda: not server.service.sessions, 10, what="the streams to end")
        time.sleep(0.2)  # the cancelled tasks finish
        sessions = sum(isinstance(o, StreamSession) for o in gc.get_objects())
    finally:
        gc.enable()
        call(server.drain_and_stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert sessions == 0, f"{sessions} of 4 ended sessions still in memory"


def test_a_cancelled_decode_leaves_the_queue_while_finals_keep_the_workers_busy(clips):
    # Finals outrank interims: while finals keep coming, no worker reaches a queued interim.
    # One whose stream gave up must leave the queue at once, not hold its audio until the load
    # drops (8000 short streams back to back left thousands queued).
    from engine.model import DecodeRequest, SpeechModel
    from engine.options import ModelOptions
    from engine.scheduler import UNOBSERVED, InferenceScheduler

    class Observer(type(UNOBSERVED)):
        skips: list[str] = []

        def skipped(self, reason: str) -> None:
            self.skips.append(reason)

    model = SpeechModel(ModelOptions(workers=1))
    speech = np.concatenate([clip.audio for clip in clips])[: 25 * 16000]

    async def scenario():
        scheduler = InferenceScheduler(model, workers=1)
        scheduler.start()
        # A 25 s beam-5 final keeps the one worker busy for far longer than the steps below.
        busy = asyncio.create_task(scheduler.decode(speech, DecodeRequest(final=True)))
        await asyncio.sleep(0.05)
        interims = [
            asyncio.create_task(scheduler.decode(speech[:32000], DecodeRequest(final=False), Observer()))
            for _ in range(3)
        ]
        final = asyncio.create_task(scheduler.decode(speech[:32000], DecodeRequest(final=True)))
        await asyncio.sleep(0.01)
        assert scheduler.queue_depth == 4 and not busy.done()
        for task in interims:
            task.cancel()
        await asyncio.gather(*interims, return_exceptions=True)
        depth = scheduler.queue_depth  # the final only
        assert not busy.done(), "the worker finished before the interims were cancelled"
        await asyncio.gather(busy, final)
        assert not scheduler.finals_waiting
        await scheduler.stop()
        return depth

    assert asyncio.run(scenario()) == 1
    assert Observer.skips == ["cancelled"] * 3  # their spans end, the queue-depth gauge drops
