"""A small, real Controller for the control-API tests: a SpeechQueueSource played by a task.

Not a mock: say/push/interrupt go through the real speech queue (espeak-ng, soxr), the frames it
yields are kept (so tests can compare samples), events come from the queue, and avatar swaps decode
the image with OpenCV.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import numpy as np

from avatar_agent.audio.queue import SpeechQueueSource
from avatar_agent.clock import Clock, SystemClock
from avatar_agent.types import EMOTIONS, SAMPLE_RATE, AudioFrame, Interrupted


class QueueController:
    """Implements avatar_agent.server.control.Controller over a SpeechQueueSource."""

    def __init__(self, clock: Clock | None = None, **source_kw: Any) -> None:
        self.source = SpeechQueueSource(clock or SystemClock(), **source_kw)
        self.frames: list[AudioFrame] = []
        self.emotion: tuple[str, float | None] = ("neutral", None)
        self.scales: dict[str, float] = {"expression": 1.0, "head": 1.0}
        self.gaze = (0.0, 0.0)
        self.avatar: str | None = None
        self.avatar_switch_frame: int | None = None
        self.swap_delay_s = 0.05
        self.calls: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin playing the source (frames collected in ``self.frames``)."""
        async def play() -> None:
            async for f in self.source.frames():
                self.frames.append(f)

        self._task = asyncio.get_running_loop().create_task(play())

    async def stop(self) -> None:
        await self.source.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def audio(self) -> np.ndarray:
        """Everything played so far, as one array."""
        if not self.frames:
            return np.zeros(0, np.float32)
        return np.concatenate([f.samples for f in self.frames])

    # Controller protocol ------------------------------------------------------------------------

    def say(self, text: str, voice: str | None = None, emotion: str | None = None) -> int:
        self.calls.append("say")
        if emotion is not None:
            self.set_emotion(emotion)
        return self.source.say(text, voice)

    def push_audio(self, samples: np.ndarray, final: bool = False) -> int:
        self.calls.append("push_audio")
        assert samples.dtype == np.float32 and samples.ndim == 1
        return self.source.push(samples, final=final)

    def interrupt(self) -> Interrupted:
        self.calls.append("interrupt")
        uid, pos = self.source.interrupt()
        return Interrupted(utterance=uid, frame=pos // (SAMPLE_RATE // 25))

    def set_emotion(self, name: str, intensity: float | None = None) -> None:
        if name not in EMOTIONS + ("none",):
            raise ValueError(f"unknown emotion {name!r}")
        self.emotion = (name, intensity)

    def set_scales(self, expression: float | None = None, head: float | None = None) -> None:
        if expression is not None:
            self.scales["expression"] = expression
        if head is not None:
            self.scales["head"] = head

    def set_gaze(self, x: float, y: float) -> None:
        self.gaze = (x, y)

    async def swap_avatar(self, path: str) -> None:
        import cv2

        img = await asyncio.to_thread(cv2.imread, path)
        if img is None:
            raise ValueError(f"{path} is not an image OpenCV can read")
        await asyncio.sleep(self.swap_delay_s)           # "preparing" in the background
        self.avatar = path
        self.avatar_switch_frame = len(self.frames)

    def stats(self) -> dict:
        st = self.source.stats()
        st["frames_collected"] = len(self.frames)
        st["emotion"] = self.emotion[0]
        return st

    def subscribe(self, callback: Callable[[str, dict], None]) -> Callable[[], None]:
        return self.source.subscribe(callback)
