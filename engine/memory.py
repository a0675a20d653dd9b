"""Handing freed heap memory back to the operating system.

Every decode allocates and frees megabytes (features, encoder output, beams) from
several threads. glibc keeps freed pages in its arenas for reuse, and the free space
fragments: over 3000 short streams the memory in use stayed near 65 MB while the free
but held heap reached 100 MB and RSS crept up by 20 KB per stream. ``malloc_trim``
returns those free pages; doing it every few seconds keeps RSS flat. (A low fixed
mmap threshold does the same per allocation, but cost 55% more CPU.)
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging

logger = logging.getLogger(__name__)


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def can_release_memory() -> bool:
    """Whether this C library can return free heap pages (glibc)."""
    return _MALLOC_TRIM is not None


def release_free_memory() -> None:
    """Returns free heap pages of every malloc arena to the OS."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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
