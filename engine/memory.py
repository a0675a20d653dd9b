"""Handing freed heap memory back to the operating system.

Every decode allocates and frees megabytes (features, encoder output, beams) from
several threads. glibc keeps freed pages in its arenas for reuse: one ``malloc_trim(0)``
took a busy server's RSS from 287 to 236 MB. Calling it every few seconds returns that
free space once load drops. (A low fixed mmap threshold does the same per allocation,
but cost 55% more CPU.) RSS that kept rising under continuous load was memory in use,
not free heap: cancelled interims left queued (scheduler.py) and sessions kept in
reference cycles (session.py); trimming could not touch it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging

logger = logging.getLogger(__name__)


def _releaser():
    """The call that returns free heap pages to the OS, and the allocator's name."""
    # With jemalloc preloaded (LD_PRELOAD=libjemalloc.so.2) malloc is jemalloc's, and glibc's
    # malloc_trim would trim only glibc's own, empty heap. jemalloc exports mallctl into the
    # global namespace; purging every arena (MALLCTL_ARENAS_ALL = 4096) is its malloc_trim.
    mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
    if mallctl is not None:
        void = ctypes.c_void_p
        mallctl.argtypes = [ctypes.c_char_p, void, void, void, ctypes.c_size_t]
        return (lambda: mallctl(b"arena.4096.purge", None, None, None, 0)), "jemalloc"
    name = ctypes.util.find_library("c")
    try:
        malloc_trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        malloc_trim = None
    if malloc_trim is None:  # not glibc (musl, macOS): nothing to trim
        return None, None
    return (lambda: malloc_trim(0)), "glibc"


_RELEASE, ALLOCATOR = _releaser()


def can_release_memory() -> bool:
    """Whether this allocator can return free heap pages (glibc, or jemalloc preloaded)."""
    return _RELEASE is not None


def release_free_memory() -> None:
    """Returns the free heap pages of every malloc arena to the OS."""
    if _RELEASE is not None:
        _RELEASE()


# A request this large (a Recognize buffer, or a stream message the engine then refuses)
# stays alive after its call: grpc.aio's request iterator and its async generator reference
# each other, so the last message received is freed only by Python's cyclic garbage
# collector, whose thresholds count objects, not bytes. 60 refused 10 MB messages took RSS
# from 300 MB to 850 MB; gc.collect() (26 ms for the server's ~50k objects) and malloc_trim
# brought it back to 340 MB. So a call with a large message is followed, within
# RELEASE_DELAY, by a collection and a trim; calls closer together share one.
LARGE_REQUEST_BYTES = 1 << 20
RELEASE_DELAY = 0.5

_release_task: asyncio.Task | None = None  # held: the loop keeps only weak references


def release_soon() -> None:
    """Schedules a garbage collection and ``release_free_memory`` (off the event loop)
    after ``RELEASE_DELAY``; calls made before it runs share it. Call from the event loop."""
    global _release_task
    if _release_task is not None and not _release_task.done():
        return

    async def release() -> None:
        await asyncio.sleep(RELEASE_DELAY)
        gc.collect()
        await asyncio.to_thread(release_free_memory)

    _release_task = asyncio.get_running_loop().create_task(release())


async def release_periodically(interval: float) -> None:
    """Calls ``release_free_memory`` every ``interval`` seconds, off the event loop."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(release_free_memory)
