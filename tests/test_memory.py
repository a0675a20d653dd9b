"""Freed heap memory goes back to the OS (what the server does every few seconds)."""

import pytest

from engine.memory import can_release_memory, release_free_memory


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 1e6


@pytest.mark.skipif(not can_release_memory(), reason="not glibc: malloc_trim is unavailable")
def test_release_returns_free_heap_pages_held_below_the_top():
    # 100 KB blocks come from the heap (below the mmap threshold). Keeping the last one
    # pins the heap top, so glibc's own trimming cannot give back the freed ones.
    blocks = [bytearray(100_000) for _ in range(600)]
    keep = blocks[-1]
    del blocks
    held = rss_mb()
    release_free_memory()
    assert held - rss_mb() > 30, "60 MB of free heap was not returned"
    assert len(keep) == 100_000
