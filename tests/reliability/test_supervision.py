"""Row 7 of the fault table, by in-process fault injection: what failure does.

* a source that dies mid-run ends the session, and `start` returns non-zero (systemd restarts it);
* a renderer that keeps failing freezes nothing silently: the session reports it is not
  producing, /healthz would say so, and the watchdog (a real NOTIFY_SOCKET) stops being fed;
* a stuck inference call cannot make SIGTERM hang: shutdown completes within the drain time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from typing import AsyncIterator

import numpy as np
import pytest

from avatar_agent.agent import Agent
from avatar_agent.audio.queue import SpeechQueueSource
from avatar_agent.clock import SystemClock
from avatar_agent.config import load_config
from avatar_agent.service import Notifier
from avatar_agent.types import AudioFrame
from tests.fakes import EnergyVad, LevelMotion, LevelRenderer, MemorySink

pytestmark = pytest.mark.timeout(120)


class DyingSource:
    """Silence for ``after`` seconds, then the device is gone."""

    def __init__(self, after: float = 0.5) -> None:
        self.after = after

    async def frames(self) -> AsyncIterator[AudioFrame]:
        clock = SystemClock()
        t0 = clock.now()
        k = 0
        while True:
            await clock.sleep_until(t0 + (k + 1) * 0.02)
            if clock.now() - t0 > self.after:
                raise OSError("audio device vanished")
            yield AudioFrame(np.zeros(320, np.float32), k * 320)
            k += 1

    async def close(self) -> None:
        pass


async def test_a_source_that_dies_makes_start_exit_non_zero(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    from avatar_agent import live, wiring

    monkeypatch.setattr(wiring, "make_source", lambda cfg, clock: DyingSource())
    cfg = load_config(None, ["render.size=128", "server.port=0", 'sinks.enabled=["webrtc"]',
                             "motion.generator=procedural"])
    t = time.monotonic()
    assert await live.run_start(cfg, None, []) == 1
    assert time.monotonic() - t < 60


class FailingRenderer(LevelRenderer):
    """Renders for a while, then fails every call (a broken GPU, a corrupt model)."""

    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.monotonic()
        self.broken_after = 1.0

    def render(self, avatar, motion):  # type: ignore[no-untyped-def]
        if self.broken_after is not None and time.monotonic() - self.t0 > self.broken_after:
            raise RuntimeError("renderer broke")
        return super().render(avatar, motion)


async def test_a_renderer_that_keeps_failing_stops_feeding_the_watchdog() -> None:
    path = os.path.join(tempfile.mkdtemp(), "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    notifier = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    cfg = load_config(None, ["service.frozen_s=0.5", "service.drain_s=0", "render.batch=1"])
    clock = SystemClock()
    renderer = FailingRenderer()
    agent = Agent(cfg, source=SpeechQueueSource(clock), vad=EnergyVad(), motion=LevelMotion(),
                  renderer=renderer, sinks=[MemorySink(keep=False)], clock=clock,
                  image=np.zeros((64, 64, 3), np.uint8), notifier=notifier)
    run = asyncio.create_task(agent.run())
    pings: list[float] = []
    healthy: list[tuple[float, bool]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        await asyncio.sleep(0.05)
        healthy.append((time.monotonic() - t0, agent.producing))
        while True:
            try:
                msg = sock.recv(4096).decode()
            except BlockingIOError:
                break
            if "WATCHDOG=1" in msg:
                pings.append(time.monotonic() - t0)
    agent.stop()
    await run
    sock.close()
    assert any(ok for t, ok in healthy if t < 1.0)                  # fine while it renders
    assert not any(ok for t, ok in healthy if t > 2.0)              # then reported frozen
    assert any(t < 1.0 for t in pings)
    assert not any(t > 2.0 for t in pings)                          # and the watchdog starves


async def test_a_stuck_inference_call_cannot_make_shutdown_hang() -> None:
    class Stuck(LevelMotion):
        def idle(self, n, prev, t0):  # type: ignore[no-untyped-def]
            if t0 > 0.5:
                time.sleep(30)                                       # a hung model call
            return super().idle(n, prev, t0)

    cfg = load_config(None, ["service.drain_s=0.5"])
    clock = SystemClock()
    agent = Agent(cfg, source=SpeechQueueSource(clock), vad=EnergyVad(), motion=Stuck(),
                  renderer=LevelRenderer(), sinks=[MemorySink(keep=False)], clock=clock,
                  image=np.zeros((64, 64, 3), np.uint8))
    run = asyncio.create_task(agent.run())
    await asyncio.sleep(2.0)                                         # the call is stuck by now
    t = time.monotonic()
    agent.stop()
    await asyncio.wait_for(run, 10)
    assert time.monotonic() - t < cfg.service.drain_s + 1.0
