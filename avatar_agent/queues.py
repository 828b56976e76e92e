"""The one bounded queue the pipeline uses: full → drop the oldest item and count it.

Why drop-oldest: in a live stream the freshest data matters most; a consumer that fell behind
catches up by skipping what is stale, and the producer (a device callback, the clock) never
blocks.  Every drop is counted so it shows in stats and metrics.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Generic, TypeVar

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
