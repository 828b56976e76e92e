"""One engine, many sessions: the loaded models, the renderer and the inference thread are shared;
each session holds only its own state (audio timeline, chunker, motion history, player, avatar).

* Motion generators are *forked* per session from one loaded generator (same weights, fresh state).
* All sessions' model work goes through one :class:`~avatar_agent.inference.Inference` thread,
  earliest due frame first, so a session with a long chunk does not make another's frame late.
* Admission control: capacity is ``server.max_sessions`` when set, else measured — sessions fit
  while their summed CPU stays below :data:`TARGET_LOAD` of the cores the process can use
  (each session's share is measured on the running sessions; before any has run long enough,
  from a warm-up timing of one second of frames).  Beyond capacity
  :class:`CapacityError` carries a Retry-After; running sessions are never degraded.
* Idle sessions (no API call and no viewer for ``server.session_idle_s``) are closed.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import resource
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from .agent import Agent
from .clock import Clock, SystemClock
from .config import Config
from .inference import Inference
from .render.batching import RenderBatcher
from .session import Session
from .types import MotionGenerator, Renderer, Sink

log = logging.getLogger(__name__)

TARGET_LOAD = 0.75
"""Share of the usable cores admission control fills; the rest absorbs bursts (speech onsets,
viewers joining, the HTTP API).  Measured on 2 cores at 512² with 2 inference workers
(``bench --sessions N``, 2026-12-05): 9 sessions held 25 fps with ≤ 0.27 % dropped at about
0.16 cores each, 10 were at the edge (0.2–9 % dropped between runs) — this admits 9."""


@dataclass(frozen=True)
class Shard:
    """An engine's part of the machine when ``serve`` spreads sessions over processes
    (:mod:`avatar_agent.server.shards`); the default is the whole machine."""

    index: int = 0
    count: int = 1

    @property
    def prefix(self) -> str:
        """Session ids of this shard start with it, so the parent routes a request by its id
        alone; empty when unsharded."""
        return f"{self.index}-" if self.count > 1 else ""


@runtime_checkable
class Forkable(Protocol):
    """A motion generator that can make per-session copies sharing its loaded weights."""

    def fork(self, seed: int) -> MotionGenerator:
        """A new generator: the same networks, fresh streaming state, its own noise seed."""
        ...


class CapacityError(RuntimeError):
    """No room for another session; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Running:
    session: Session
    task: asyncio.Task[None]
    started: float
    cpu0: float
    loop: asyncio.AbstractEventLoop
    """The loop the session runs on (a LiveKit worker runs each job on a thread of its own)."""


