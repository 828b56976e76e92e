"""memory: glibc's arena limit is accepted and the trim thread gives freed heap pages back to
the kernel (measured on RSS, in a fresh process); the startup heap's freeze takes long-lived
objects out of full collections."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .reliability.helpers import ROOT

PROBE = r"""
import gc, time
from avatar_agent.memory import _libc, keep_memory_flat
from avatar_agent.metrics import rss_bytes

libc = _libc()
assert libc is not None
t = keep_memory_flat(trim_interval_s=0.2)
assert t is not None and t.daemon and t.is_alive()
base = rss_bytes()
# 200 MB in small blocks, then free all but every 50th: the survivors pin the heap's top, so
# glibc's automatic top trim cannot return the free pages between them; malloc_trim can.
blocks = [bytearray(4000) for _ in range(50_000)]
keep = blocks[::50]
del blocks
gc.collect()
time.sleep(0.8)
print(round((rss_bytes() - base) / 1e6, 1))
"""


def test_trim_thread_returns_freed_heap_pages() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc only (Linux)")
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    grown = float(r.stdout.strip().splitlines()[-1])
    assert grown < 40, f"RSS still {grown} MB above the start after freeing 196 of 200 MB"


def test_heap_in_use_counts_what_is_allocated_and_not_what_was_freed() -> None:
    """memory.heap_in_use (glibc mallinfo2): 50 MB of live blocks show, and go once freed."""
    from avatar_agent.memory import heap_in_use

    if heap_in_use() is None:
        pytest.skip("glibc ≥ 2.33 malloc only")
    base = heap_in_use()
    assert base is not None and base > 0
    blocks = [bytearray(5000) for _ in range(10_000)]               # 50 MB through malloc
    held = heap_in_use()
    assert held is not None and 45e6 < held - base < 60e6
    del blocks
    after = heap_in_use()
    assert after is not None and after - base < 5e6


FREEZE_PROBE = r"""
import gc
from avatar_agent.memory import freeze_startup_heap

class Node:
    def __init__(self):
        self.me = self                     # a cycle: only the collector can free it

keep = [Node() for _ in range(100_000)]    # long-lived, like loaded models and libraries
frozen = freeze_startup_heap()
tracked = len(gc.get_objects())
garbage = [Node() for _ in range(1000)]    # made after the freeze: still collected
del garbage
collected = gc.collect()
print(frozen, tracked, collected)
"""


def test_freezing_the_startup_heap_takes_it_out_of_full_collections() -> None:
    r = subprocess.run([sys.executable, "-c", FREEZE_PROBE], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    frozen, tracked, collected = r.stdout.split()
    assert int(frozen) > 100_000                 # the long-lived objects are frozen …
    assert int(tracked) < 10_000                 # … so a full collection no longer scans them
    assert int(collected) >= 1000                # new cyclic garbage is still freed
