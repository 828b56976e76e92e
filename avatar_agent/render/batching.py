"""Frames of several sessions in one renderer call.

Every session's animate task asks for its frames with its own inference job.  On a GPU the
warping + generator cost is mostly per call, not per frame, so jobs that wait at the same time
should become one call: :class:`RenderBatcher` keeps the requests that are waiting, and the
first of their jobs the inference thread runs renders all of them (earliest due first, up to
``max_frames``) through :meth:`BatchRenderer.render_many`; the jobs of requests served that way
find their frames ready and return at once.

The inference queue's order is untouched: the batch runs when the earliest-due job of the waiting
ones is taken, so no request is later than it would be alone, and each request keeps its own
inference job (with its due time, and the clock hold a FakeClock needs).

A request may carry an expiry: the due time of its last frame.  One taken after it is not
rendered (:class:`RenderExpired`): its images would only be thrown away as late, and under
overload that work would deepen the backlog the other sessions wait behind.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from avatar_agent.inference import Inference
from avatar_agent.types import Avatar, Renderer


@runtime_checkable
class BatchRenderer(Protocol):
    """A renderer that renders frames of several avatars in one call (LivePortraitRenderer)."""

    def render_many(self, jobs: Sequence[tuple[Avatar, np.ndarray]]) -> list[np.ndarray]:
        """uint8 frames [B_i, size, size, 3] for each (avatar, motion [B_i, 70]) job, in order."""
        ...


class RenderExpired(RuntimeError):
    """The request's frames were all due before its render could start; nothing was rendered."""


@dataclass(eq=False)
class _Request:
    due: float
    avatar: Avatar
    motion: np.ndarray
    expire: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class RenderBatcher:
    """Coalesces waiting render requests of any number of sessions into one renderer call.

    Args:
        renderer: the shared renderer; one without ``render_many`` (the embedded warp renderer)
            gets each request in its own job, as without the batcher (several CPU workers then
            keep rendering in parallel).
        inference: the shared inference executor.
        max_frames: most frames per coalesced call (the renderer splits its W + G calls further
            by its own ``max_batch``); a request is never split.

    Use ``await batcher.render(due, avatar, motion)`` where a session would call
    ``await inference.run(due, renderer.render, avatar, motion)``.
    """

    def __init__(self, renderer: Renderer, inference: Inference, max_frames: int = 64) -> None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be ≥ 1, got {max_frames}")
        self.renderer, self.inference, self.max_frames = renderer, inference, max_frames
        self._batches = isinstance(renderer, BatchRenderer)
        self._lock = threading.Lock()
        self._waiting: list[_Request] = []
        self.calls = 0
        """Renderer calls made (a batch of several requests counts once)."""

    async def render(self, due: float, avatar: Avatar, motion: np.ndarray,
                     expire: float | None = None) -> np.ndarray:
        """uint8 [B, size, size, 3] frames for ``motion`` [B, 70], rendered in the inference
        thread, possibly together with other sessions' waiting requests.

        Raises:
            RenderExpired: the clock was past ``expire`` when the render would have started.
        """
        req = _Request(due, avatar, np.asarray(motion, np.float32), expire)
        with self._lock:
            self._waiting.append(req)
        return await self.inference.run(due, self._serve, req)

    def _serve(self, req: _Request) -> np.ndarray:
        """Inference-thread job of ``req``: render it and whatever else waits, unless an earlier
        job already did."""
        with self._lock:
            batch = self._take(req) if req in self._waiting else []
        now = self.inference.clock.now()
        for r in [r for r in batch if r.expire is not None and now > r.expire]:
            batch.remove(r)
            r.error = RenderExpired(f"frames due by {r.expire:.3f} s, render started at {now:.3f} s")
            r.done.set()
        if batch:
            self._render(batch)
        req.done.wait()                       # served by this job or by another worker's
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _take(self, first: _Request) -> list[_Request]:
        """``first`` and the other waiting requests, earliest due first, within max_frames."""
        batch, frames = [first], len(first.motion)
        for r in sorted(self._waiting, key=lambda r: r.due) if self._batches else ():
            if r is not first and frames + len(r.motion) <= self.max_frames:
                batch.append(r)
                frames += len(r.motion)
        self._waiting = [r for r in self._waiting if r not in batch]
        return batch

    def _render(self, batch: list[_Request]) -> None:
        try:
            if len(batch) > 1 and isinstance(self.renderer, BatchRenderer):  # (_take: only then)
                self.calls += 1
                try:
                    outs = self.renderer.render_many([(r.avatar, r.motion) for r in batch])
                except Exception:
                    outs = None               # one bad request must not fail the others: alone
                if outs is not None:
                    for r, out in zip(batch, outs, strict=True):
                        r.result = out
                    return
            for r in batch:
                self.calls += 1
                try:
                    r.result = self.renderer.render(r.avatar, r.motion)
                except BaseException as e:   # handed to its own session's job
                    r.error = e
        finally:
            for r in batch:
                if r.result is None and r.error is None:
                    r.error = RuntimeError("render batch was abandoned")
                r.done.set()