class Engine:
    """Shared models + the sessions using them.

    Args:
        cfg: the configuration every session starts from.
        clock: the injected clock (default: the system clock).
        motion: a loaded generator to fork sessions from (default: built from ``cfg``).
        renderer: the shared renderer (default: built from ``cfg``).
        vad: factory of per-session VADs (default: from ``cfg``).
        shard: this engine's share of the machine (capacity, inference threads, session ids).
    """

    def __init__(self, cfg: Config, clock: Clock | None = None, *,
                 motion: MotionGenerator | None = None, renderer: Renderer | None = None,
                 vad: Callable[[], Any] | None = None, shard: Shard = Shard()) -> None:
        from .wiring import make_motion, make_renderer, make_vad

        self.cfg, self.clock, self.shard = cfg, clock or SystemClock(), shard
        self.renderer = renderer or make_renderer(cfg)
        self._base = motion or make_motion(cfg)
        self._make_vad = vad or (lambda: make_vad(cfg))
        self.inference = Inference(self.clock, cfg.render.threads,
                                   workers=inference_workers(cfg, shard.count))
        # Frames of sessions that wait together become one renderer call (GPU renderers).
        self.batcher = RenderBatcher(self.renderer, self.inference)
        self.sessions: dict[str, _Running] = {}
        self._seeds = itertools.count(cfg.motion.seed + 1)
        self._opening = 0
        self._cost_estimate = 0.0          # inference-thread share of one session (warm-up timing)
        self._reaper: asyncio.Task[None] | None = None
        self._collect_on: asyncio.AbstractEventLoop | None = None
        """The loop a post-session collection is pending on (its timer dies with it)."""
        self.closed_listeners: list[Callable[[str], None]] = []
        """Called with a session's id when it has ended (closed, idle, failed), on its loop."""

    # ---- capacity -------------------------------------------------------------------------------

    @property
    def per_session_load(self) -> float:
        """Measured share of a core one session uses: the process's CPU time over the running
        sessions (the event loop's work counts too), else the warm-up estimate."""
        runs = [r for r in self.sessions.values() if self.clock.now() - r.started > 5.0]
        if not runs:
            return self._cost_estimate
        span = max(self.clock.now() - min(r.started for r in runs), 1e-3)
        cpu = _process_cpu_s() - min(r.cpu0 for r in runs)
        return max(cpu / span / max(len(self.sessions), 1), self._cost_estimate * 0.5)

    @property
    def capacity(self) -> int:
        """How many sessions fit (``server.max_sessions``, else measured): sessions fit while
        their summed CPU stays under :data:`TARGET_LOAD` of the cores the process can use (the
        inference workers plus the event loop's thread, within this shard's share)."""
        if self.cfg.server.max_sessions > 0:
            return self.cfg.server.max_sessions
        cost = self.per_session_load
        cores = min(_cores() / self.shard.count, self.inference.workers + 1)
        return max(1, int(TARGET_LOAD * cores / cost)) if cost > 0 else 1

    @property
    def load(self) -> float:
        """Active sessions / capacity (what a load balancer or LiveKit's dispatcher reads)."""
        return (len(self.sessions) + self._opening) / self.capacity

    def status(self) -> dict[str, Any]:
        """Load figures for /readyz and the status API."""
        return {"sessions": len(self.sessions), "capacity": self.capacity,
                "load": round(self.load, 3), "per_session_load": round(self.per_session_load, 4),
                "inference_waiting": self.inference.waiting}

    async def warm_up(self) -> None:
        """Load/trace the models and time one session-second of work (the first cost estimate)."""
        from .face.landmarks import load_portrait

        image = await asyncio.to_thread(load_portrait, self.cfg.avatar_path())
        now = self.clock.now()
        avatar = await self.inference.run(now, self.renderer.prepare, image)
        gen = self._fork()
        await self.inference.run(now, gen.prepare, avatar)
        fps = self.cfg.player.fps
        rest = np.repeat(np.asarray(gen.rest_pose, np.float32)[None], fps, 0)
        busy0 = self.inference.busy_s
        await self.inference.run(now, gen.idle, fps, rest[0], 0.0)
        await self.inference.run(now, self.renderer.render, avatar, rest)
        # one second of idle frames, + speech and the loop's own work (measured ≈ 2× on 512²)
        self._cost_estimate = max(self.inference.busy_s - busy0, 1e-4) * 2.0

    # ---- sessions -------------------------------------------------------------------------------

    async def open_session(self, *, avatar: str | None = None, emotion: str | None = None,
                           voice: str | None = None, sinks: list[Sink] | None = None,
                           image: np.ndarray | None = None) -> Session:
        """Start a session fed by a speech queue (say / push); returns it once its face is ready.

        Raises:
            CapacityError: the engine is full (running sessions keep their budget).
        """
        from .audio.queue import SpeechQueueSource
        from .wiring import make_phones

        if len(self.sessions) + self._opening + 1 > self.capacity:
            raise CapacityError(f"at capacity ({self.capacity} sessions): retry later or add "
                                "a machine", retry_after_s=5.0)
        self._opening += 1
        try:
            cfg = self.cfg
            a = cfg.audio
            source = SpeechQueueSource(self.clock, voice=voice or a.voice, rate_wpm=a.tts_rate,
                                       max_queued_s=a.max_queued_s)
            agent = Agent(cfg, source=source, vad=self._make_vad(), motion=self._fork(),
                          renderer=self.renderer, sinks=list(sinks or ()), clock=self.clock,
                          inference=self.inference, batcher=self.batcher, image=image,
                          phones=make_phones(cfg, shared=True))
            session = Session(agent, id=self.shard.prefix + secrets.token_urlsafe(9))
            if avatar is not None:
                session.avatar_path = avatar
            if emotion is not None:
                session.set_emotion(emotion)
            if image is None and avatar is not None:
                from .face.landmarks import load_portrait

                agent.image = await asyncio.to_thread(load_portrait, avatar)
            await agent.warm_up()
            task = asyncio.create_task(self._run(session), name=f"session-{session.id}")
            self.sessions[session.id] = _Running(session, task, self.clock.now(),
                                                 _process_cpu_s(), asyncio.get_running_loop())
        finally:
            self._opening -= 1
        self._ensure_reaper()
        log.info("session %s opened (%d/%d)", session.id, len(self.sessions), self.capacity)
        return session

    async def close_session(self, session_id: str) -> bool:
        """Stop a session (its queued frames drain); False if there is no such session."""
        run = self.sessions.get(session_id)
        if run is None:
            return False
        if run.loop is asyncio.get_running_loop():
            await self._stop(run)
        elif not run.loop.is_closed():              # its loop is another thread's: ask it there
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._stop(run), run.loop))
        return True

    async def _stop(self, run: _Running) -> None:
        run.session.agent.stop()
        await asyncio.wait({run.task}, timeout=self.cfg.service.drain_s + 2.0)
        if not run.task.done():
            run.task.cancel()

    def get(self, session_id: str) -> Session | None:
        """The running session with this id."""
        run = self.sessions.get(session_id)
        return run.session if run is not None else None

    async def aclose(self) -> None:
        """Close every session and the inference thread."""
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*(self.close_session(i) for i in list(self.sessions)),
                             return_exceptions=True)
        self.inference.close()

    async def _run(self, session: Session) -> None:
        try:
            await session.run()
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # one session's failure never touches the others
            log.error("session %s ended by a failure: %s", session.id, e)
        finally:
            self.sessions.pop(session.id, None)
            log.info("session %s closed (%d left)", session.id, len(self.sessions))
            for listener in list(self.closed_listeners):
                try:
                    listener(session.id)
                except Exception:
                    log.exception("session-closed listener failed")
            self._collect_soon()

    def _collect_soon(self) -> None:
        """A full garbage collection shortly after a session ends (one pending at a time).

        Why: an ended session's avatar tables, buffers and tasks hang in reference cycles (≈ 2 MB
        each at 256², more at 512²), which only a full collection frees — and with the startup
        heap frozen (:func:`~avatar_agent.memory.freeze_startup_heap`) CPython starts one only
        after tens of thousands of new long-lived objects: measured with 8 sessions churning on a
        256² engine, malloc's bytes in use grew 1.85 MB per closed session for 160 closures
        (336 → 595 MB) and stayed at 247 MB with a collection after each.  With the startup heap
        frozen a full collection takes milliseconds.

        A loop timer, not a task: a LiveKit job's loop may close right after its session, and a
        timer of a closed loop is simply dropped.  (Wall time, not the injected clock: it only
        frees memory.)"""
        pending = self._collect_on
        if pending is not None and not pending.is_closed():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:                     # ended outside a loop (interpreter shutdown)
            return
        self._collect_on = loop
        # (later, not now: the API and the session's own tasks drop their references first)
        loop.call_later(GC_DELAY_S, self._collect)

    def _collect(self) -> None:
        self._collect_on = None
        t0 = time.perf_counter()
        freed = gc.collect()
        log.debug("full collection after a session ended: %d objects, %.1f ms", freed,
                  1000 * (time.perf_counter() - t0))

    def _fork(self) -> MotionGenerator:
        from .wiring import make_motion

        if isinstance(self._base, Forkable):
            return self._base.fork(next(self._seeds))
        return make_motion(self.cfg)

    def _ensure_reaper(self) -> None:
        if self.cfg.server.session_idle_s > 0 and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.create_task(self._reap(), name="session-reaper")

    async def _reap(self) -> None:
        limit = self.cfg.server.session_idle_s
        while self.sessions:
            await self.clock.sleep_until(self.clock.now() + min(limit / 4, 5.0))
            now = self.clock.now()
            for sid, run in list(self.sessions.items()):
                if now - run.session.last_activity > limit and not run.session.watched:
                    log.info("session %s idle for %.0f s: closing", sid, limit)
                    await self.close_session(sid)


