"""Clock pacing of 20 ms frames, and a source that plays prepared frames.

:func:`paced` is the one place where "frame k is delivered at t0 + (k + 1) · 20 ms" is written
(:func:`capture_time` for sources that decide a frame's content only once it is due).  Framing
itself is :class:`~avatar_agent.audio.resample.Framer`'s job.
"""

from __future__ import annotations

import contextlib
from typing import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Sequence

import numpy as np

from ..clock import Clock
from ..types import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, Phoneme
from .resample import frame_audio


def capture_time(t0: float, index: int) -> float:
    """When the frame starting at sample ``index`` (counted from ``t0``) has been fully captured:
    a microphone delivers it then, so every paced source does too."""
    return t0 + (index + FRAME_SAMPLES) / SAMPLE_RATE


async def _aiter(frames: Iterable[AudioFrame] | AsyncIterable[AudioFrame]
                 ) -> AsyncGenerator[AudioFrame, None]:
    if isinstance(frames, AsyncGenerator):
        async with contextlib.aclosing(frames):   # closing us closes it (its finally runs now)
            async for f in frames:
                yield f
    elif isinstance(frames, AsyncIterable):
        async for f in frames:
            yield f
    else:
        for f in frames:
            yield f


async def paced(frames: Iterable[AudioFrame] | AsyncIterable[AudioFrame], clock: Clock
                ) -> AsyncGenerator[AudioFrame, None]:
    """Yield frame k at ``t0 + (k + 1) · 20 ms`` on ``clock`` (t0: when iteration starts).

    Due times come from t0 and the count, never from accumulated sleeps, so a late frame does not
    delay the ones after it.  Closing this generator closes ``frames`` too (when it is an async
    generator: its ``finally`` blocks run at once, not at garbage collection).
    """
    t0 = clock.now()
    async with contextlib.aclosing(_aiter(frames)) as it:
        k = 0
        async for f in it:
            await clock.sleep_until(capture_time(t0, k * FRAME_SAMPLES))
            yield f
            k += 1


class FramesSource:
    """Yields the given frames; frame k is delivered when its last sample has been "captured"
    (t0 + (k + 1) · 20 ms on the clock), like a microphone would."""

    def __init__(self, frames: Sequence[AudioFrame], clock: Clock) -> None:
        self._frames = list(frames)
        self._clock = clock
        self._closed = False

    @classmethod
    def from_audio(cls, audio: np.ndarray, clock: Clock, phonemes: Iterable[Phoneme] = ()
                   ) -> "FramesSource":
        """Cut 16 kHz float32 audio into frames (the last one zero-padded)."""
        return cls(frame_audio(audio, phonemes), clock)

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Yield every frame at its capture time."""
        async with contextlib.aclosing(paced(self._frames, self._clock)) as frames:
            async for f in frames:
                if self._closed:
                    return
                yield f

    async def close(self) -> None:
        """Stop after the current frame."""
        self._closed = True
