"""Real avatar sessions for the integration tests (embedded profile, 128² frames, push/TTS source).

The session runs on a :class:`~avatar_agent.clock.SystemClock`: LiveKit's audio source and the
pipecat transports pace themselves in real time, so the session must too.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import numpy as np

from avatar_agent.agent import Agent
from avatar_agent.clock import SystemClock
from avatar_agent.config import load_config
from avatar_agent.session import Session
from avatar_agent.types import SAMPLE_RATE, Renderer, VideoFrame
from avatar_agent.wiring import make_motion, make_renderer, make_source, make_vad

SIZE = 128
"""Frame size of the test sessions: small, so two cores keep 25 fps beside the framework."""


@contextlib.asynccontextmanager
async def running_session(*overrides: str, renderer: Renderer | None = None
                          ) -> AsyncIterator[Session]:
    """A started session (first frame already produced); closed on exit.

    ``session.run_task`` is its running task; a test that makes it fail awaits it itself.
    """
    cfg = load_config(None, ['audio.source="tts"', f"render.size={SIZE}", "sinks.enabled=[]",
                             *overrides], use_default_path=False)
    clock = SystemClock()
    agent = Agent(cfg, source=make_source(cfg, clock), vad=make_vad(cfg), motion=make_motion(cfg),
                  renderer=renderer or make_renderer(cfg), sinks=[], clock=clock)
    session = Session(agent)
    first = session.frames()
    task = asyncio.create_task(session.run(), name="session")
    session.run_task = task                     # type: ignore[attr-defined]
    await asyncio.wait_for(anext(first), 60)    # warmed up: models loaded, idle frames flowing
    await first.aclose()
    try:
        yield session
    finally:
        await session.aclose()
        if not task.done() or not task.exception():
            await asyncio.wait_for(task, 10)


def tone(seconds: float, rate: int, hz: float = 220.0, amp: float = 0.3) -> np.ndarray:
    """A sine as int16 PCM (a stand-in for TTS audio: deterministic, never silent)."""
    t = np.arange(int(seconds * rate)) / rate
    return (amp * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def frame_samples(session: Session) -> int:
    """Audio samples per video frame (640 at 25 fps)."""
    return SAMPLE_RATE // session.fps


async def collect(frames: AsyncIterator[VideoFrame], n: int) -> list[VideoFrame]:
    """The next n frames of a tap."""
    return [await anext(frames) for _ in range(n)]
