"""Named fakes for the plug-in seams (no mock libraries): small, real implementations."""

from __future__ import annotations

from typing import AsyncIterator

import numpy as np

from avatar_agent.audio.frames import capture_time
from avatar_agent.clock import Clock
from avatar_agent.types import (EMOTION_NONE, FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, Avatar,
                                SpeechChunk, VideoFrame)


class ArraySource:
    """Plays a float32 16 kHz array as 20 ms frames, paced by a clock (or as fast as possible)."""

    def __init__(self, audio: np.ndarray, clock: Clock | None = None) -> None:
        self.audio = np.asarray(audio, np.float32)
        self.clock = clock
        self.closed = False
        self._pos = 0

    def interrupt(self) -> tuple[None, int]:
        """Stop speaking: the rest of the audio becomes silence (the timeline goes on)."""
        self.audio = self.audio.copy()
        self.audio[self._pos:] = 0.0
        return None, self._pos

    async def frames(self) -> AsyncIterator[AudioFrame]:
        t0 = self.clock.now() if self.clock else 0.0
        n = len(self.audio) // FRAME_SAMPLES
        for k in range(n):
            self._pos = k * FRAME_SAMPLES              # next sample not yet delivered
            if self.clock is not None:   # not frames.paced: the frame is cut after the wait,
                # so an interrupt() during it silences this very frame
                await self.clock.sleep_until(capture_time(t0, k * FRAME_SAMPLES))
            s = self.audio[k * FRAME_SAMPLES:(k + 1) * FRAME_SAMPLES]
            yield AudioFrame(samples=s, index=k * FRAME_SAMPLES)

    async def close(self) -> None:
        self.closed = True


class EnergyVad:
    """Speech = RMS above a threshold (deterministic, for pipeline tests)."""

    def __init__(self, threshold: float = 0.02) -> None:
        self.threshold = threshold

    def is_speech(self, samples: np.ndarray) -> bool:
        return float(np.sqrt(np.mean(np.square(samples)))) > self.threshold


class LevelMotion:
    """Motion whose exp[0] is the audio RMS of each frame; idle = rest."""

    profile = "embedded"
    fps = 25
    min_hop_ms = 0

    def __init__(self) -> None:
        self.rest = np.zeros(70, np.float32)
        self.calls: list[tuple[int, int]] = []        # (start sample, frames) per generate
        self.chunks: list[SpeechChunk] = []           # the chunks generate was given
        self.resets = 0

    def prepare(self, avatar: Avatar) -> None:
        self.rest = avatar.rest_motion.astype(np.float32)

    @property
    def rest_pose(self) -> np.ndarray:
        return self.rest

    def set_emotion(self, emotion: int, intensity: float = 1.0) -> None:
        pass

    def reset(self) -> None:
        self.resets += 1

    def generate(self, chunk: SpeechChunk, prev: np.ndarray, emotion: int = EMOTION_NONE,
                 intensity: float = 1.0) -> np.ndarray:
        spf = SAMPLE_RATE // self.fps
        n = chunk.n_new // spf
        self.calls.append((chunk.start, n))
        self.chunks.append(chunk)
        a = chunk.new_audio.reshape(n, spf)
        out = np.repeat(self.rest[None], n, 0)
        out[:, 0] = np.sqrt(np.mean(a ** 2, axis=1))
        return out

    def idle(self, n: int, prev: np.ndarray, t0: float) -> np.ndarray:
        return np.repeat(self.rest[None], n, 0)


class LevelRenderer:
    """Renders motion exp[0] (mouth level) as the brightness of a small image."""

    profile = "embedded"

    def __init__(self, size: int = 64) -> None:
        self.size = size

    def prepare(self, image: np.ndarray) -> Avatar:
        return Avatar(profile="embedded", image=image, crop=image, crop_to_image=np.eye(3),
                      kp_canonical=np.zeros((21, 3), np.float32),
                      rest_motion=np.zeros(70, np.float32))

    def render(self, avatar: Avatar, motion: np.ndarray) -> np.ndarray:
        level = np.clip(motion[:, 0] * 1000, 0, 255).astype(np.uint8)
        return np.broadcast_to(level[:, None, None, None],
                               (len(motion), self.size, self.size, 3)).copy()


class MemorySink:
    """Keeps every frame it receives (or only counts them with keep=False)."""

    def __init__(self, name: str = "memory", keep: bool = True, fail_every: int = 0) -> None:
        self.name = name
        self.keep = keep
        self.frames: list[VideoFrame] = []
        self.count = 0
        self.started: tuple[int, int, int] | None = None
        self.closed = False
        self.fail_every = fail_every
        self.send_times: list[float] = []

    async def start(self, width: int, height: int, fps: int) -> None:
        self.started = (width, height, fps)

    async def send(self, frame: VideoFrame) -> None:
        self.count += 1
        if self.fail_every and self.count % self.fail_every == 0:
            raise OSError("simulated sink failure")
        if self.keep:
            self.frames.append(frame)

    async def close(self) -> None:
        self.closed = True


def recorded_voice(name: str = "Front_Center.wav") -> np.ndarray:
    """A woman's recorded voice from alsa-utils (install.sh --dev), 16 kHz mono float32
    ("Front_Center.wav" says "front center")."""
    import soundfile as sf
    import soxr

    x, sr = sf.read(f"/usr/share/sounds/alsa/{name}", dtype="float32", always_2d=True)
    return soxr.resample(x.mean(1), sr, SAMPLE_RATE).astype(np.float32)
