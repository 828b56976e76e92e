"""A source that plays prepared AudioFrames (e.g. a synthesized utterance) paced by a clock."""

from __future__ import annotations

from typing import AsyncIterator, Sequence

import numpy as np

from ..clock import Clock
from ..types import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame


class FramesSource:
    """Yields the given frames; frame k is delivered when its last sample has been "captured"
    (t0 + (k + 1) · 20 ms on the clock), like a microphone would."""

    def __init__(self, frames: Sequence[AudioFrame], clock: Clock) -> None:
        self._frames = list(frames)
        self._clock = clock
        self._closed = False

    @classmethod
    def from_audio(cls, audio: np.ndarray, clock: Clock, phonemes: tuple = ()) -> "FramesSource":
        """Cut 16 kHz float32 audio into frames (the last one zero-padded)."""
        n = -(-len(audio) // FRAME_SAMPLES)
        padded = np.zeros(n * FRAME_SAMPLES, np.float32)
        padded[:len(audio)] = audio
        frames = []
        for k in range(n):
            t0, t1 = k * FRAME_SAMPLES / SAMPLE_RATE, (k + 1) * FRAME_SAMPLES / SAMPLE_RATE
            ph = tuple(p for p in phonemes if p.start < t1 and p.end > t0)
            frames.append(AudioFrame(padded[k * FRAME_SAMPLES:(k + 1) * FRAME_SAMPLES],
                                     k * FRAME_SAMPLES, ph))
        return cls(frames, clock)

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Yield every frame at its capture time."""
        t0 = self._clock.now()
        for k, f in enumerate(self._frames):
            await self._clock.sleep_until(t0 + (k + 1) * FRAME_SAMPLES / SAMPLE_RATE)
            if self._closed:
                return
            yield f

    async def close(self) -> None:
        """Stop after the current frame."""
        self._closed = True
