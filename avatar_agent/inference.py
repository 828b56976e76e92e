"""The inference thread: all model work of every session in a process, earliest deadline first.

Design (ARCHITECTURE.md): one thread runs all torch/OpenCV work — one torch context, no GIL fights
on 2 cores.  With several sessions in one process that thread is shared, so *which* job runs next
matters: a job carries the clock time by which its result is needed (the due time of the first
frame it produces), and the thread always takes the earliest.  A session that submits a long
chunk therefore never makes another session's next frame late unless the machine is really full
(admission control keeps it from being).

The queue is bounded by construction: each session has at most one job in flight per task
(listen/animate), so the heap holds at most a few jobs per session.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import sys
import threading
import time
from typing import Any, Callable, TypeVar

from .clock import Clock

log = logging.getLogger(__name__)
R = TypeVar("R")

GIL_SWITCH_INTERVAL_S = 1e-4
"""How long a thread waiting for the GIL lets the holder run before asking it to let go
(``sys.setswitchinterval``; CPython's default is 5 ms).  The frame work alternates short
GIL-free stretches (OpenCV, ONNX Runtime, large numpy ops) with Python; after each one a
worker must win the GIL back, and with the default it can wait up to 5 ms behind another
session's Python while its core idles.  Measured with ``bench --sessions N`` (2 cores, 512²,
2 workers): 8 sessions dropped 46 % of their frames at 1.55 cores with 5 ms and 0.4 % at 1.32
cores with 0.5 ms; 9 sessions 0.00–0.04 % with 0.1 ms; 10 sessions 0.2–9.3 % (mean of three
runs) with 0.1 ms against 27 % with 0.5 ms."""


CLOSE_GRACE_S = 0.3
"""How long :meth:`Inference.close` waits for the jobs still running (a frame or a motion chunk
takes milliseconds).  Waiting matters at exit: CPython ends a daemon thread that wakes after
finalisation by unwinding its stack, and inside OpenCV, ONNX Runtime or torch C++ code that
aborts the process ("FATAL: exception not rethrown", exit status 134).  Measured: an engine
whose sessions were rendering when it closed aborted at exit in 6 of 33 runs without the wait."""


class InferenceClosed(RuntimeError):
    """The inference thread was shut down; no more work is accepted."""


class Inference:
    """A single worker thread that runs submitted callables earliest-due first.

    Args:
        clock: the injected clock; virtual time is held while a job is in flight (FakeClock).
        threads: torch/OpenCV intra-op threads for the worker.
        name: thread name (shows in py-spy / top -H).
        workers: worker threads taking jobs from the one earliest-due-first queue.  One is the
            design's default (one torch context, no GIL fights); a CPU session server with many
            sessions may use one per core — the renderer's OpenCV work releases the GIL.
    """

    def __init__(self, clock: Clock, threads: int = 1, name: str = "inference",
                 workers: int = 1) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._name, self._nthreads = name, threads
        self._aside: Inference | None = None          # created on first run_aside()
        self.busy_s = 0.0
        """Seconds of work run so far (thread CPU is what admission control measures)."""
        self.jobs = 0
        self.workers = max(1, workers)
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:   # process-wide; never raised
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._threads = [threading.Thread(target=self._work, args=(threads,),
                                          name=f"{name}-{k}" if k else name, daemon=True)
                         for k in range(self.workers)]
        for t in self._threads:
            t.start()

    async def run(self, due: float, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` on the inference thread; ``due`` orders it among waiting jobs."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()

        def job() -> None:
            # Accounted before the hand-back: the awaiting task may read busy_s at once.
            t0 = time.thread_time()
            try:
                result = fn(*args)
            except BaseException as e:  # handed to the awaiting task, never lost
                self._account(t0)
                _hand_back(loop, _set_exception, fut, e)
            else:
                self._account(t0)
                _hand_back(loop, _set_result, fut, result)

        with self._cv:
            if self._closed:
                raise InferenceClosed("the inference thread is shut down")
            heapq.heappush(self._heap, (due, next(self._seq), job))
            self._cv.notify()
        with self.clock.hold():
            return await fut

    async def run_aside(self, fn: Callable[..., R], *args: Any) -> R:
        """Run a long one-off job (a portrait's analysis: landmarks and warp tables, a few
        hundred ms) on a thread of its own, in arrival order.

        Why not :meth:`run`: a job cannot be pre-empted once started, so on the frame thread it
        would make every frame due meanwhile late — in this session and in every other session
        of the process (a swap or a new session would drop ~8 frames everywhere).  Beside it,
        the OS shares the cores and the frame thread keeps its deadlines.  The job must not
        touch state the frame thread uses (``Renderer.prepare`` builds a new avatar).
        """
        with self._cv:
            if self._closed:
                raise InferenceClosed("the inference thread is shut down")
            if self._aside is None:
                self._aside = Inference(self.clock, self._nthreads, f"{self._name}-aside")
            aside = self._aside
        return await aside.run(0.0, fn, *args)

    def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Refuse new work and drop waiting jobs; wait up to ``grace_s`` for the jobs already
        running (see :data:`CLOSE_GRACE_S`).

        Never waits longer: a stuck model call must not make shutdown hang (its thread is a
        daemon, so it cannot keep the process alive either).
        """
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()
            aside = self._aside
        deadline = time.monotonic() + grace_s
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join(max(0.0, deadline - time.monotonic()))
        if aside is not None:
            aside.close(max(0.0, deadline - time.monotonic()))

    @property
    def waiting(self) -> int:
        """Jobs queued and not started."""
        with self._cv:
            return len(self._heap)

    def _account(self, t0: float) -> None:
        with self._cv:
            self.busy_s += time.thread_time() - t0
            self.jobs += 1

    def _work(self, threads: int) -> None:
        _init_thread(threads)
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                _, _, job = heapq.heappop(self._heap)
            job()


def _hand_back(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody waits for this result any more
        pass


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)


def _init_thread(threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(max(1, threads))
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(max(1, threads))
    except ImportError:
        pass
