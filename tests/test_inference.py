"""inference.Inference: the process's GIL switch interval and the busy-time accounting that
admission control reads."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from avatar_agent.clock import SystemClock
from avatar_agent.inference import GIL_SWITCH_INTERVAL_S, Inference


def test_the_gil_switch_interval_is_lowered_never_raised() -> None:
    old = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)                 # CPython's default
        Inference(SystemClock()).close()
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S / 2)
        Inference(SystemClock()).close()
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S / 2)
    finally:
        sys.setswitchinterval(old)


def _burn(seconds: float) -> int:
    t0, n = time.thread_time(), 0
    while time.thread_time() - t0 < seconds:
        n += 1
    return n


def test_busy_time_is_counted_by_the_time_the_result_is_awaited() -> None:
    """The warm-up reads busy_s right after awaiting its jobs: every job's CPU must be in it by
    then (it was added after the hand-back, so the estimate could read almost nothing)."""

    async def main() -> list[float]:
        inf = Inference(SystemClock(), workers=2)
        seen = []
        try:
            for _ in range(20):
                before = inf.busy_s
                await inf.run(0.0, _burn, 0.01)
                seen.append(inf.busy_s - before)
        finally:
            inf.close()
        return seen

    seen = asyncio.run(main())
    assert min(seen) >= 0.009, seen


def test_close_waits_briefly_for_a_running_job_and_never_for_a_stuck_one() -> None:
    """At exit a daemon worker still inside native code aborts the process (CPython unwinds it
    when it wakes after finalisation), so close() lets a running job finish — for a bounded
    time only: a hung model call must not make shutdown hang."""
    import threading

    async def main() -> None:
        for sleep_s, grace_s, joined in ((0.05, 2.0, True), (30.0, 0.1, False)):
            inf = Inference(SystemClock())
            started = threading.Event()

            def job(s: float = sleep_s, started: threading.Event = started) -> None:
                started.set()
                time.sleep(s)

            fut = asyncio.ensure_future(inf.run(0.0, job))
            assert await asyncio.to_thread(started.wait, 5.0)
            t0 = time.monotonic()
            inf.close(grace_s)
            assert time.monotonic() - t0 < grace_s + 1.0
            assert all(not t.is_alive() for t in inf._threads) is joined
            fut.cancel()

    asyncio.run(main())
