"""Injected time.

The pipeline's timing (sources, chunker, player, agent) waits on a :class:`Clock`, so tests can run
hours of session in seconds on a :class:`FakeClock`, and the player's schedule is computed from due
times (t0 + i/fps), never from accumulated sleeps.  Outside that timing, ``time``/``asyncio`` are
used directly on purpose: ``asyncio.sleep(0)`` to yield the loop, ``time.monotonic()`` stamps in
sink writer threads (they measure the real device), wall-clock timeouts around blocking thread work,
and the control server's stats interval and rate limits (they serve real clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from typing import Iterator, Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Monotonic time in seconds and a way to wait for a moment on it."""

    def now(self) -> float:
        """Current time in seconds (monotonic, arbitrary origin)."""
        ...

    async def sleep_until(self, t: float) -> None:
        """Return once ``now() >= t`` (immediately if already past)."""
        ...

    def hold(self) -> contextlib.AbstractContextManager[None]:
        """A context during which work runs outside the loop (a no-op on a real clock)."""
        ...


class SystemClock:
    """The real monotonic clock."""

    def now(self) -> float:
        """time.monotonic()."""
        return time.monotonic()

    async def sleep_until(self, t: float) -> None:
        """asyncio.sleep for the remaining time; never sleeps a negative amount."""
        delay = t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            # Yield once so a loop that is always late still lets other tasks run.
            await asyncio.sleep(0)

    def hold(self) -> contextlib.AbstractContextManager[None]:
        """Real time cannot be frozen: a no-op context."""
        return contextlib.nullcontext()


class FakeClock:
    """A virtual clock for tests: time stands still until every task is waiting on it.

    ``sleep_until`` registers a waiter; :meth:`run` (or :meth:`advance`) jumps time to the earliest
    waiter and releases it.  With ``auto=True`` a background task does that whenever the event loop
    goes idle, so code written against :class:`Clock` runs unchanged, as fast as the CPU allows.
    """

    def __init__(self, start: float = 0.0, auto: bool = True) -> None:
        self._now = start
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._auto = auto
        self._driver: asyncio.Task[None] | None = None
        self._holds = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Freeze virtual time while thread work is in flight (used around inference jobs).

        Without it virtual time would race ahead of work that real time is still computing, and
        every frame would look late.  Enter and exit on the event-loop thread.
        """
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1

    def now(self) -> float:
        """The virtual time."""
        return self._now

    async def sleep_until(self, t: float) -> None:
        """Wait until virtual time reaches ``t``."""
        if t <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (t, next(self._seq), fut))
        if self._auto and (self._driver is None or self._driver.done()):
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        await fut

    def advance(self, dt: float) -> None:
        """Move time forward by ``dt`` and release every waiter that is due."""
        self._release(self._now + dt)

    def _release(self, t: float) -> None:
        self._now = max(self._now, t)
        while self._waiters and self._waiters[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)

    async def _drive(self) -> None:
        # Let every runnable task run to its next await before jumping: several loop turns,
        # because work handed to threads (run_in_executor) completes via call_soon_threadsafe.
        # This is a heuristic, not an idle detector: thread work started without hold(), or a
        # task that awaits I/O between clock waits, sees time jump ahead of it
        # (an event loop whose clock jumps to the next timer would be exact, at the cost of
        # replacing the loop).  Wrap thread work in hold(); while held, time stays frozen and
        # the driver polls every 0.5 ms of real time.
        ready = getattr(asyncio.get_running_loop(), "_ready", None)  # CPython: runnable handles
        while self._waiters:
            for turn in range(10_000):
                await asyncio.sleep(0)
                # At least 20 turns, then on while other callbacks are still runnable: a chain
                # of short steps (20 ms audio frames → chunker → animate) must reach its next
                # clock wait or inference job before time moves.
                if turn >= 20 and not ready:
                    break
            if not self._waiters:
                break
            if self._holds:
                await asyncio.sleep(0.0005)  # real time: wait for thread work, time stays frozen
                continue
            t, _, fut = self._waiters[0]
            if fut.done():
                heapq.heappop(self._waiters)
                continue
            self._release(t)