def _process_cpu_s() -> float:
    """CPU seconds this process has used (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


GC_DELAY_S = 1.0
"""How long after a session ends its cyclic garbage is collected (see ``Engine._collect_soon``)."""


AUTO_WORKERS_MAX = 2
"""``server.inference_workers = 0`` gives the embedded profile one inference thread per core,
up to this many: the threads share one GIL, and the renderer's Python between its OpenCV calls
is what limits a CPU session server (measured on 2 cores, 10 sessions: 1 thread 1.1 cores and a
collapse, 2 threads < 0.5 % dropped, 3 threads a collapse)."""


def inference_workers(cfg: Config, shards: int = 1) -> int:
    """The inference threads an engine runs: ``server.inference_workers``, or with 0 one per
    core of its share (the cores over ``shards`` processes) up to :data:`AUTO_WORKERS_MAX` for
    the embedded profile, and 1 for the official one (one torch context, whose operators use
    the cores themselves)."""
    if cfg.server.inference_workers:
        return cfg.server.inference_workers
    if cfg.avatar.profile != "embedded":
        return 1
    return max(1, min(_cores() // max(shards, 1), AUTO_WORKERS_MAX))


AUTO_SHARDS_MAX = 8
"""``server.shards = 0`` spreads the embedded profile's sessions over one process per core, up
to this many (each holds its own models, ~0.5 GB)."""


def shard_count(cfg: Config) -> int:
    """The processes ``serve`` spreads sessions over: ``server.shards``, or with 0 one per core
    up to :data:`AUTO_SHARDS_MAX` for the embedded profile and 1 for the official one (a GPU's
    memory holds one copy of the models; its kernels are not held back by the interpreter
    lock).  Measured on 2 cores (2026-12-06, `bench --sessions`): one engine held 10 sessions
    at the edge (0.27 % dropped at 1.48 cores), two processes of 6 held 12 with none dropped."""
    if cfg.server.shards:
        return cfg.server.shards
    if cfg.avatar.profile != "embedded":
        return 1
    return max(1, min(_cores(), AUTO_SHARDS_MAX))


def _cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
