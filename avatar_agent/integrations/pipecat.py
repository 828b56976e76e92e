"""pipecat: an :class:`~avatar_agent.types.AvatarSession` as a frame processor between TTS and the
transport output::

    Pipeline([transport.input(), stt, llm, tts, AvatarProcessor(session), transport.output()])

What it does with each frame (downstream):

* ``TTSAudioRawFrame`` / any ``OutputAudioRawFrame`` → pushed into the session (any rate and
  channel count), *not* forwarded: the avatar emits its own copy of the audio, slice by slice,
  right after the video frame that plays it, so voice and mouth leave together.
* every session frame → an ``OutputImageRawFrame`` (RGB), plus a ``TTSAudioRawFrame`` (16 kHz
  mono) while a segment plays.  Idle frames carry no audio (pipecat would count it as speech).
* ``TTSStoppedFrame`` → closes the segment; the frame itself is held until the segment has
  played, so ``BotStoppedSpeaking`` comes when the voice really ends.
* ``InterruptionFrame`` → ``session.interrupt()``: the next frame is idle and silent.
* everything else passes through.

If the session stops producing frames (a crash, or it was closed) the processor falls back to
passing the audio through unchanged, so the bot keeps its voice without a face.

Use a transport with ``video_out_enabled=True, video_out_is_live=True`` and
``video_out_width/height = session.size``, ``video_out_framerate = session.fps``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import numpy as np

try:
    from pipecat.frames.frames import (CancelFrame, EndFrame, Frame, InterruptionFrame,
                                       OutputAudioRawFrame, OutputImageRawFrame, StartFrame,
                                       TTSAudioRawFrame, TTSStoppedFrame)
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("the pipecat integration needs the pipecat extra: "
                      f"pip install 'avatar-agent[pipecat]' ({e})") from e

from ..audio.queue import QueueFullError
from ..types import SAMPLE_RATE, AvatarSession, SegmentEnded, SegmentStarted, VideoFrame

log = logging.getLogger(__name__)


class AvatarProcessor(FrameProcessor):
    """Turns TTS audio into the avatar's video frames plus the same audio, in sync.

    Args:
        session: an open avatar session (the caller opens and closes it).
        **kwargs: passed to ``FrameProcessor`` (``name``...).
    """

    def __init__(self, session: AvatarSession, **kwargs) -> None:
        super().__init__(**kwargs)
        self.session = session
        self._frames: AsyncIterator[VideoFrame] | None = None
        self._task: asyncio.Task | None = None
        self._playing = False      # a segment plays: its frames carry audio
        self._idle_from = 0        # frames before this index predate an interrupt: no audio
        self._held: dict[int, TTSStoppedFrame] = {}   # segment id → its TTSStoppedFrame
        self._played = asyncio.Event()
        self.failed: str | None = None
        """Why the avatar stopped (then audio passes through unchanged); None while it works."""
        self.frames_out = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Route one frame (see the module docstring)."""
        await super().process_frame(frame, direction)
        if direction != FrameDirection.DOWNSTREAM:
            await self.push_frame(frame, direction)
            return
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._frames = self.session.frames()
            self._task = self.create_task(self._output(), name="avatar-output")
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            self._interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, OutputAudioRawFrame) and self.failed is None:
            await self._push_audio(frame)
        elif isinstance(frame, TTSStoppedFrame) and self.failed is None:
            seg = self.session.end_segment()
            if seg is None:                   # no audio came for it: nothing to wait for
                await self.push_frame(frame, direction)
            else:
                self._held[seg] = frame
        else:
            await self.push_frame(frame, direction)

    async def _push_audio(self, frame: OutputAudioRawFrame) -> None:
        pcm = np.frombuffer(frame.audio, np.int16)
        while True:
            try:
                self.session.push_audio(pcm, frame.sample_rate, frame.num_channels)
                return
            except QueueFullError:            # TTS runs ahead of playback: wait a frame
                self._played.clear()
                await self._played.wait()     # cancelled by an interruption (pipecat's)
            except Exception as e:            # a bad block must not silence the bot
                log.warning("avatar could not take TTS audio (%s): passing it through", e)
                await self.push_frame(frame)
                return

    def _interrupt(self) -> None:
        self._held.clear()                    # pipecat drops everything after an interruption
        self._playing = False
        if self.failed is None:
            self._idle_from = self.session.interrupt().frame

    async def _output(self) -> None:
        assert self._frames is not None
        try:
            async for f in self._frames:
                self._played.set()
                await self._emit(f)
            reason = "the session ended"
        except asyncio.CancelledError:
            raise
        except Exception as e:                # the renderer or the session crashed
            reason = f"{type(e).__name__}: {e}"
        if self._task is not None:            # not stopping on purpose: fall back
            self.failed = reason
            log.error("avatar stopped (%s): passing TTS audio through", reason)
            for stop in self._held.values():
                await self.push_frame(stop)
            self._held.clear()
            self._played.set()

    async def _emit(self, f: VideoFrame) -> None:
        audio_on, ended = self._playing, []
        for mark in f.segments:
            if isinstance(mark, SegmentStarted):
                self._playing = audio_on = True
            elif isinstance(mark, SegmentEnded):
                self._playing = False
                if mark.interrupted:
                    audio_on = False
                ended.append(mark.utterance)
        if f.index < self._idle_from:
            audio_on = False
        h, w = f.image.shape[:2]
        await self.push_frame(OutputImageRawFrame(
            image=np.ascontiguousarray(f.image, np.uint8).tobytes(), size=(w, h), format="RGB"))
        if audio_on:
            s16 = (np.clip(f.audio, -1.0, 1.0) * 32767.0).astype(np.int16)
            await self.push_frame(TTSAudioRawFrame(audio=s16.tobytes(), sample_rate=SAMPLE_RATE,
                                                   num_channels=1))
        for seg in ended:
            stop = self._held.pop(seg, None)
            if stop is not None:
                await self.push_frame(stop)
        self.frames_out += 1

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await self.cancel_task(task)
        if self._frames is not None:
            await self._frames.aclose()       # type: ignore[attr-defined]
            self._frames = None

    async def cleanup(self) -> None:
        """Stop the output task (the session stays open: it is the caller's)."""
        await super().cleanup()
        await self._stop()


__all__ = ["AvatarProcessor"]
