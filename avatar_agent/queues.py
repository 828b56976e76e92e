"""The one bounded queue the pipeline uses: full → drop the oldest item and count it.

Why drop-oldest: in a live stream the freshest data matters most; a consumer that fell behind
catches up by skipping what is stale, and the producer (a device callback, the clock) never
blocks.  Every drop is counted so it shows in stats and metrics.

:class:`DropOldest` serves one event loop; :class:`SyncDropOldest` is the same policy between the
loop and a worker thread (a sink's writer, see :mod:`avatar_agent.sinks.writer`).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class DropOldest(Generic[T]):
    """A bounded FIFO for one event loop; :meth:`close` ends it after the queued items.

    Args:
        size: most items held; putting one more drops the oldest (counted in ``dropped``).
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"queue size {size} must be ≥ 1")
        self.size = size
        self.dropped = 0
        """Items dropped because the queue was full."""
        self._items: collections.deque[T] = collections.deque()
        self._closed = False
        self._ready = asyncio.Event()

    def put(self, item: T) -> bool:
        """Queue ``item`` (never blocks); returns True if the oldest item was dropped for it."""
        dropped = len(self._items) >= self.size
        if dropped:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._ready.set()
        return dropped

    def get_nowait(self) -> T | None:
        """The oldest item if one is queued, else None (never waits)."""
        return self._items.popleft() if self._items else None

    async def get(self) -> T | None:
        """The oldest item; None once the queue is closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def clear(self) -> int:
        """Drop everything queued (an interruption); returns how many.  Closing is kept."""
        n = len(self._items)
        self._items.clear()
        return n

    def close(self) -> None:
        """No more items: :meth:`get` returns None after the queued ones."""
        self._closed = True
        self._ready.set()

    def __len__(self) -> int:
        return len(self._items)


class SyncDropOldest(Generic[T]):
    """A bounded FIFO between threads: ``put`` never blocks, ``get`` blocks a worker thread.

    Args:
        size: most items held; putting one more drops the oldest (counted in ``dropped``).
            None: unbounded, for data that must never be dropped and is bounded by the caller
            some other way (the mp4 sink's audio, whose images are bounded).
    """

    def __init__(self, size: int | None) -> None:
        if size is not None and size < 1:
            raise ValueError(f"queue size {size} must be ≥ 1")
        self.size = size
        self.dropped = 0
        """Items dropped because the queue was full."""
        self._items: collections.deque[T] = collections.deque()
        self._closed = False
        self._cond = threading.Condition()

    def put(self, item: T) -> bool:
        """Queue ``item`` (never blocks); returns True if the oldest item was dropped for it."""
        with self._cond:
            dropped = self.size is not None and len(self._items) >= self.size
            if dropped:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def get(self, timeout: float | None = None) -> T | None:
        """The oldest item, waiting for one; None once closed and empty, or after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()          # room for a producer in wait_for_room
            return item

    def pop_if(self, match: Callable[[T], bool]) -> T | None:
        """Remove and return the oldest item if ``match(item)``; else None (never waits)."""
        with self._cond:
            if self._items and match(self._items[0]):
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            return None

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Block until a put would drop nothing (or the queue is closed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or self.size is None or len(self._items) < self.size,
                timeout)

    def close(self) -> None:
        """No more items: :meth:`get` returns None after the queued ones."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def __len__(self) -> int:
        return len(self._items)
