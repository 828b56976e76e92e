"""The writer thread every device/file sink uses: the loop enqueues, one thread writes.

A sink's ``send`` runs on the event loop and must never block on a device, a sound server or an
encoder; so it only puts the item into a :class:`~avatar_agent.queues.SyncDropOldest` (the sink
chooses its size, i.e. its overflow policy) and one daemon thread takes items out and writes them.
The thread never raises into nowhere: its failure is kept in :attr:`WriterThread.error`, and the
sink raises it (as its own error type) on the next ``send``.
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

from avatar_agent.queues import SyncDropOldest

T = TypeVar("T")


class WriterThread(Generic[T]):
    """One daemon thread: ``open()`` once, ``write(item)`` per queued item, then ``finish()``.

    Args:
        name: the thread's name (shows in stack dumps).
        queue: where ``send`` puts items; its size is the sink's overflow policy.
        write: writes one item (on the thread); an exception stops the thread and is kept.
        open: runs first on the thread (e.g. a stream that must be used from one thread only);
            its exception is kept and :attr:`ready` is set either way.
        finish: runs once the queue is closed and written out (or at once, without ``drain``).
        on_error: runs on the thread after ``write``/``finish`` failed (release what ``open``
            took); not after ``open`` itself failed.
        drain: on :meth:`stop`, write what is still queued first (False: stop after the item in
            hand, e.g. audio that would play late anyway).
    """

    def __init__(self, name: str, queue: SyncDropOldest[T], write: Callable[[T], None], *,
                 open: Callable[[], None] | None = None, finish: Callable[[], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 drain: bool = True) -> None:
        self.queue = queue
        self.error: BaseException | None = None
        """Why the thread stopped early (None: it did not fail)."""
        self.ready = threading.Event()
        """Set once ``open`` returned or failed."""
        self._write, self._open, self._finish, self._on_error = write, open, finish, on_error
        self._drain = drain
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def put(self, item: T) -> bool:
        """Queue an item (never blocks); True if the queue's oldest item was dropped for it."""
        return self.queue.put(item)

    def stop(self) -> None:
        """Ask the thread to finish (see ``drain``); returns at once."""
        self.queue.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True once it has ended."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            if self._open is not None:
                self._open()
        except BaseException as e:  # handed to the loop through error/ready
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        try:
            while True:
                item = self.queue.get()
                if item is None or (self.queue.closed and not self._drain):
                    break
                self._write(item)
            if self._finish is not None:
                self._finish()
        except BaseException as e:  # handed to the loop through error
            self.error = e
            if self._on_error is not None:
                self._on_error(e)
