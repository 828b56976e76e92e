"""A session: one conversation's face — the pipeline (:class:`~avatar_agent.agent.Agent`) plus its
controls (speak, push audio, interrupt, emotion, scales, gaze, avatar) and its frame stream.

It implements :class:`~avatar_agent.types.AvatarSession` (what the LiveKit and pipecat adapters
drive) and the control API's ``Controller`` (what the HTTP routes drive).  ``avatar-agent start``
runs one session with its sinks; the session server (:mod:`avatar_agent.engine`) runs many, all
sharing one engine (models, renderer weights, the inference thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, AsyncIterator, Callable

import numpy as np

from .agent import Agent
from .audio.queue import QueueFullError
from .motion.emotion import emotion_label
from .types import SAMPLE_RATE, Interrupted, SpeechSource, VideoFrame

log = logging.getLogger(__name__)

TAP_FRAMES = 50
"""Frames a slow :meth:`Session.frames` consumer may lag (2 s); beyond it the oldest is dropped."""


class NotASpeechSessionError(ValueError):
    """say/push need a speech-queue source (the mic drives the face by itself)."""


class FrameTap:
    """A sink that hands the player's frames to an async iterator through a bounded queue.

    Overflow policy: drop the oldest frame and count it (a consumer that stalls 2 s loses the
    oldest frames, never the newest, and never blocks the clock).  Segment marks of a dropped
    frame move to the next queued one, so no segment end is ever lost.
    """

    name = "frames"

    def __init__(self, size: int = TAP_FRAMES) -> None:
        self._q: asyncio.Queue[VideoFrame | None] = asyncio.Queue(size)
        self.dropped = 0

    async def start(self, width: int, height: int, fps: int) -> None:
        """Nothing to open."""

    async def send(self, frame: VideoFrame) -> None:
        """Queue the frame; drop the oldest when full."""
        if self._q.full():
            old = self._q.get_nowait()
            self.dropped += 1
            if old is not None and old.segments:
                frame = dataclasses.replace(frame, segments=old.segments + frame.segments)
        self._q.put_nowait(frame)

    async def close(self) -> None:
        """End the iterator (after the frames already queued)."""
        if self._q.full():
            self._q.get_nowait()
        self._q.put_nowait(None)

    async def frames(self) -> AsyncIterator[VideoFrame]:
        """The frames, in order, until the session closes."""
        while (frame := await self._q.get()) is not None:
            yield frame


class Session:
    """One conversation.  Build it with :meth:`avatar_agent.engine.Engine.open_session` (or
    around an :class:`Agent` you built yourself), run it with :meth:`run`.

    Args:
        agent: the pipeline; its source decides whether say/push work (a speech-queue source).
        id: the session's id (the session server's URL segment).
    """

    def __init__(self, agent: Agent, id: str = "local") -> None:
        self.agent, self.id = agent, id
        self.fps, self.size = agent.fps, agent.cfg.render.size
        self.steering = agent.steering
        self.steering.emotion = emotion_label(agent.cfg.avatar.emotion)
        self.steering.intensity = agent.cfg.avatar.intensity
        self.last_activity = agent.clock.now()
        self.avatar_path = str(agent.cfg.avatar_path())
        self.stats_providers: list[Callable[[], dict[str, Any]]] = []
        """More counters for :meth:`stats` (e.g. the WebRTC sink's viewers)."""
        self.viewers: Callable[[], int] = lambda: 0
        """Connected viewers (set by whoever attaches a WebRTC sink); watched sessions never
        time out as idle."""

    # ---- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until closed or the source ends; a failing task ends it with that error."""
        try:
            await self.agent.run()
        except BaseException as e:
            self.agent.events.emit("session_ended", reason=_reason(e))
            raise
        self.agent.events.emit("session_ended", reason="closed")

    async def aclose(self) -> None:
        """Stop the session (queued frames still play for up to service.drain_s)."""
        self.agent.stop()

    def frames(self) -> AsyncIterator[VideoFrame]:
        """Frames as the player sends them (each with its audio slice and segment marks).

        Call before :meth:`run` starts, or at any time: a tap added later sees frames from then on.
        """
        tap = FrameTap()
        self.agent.sinks.append(tap)
        return tap.frames()

    # ---- speech ---------------------------------------------------------------------------------

    @property
    def speech(self) -> SpeechSource:
        """The speech-queue source (raises for a microphone session)."""
        src = self.agent.source
        if not isinstance(src, SpeechSource):
            raise NotASpeechSessionError("this session listens to a microphone/file: say and push "
                                         "need audio.source = \"tts\"")
        return src

    def say(self, text: str, voice: str | None = None, emotion: str | None = None) -> int:
        """Speak ``text`` with espeak-ng (queued after earlier speech); returns the segment id."""
        if emotion is not None:
            self.set_emotion(emotion)
        self._touch()
        return self.speech.say(text, voice)

    def push_audio(self, pcm: np.ndarray | bytes, rate: float = SAMPLE_RATE, channels: int = 1,
                   *, final: bool = False) -> int:
        """Append PCM to the open segment (``final=True`` also closes it); returns its id.

        Raises:
            QueueFullError: the session already holds its maximum of unplayed audio.
        """
        self._touch()
        return self.speech.push(pcm, rate, channels, final=final)

    def end_segment(self) -> int | None:
        """Close the open pushed segment: its SegmentEnded follows once it has played."""
        self._touch()
        return self.speech.end_stream()

    def interrupt(self) -> Interrupted:
        """Drop all unplayed speech: the next frame is silent and shows the idle face."""
        self._touch()
        src = self.agent.source
        playing = src.current if isinstance(src, SpeechSource) else None
        frame, dropped = self.agent.clear()
        return Interrupted(utterance=playing, frame=frame, dropped_frames=dropped)

    # ---- face -----------------------------------------------------------------------------------

    def set_emotion(self, name: str, intensity: float | None = None) -> None:
        """Emotion for speech and idle frames from the next chunk on."""
        self.steering.emotion = emotion_label(name)
        if intensity is not None:
            self.steering.intensity = float(np.clip(intensity, 0.0, 1.0))
        self.agent.motion.set_emotion(self.steering.emotion, self.steering.intensity)

    def set_scales(self, expression: float | None = None, head: float | None = None) -> None:
        """Multipliers on expression and head motion around the rest pose (0 = still)."""
        if expression is not None:
            self.steering.expression = float(np.clip(expression, 0.0, 3.0))
        if head is not None:
            self.steering.head = float(np.clip(head, 0.0, 3.0))

    def set_gaze(self, x: float, y: float) -> None:
        """Look direction in [-1, 1]² (right/down positive)."""
        self.steering.gaze = (float(np.clip(x, -1, 1)), float(np.clip(y, -1, 1)))

    async def swap_avatar(self, path: str) -> None:
        """Prepare another portrait off the event loop; switch between two frames."""
        from .face.landmarks import load_portrait

        image = await asyncio.to_thread(load_portrait, path)
        await self.agent.set_avatar(image)
        self.avatar_path = str(path)
        self.agent.events.emit("avatar_swapped", path=str(path),
                               frame=self.agent.player.next_index)

    # ---- observation ----------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
        """``callback(kind, data)`` on every session event; returns the unsubscribe function."""
        return self.agent.events.subscribe(callback)

    def stats(self) -> dict[str, Any]:
        """Counters for `check`, logs and the status API."""
        a = self.agent
        s: dict[str, Any] = dataclasses.asdict(a.player.stats)
        s.update(session=self.id, chunks_dropped=a.chunks.dropped,
                 frames_buffered=a.player.buffered(), chunks_queued=len(a.chunks),
                 timeline_drift_s=a.timeline.drift_s, producing=a.producing,
                 emotion=self.steering.emotion, avatar=self.avatar_path)
        src = a.source
        if isinstance(src, SpeechSource):
            s["speech_queue"] = src.stats()
        for provider in self.stats_providers:
            s.update(provider())
        return s

    @property
    def watched(self) -> bool:
        """True while someone watches (an idle-timeout must not end a session on screen)."""
        return self.viewers() > 0

    def _touch(self) -> None:
        self.last_activity = self.agent.clock.now()


def _reason(e: BaseException) -> str:
    if isinstance(e, asyncio.CancelledError):
        return "cancelled"
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_reason(x) for x in e.exceptions)
    return f"{type(e).__name__}: {e}"


__all__ = ["FrameTap", "NotASpeechSessionError", "QueueFullError", "Session"]
