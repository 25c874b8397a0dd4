"""The worker hands freed heap memory back to the OS between chunks (glibc's malloc_trim)."""

from __future__ import annotations

import os
import platform

import pytest

from pipeq.worker import memory


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_free_heap_memory_goes_back_to_the_os() -> None:
    # A fragmented heap, as uneven tensors leave it: many 4 KB blocks, one in 64 still alive.
    blocks = [bytearray(4096) for _ in range(50_000)]
    keep = blocks[::64]
    del blocks
    before = rss_mb()
    assert memory.release_free_memory(interval=0.0)
    after = rss_mb()
    assert before - after > 100, (before, after)  # ~200 MB were free but held by malloc
    assert len(keep) == 782


def test_trims_at_most_once_an_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "_TRIM", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(memory, "_last", float("-inf"))
    assert memory.release_free_memory(interval=3600.0)  # the first one trims
    assert not memory.release_free_memory(interval=3600.0)  # too soon
    assert memory.release_free_memory(interval=0.0)
    assert calls == [0, 0]
    monkeypatch.setattr(memory, "_TRIM", None)  # not glibc: nothing to call
    assert not memory.release_free_memory(interval=0.0)
