"""DropOldest (loop), SyncDropOldest (threads) and the sinks' WriterThread."""

from __future__ import annotations

import threading

import pytest

from avatar_agent.queues import DropOldest, SyncDropOldest
from avatar_agent.sinks.writer import WriterThread


async def test_drop_oldest_counts_drops_and_get_nowait_never_waits():
    q = DropOldest[int](2)
    assert q.get_nowait() is None
    assert [q.put(i) for i in range(4)] == [False, False, True, True]
    assert q.dropped == 2 and q.get_nowait() == 2 and await q.get() == 3
    q.close()
    assert await q.get() is None


def test_sync_drop_oldest_policy_timeout_close_and_pop_if():
    q = SyncDropOldest[int](3)
    assert [q.put(i) for i in range(5)] == [False, False, False, True, True]
    assert q.dropped == 2 and len(q) == 3
    assert q.pop_if(lambda x: x == 3) is None          # the head is 2
    assert q.pop_if(lambda x: x == 2) == 2
    assert q.get() == 3 and q.get() == 4
    assert q.get(timeout=0.01) is None                 # empty, still open: times out
    unbounded = SyncDropOldest[int](None)
    assert not any(unbounded.put(i) for i in range(1000)) and unbounded.dropped == 0
    with pytest.raises(ValueError, match="size 0"):
        SyncDropOldest[int](0)


def test_sync_drop_oldest_wakes_a_blocked_getter_and_a_producer_waiting_for_room():
    q = SyncDropOldest[str](1)
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.put("a")
    t.join(2)
    assert got == ["a"]
    q.put("b")
    assert not q.wait_for_room(timeout=0.01)           # full
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    assert q.wait_for_room(timeout=2)
    t.join(2)
    q.close()
    assert q.get() is None and got == ["a", "b"]


def test_writer_thread_drains_on_stop_and_finishes():
    out: list[int] = []
    finished = threading.Event()
    w = WriterThread("t", SyncDropOldest[int](100), out.append, finish=finished.set)
    w.start()
    for i in range(50):
        w.put(i)
    w.stop()
    assert w.join(5)
    assert out == list(range(50)) and finished.is_set() and w.error is None


def test_writer_thread_hands_its_error_back_and_cleans_up():
    errors: list[BaseException] = []

    def write(x: int) -> None:
        if x == 2:
            raise OSError("device gone")

    w = WriterThread("t", SyncDropOldest[int](10), write, on_error=errors.append)
    w.start()
    for i in range(5):
        w.put(i)
    assert w.join(5)
    assert isinstance(w.error, OSError) and errors == [w.error]


def test_writer_thread_open_failure_sets_ready_and_error_without_drain_stops_at_once():
    def bad_open() -> None:
        raise RuntimeError("no server")

    w = WriterThread("t", SyncDropOldest[int](10), lambda x: None, open=bad_open)
    w.start()
    assert w.ready.wait(5) and str(w.error) == "no server"

    out: list[int] = []
    gate = threading.Event()

    def slow(x: int) -> None:
        gate.wait(5)
        out.append(x)

    w = WriterThread("t", SyncDropOldest[int](10), slow, drain=False)
    w.start()
    for i in range(5):
        w.put(i)
    w.stop()
    gate.set()
    assert w.join(5)
    assert len(out) <= 1                               # at most the item in hand
