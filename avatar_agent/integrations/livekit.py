"""LiveKit Agents (1.x) avatar: an :class:`~avatar_agent.types.AvatarSession` as its ``VideoGenerator``.

LiveKit's ``AvatarRunner`` reads the agent's TTS audio from an ``AudioReceiver``, hands each frame
to :meth:`SessionVideoGenerator.push_audio`, and publishes what the generator yields through its
``AVSynchronizer``.  The session does all the work (pacing at fps, A/V sync, segment accounting,
interruption); this module only translates:

=========================================  ====================================================
LiveKit                                    session
=========================================  ====================================================
``push_audio(rtc.AudioFrame)``             ``push_audio(pcm, rate, channels)`` (a stream)
``push_audio(AudioSegmentEnd())``          ``end_segment()``
``clear_buffer()``                         ``interrupt()``
iteration: ``rtc.VideoFrame``              every frame's image (RGB24)
iteration: ``rtc.AudioFrame``              its audio slice, for frames that play a segment
iteration: ``AudioSegmentEnd``             ``SegmentEnded(interrupted=False)`` (fully played)
=========================================  ====================================================

Idle frames carry no ``rtc.AudioFrame``: the runner counts every yielded audio frame into the
segment's playback position, so silence between segments must not be yielded as audio.

Two ways to run it (``docs/integrations.md``): :func:`start_local_avatar` inside the agent's own job
(``QueueAudioOutput``: no network hop), or a remote avatar worker (:mod:`.livekit_worker`) that
receives the audio over LiveKit data streams; :func:`start_remote_avatar` is the agent's side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import AsyncIterator

import numpy as np

try:
    from livekit import api, rtc
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
    from livekit.agents.voice.avatar import (AudioSegmentEnd, AvatarOptions, AvatarRunner,
                                             DataStreamAudioOutput, QueueAudioOutput,
                                             VideoGenerator)
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("the LiveKit integration needs the livekit extra: "
                      f"pip install 'avatar-agent[livekit]' ({e})") from e

from ..audio.queue import QueueFullError, StreamError
from ..audio.resample import AudioFormatError
from ..clock import Clock, SystemClock
from ..types import (SAMPLE_RATE, AvatarSession, SegmentEnded, SegmentStarted,
                     VideoFrame)

log = logging.getLogger(__name__)

DEFAULT_AGENT_NAME = "avatar-agent"
"""The worker's LiveKit ``agent_name`` (explicit dispatch) unless told otherwise."""


def avatar_options(session: AvatarSession) -> AvatarOptions:
    """The runner's options for a session: its square frame size, its fps, 16 kHz mono audio."""
    return AvatarOptions(video_width=session.size, video_height=session.size,
                         video_fps=session.fps, audio_sample_rate=SAMPLE_RATE, audio_channels=1)


class SessionVideoGenerator(VideoGenerator):
    """A LiveKit ``VideoGenerator`` driven by one avatar session.

    The runner consumes at most one frame per 1/fps (its AVSynchronizer paces video, its
    AudioSource plays audio in real time), exactly the session's rate, so a backlog that forms
    while the runner is held up (publishing waits for a subscriber; a loaded loop) would stay as
    added latency for good.  Idle frames that arrive more than ``max_lag_frames`` behind the
    best-timed frame seen are therefore skipped (they carry no audio: nothing is lost but a
    repeated idle face); speech frames are always yielded.

    Args:
        session: the session; its frame stream is tapped when the runner starts iterating.
        clock: the clock frames are timed on (default: the system clock, as the runner's).
        max_lag_frames: lateness beyond which idle frames are skipped.
    """

    def __init__(self, session: AvatarSession, *, clock: Clock | None = None,
                 max_lag_frames: int = 2) -> None:
        self.session = session
        self._clock = clock or SystemClock()
        self._max_lag = max_lag_frames / session.fps
        self._frames: AsyncIterator[VideoFrame] | None = None
        self._best = math.inf      # smallest (arrival − index / fps) seen: the on-time offset
        self._playing = False      # a segment's audio is playing: its frames carry rtc.AudioFrames
        self._idle_from = 0        # frames before this index predate an interrupt: no audio
        self._epoch = 0            # bumped by clear_buffer: a push waiting for room is dropped
        self._played = asyncio.Event()   # set on every frame: room may have freed in the queue
        self.frames_out = 0
        self.frames_skipped = 0

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        """Append the agent's audio to the open segment, or close it.

        When the session already holds its maximum of unplayed audio this waits (frame by frame)
        for room: LiveKit's TTS runs faster than real time, and the back-pressure reaches the
        agent through the receiver's queue.  A frame still waiting when :meth:`clear_buffer` runs
        belongs to the cleared speech and is dropped.
        """
        if isinstance(frame, AudioSegmentEnd):
            self.session.end_segment()
            return
        pcm = np.frombuffer(frame.data, np.int16)   # interleaved s16 (LiveKit's only format)
        epoch = self._epoch
        while True:
            try:
                self.session.push_audio(pcm, frame.sample_rate, frame.num_channels)
                return
            except QueueFullError:
                self._played.clear()
                await self._played.wait()
                if epoch != self._epoch:
                    return
            except (StreamError, AudioFormatError) as e:   # one bad frame must not end the
                log.warning("avatar dropped an audio frame: %s", e)   # runner's audio task
                return

    def clear_buffer(self) -> None:
        """Interrupt: drop all unplayed speech; the next frame yielded is idle and silent."""
        self._epoch += 1
        self._played.set()
        cut = self.session.interrupt()
        self._idle_from = cut.frame
        self._playing = False

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        if self._frames is None:
            self._frames = self.session.frames()
        async for f in self._frames:
            self._played.set()
            offset = self._clock.now() - f.index / self.session.fps
            self._best = min(self._best, offset)
            audio_on, finished = self._playing, False
            for mark in f.segments:
                if isinstance(mark, SegmentStarted):
                    self._playing = audio_on = True
                elif isinstance(mark, SegmentEnded):
                    self._playing = False
                    if mark.interrupted:    # this frame is already the idle one after the cut
                        audio_on = False
                    elif mark.played_s > 0:
                        finished = True
            if f.index < self._idle_from:  # rendered before an interrupt, delivered after it
                audio_on = finished = False
            if not audio_on and not finished and offset - self._best > self._max_lag:
                self.frames_skipped += 1   # catching up after a stall: drop a late idle frame
                continue
            h, w = f.image.shape[:2]
            yield rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24,
                                 np.ascontiguousarray(f.image, np.uint8).tobytes())
            if audio_on:
                yield _audio_frame(f.audio)
            if finished:
                yield AudioSegmentEnd()
            self.frames_out += 1


def _audio_frame(audio: np.ndarray) -> rtc.AudioFrame:
    """float32 [-1, 1] 16 kHz mono → an s16 rtc.AudioFrame."""
    s16 = (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    return rtc.AudioFrame(s16.tobytes(), SAMPLE_RATE, 1, len(s16))


async def start_local_avatar(session: AvatarSession, agent_session, room: rtc.Room
                             ) -> AvatarRunner:
    """Run the avatar inside the agent's own job: TTS audio → session → tracks in ``room``.

    Replaces the agent session's audio output with a ``QueueAudioOutput`` (the agent no longer
    publishes raw TTS audio; the avatar publishes its own copy with the video).  The runner
    publishes ``avatar_video`` and ``avatar_audio`` as the agent participant.  Close it with
    ``await runner.aclose()`` (the session is yours to close).

    Args:
        session: an open avatar session (``await open_session(cfg)``).
        agent_session: the ``livekit.agents.AgentSession`` (before or after its ``start``).
        room: the job's connected room (``ctx.room``).
    """
    audio = QueueAudioOutput(wait_playback_start=True)
    agent_session.output.audio = audio
    runner = AvatarRunner(room, audio_recv=audio, video_gen=SessionVideoGenerator(session),
                          options=avatar_options(session))
    await runner.start()
    return runner


def avatar_identity(agent_identity: str, agent_name: str = DEFAULT_AGENT_NAME) -> str:
    """The identity the remote avatar joins with, derived from the agent it speaks for."""
    return f"{agent_name}-{agent_identity}"


async def start_remote_avatar(agent_session, room: rtc.Room, *,
                              agent_name: str = DEFAULT_AGENT_NAME,
                              options: dict | None = None,
                              lk_api: api.LiveKitAPI | None = None) -> str:
    """The agent's side of a remote avatar: dispatch a worker, stream TTS audio to it.

    Asks LiveKit to dispatch ``agent_name`` (an ``avatar-agent livekit-worker``) into ``room``;
    the least-loaded worker takes it.  The agent's audio output becomes a
    ``DataStreamAudioOutput`` that waits for the avatar's video track before the first segment.

    Args:
        agent_session: the ``livekit.agents.AgentSession``.
        room: the job's connected room.
        agent_name: the worker's ``--agent-name``.
        options: per-session settings for the worker (``avatar``: a portrait path on the
            worker, ``emotion``: one of EMOTIONS), sent as dispatch metadata.
        lk_api: a LiveKitAPI to dispatch with (default: one from LIVEKIT_URL/_API_KEY/_SECRET).

    Returns:
        The avatar participant's identity.
    """
    agent_identity = room.local_participant.identity
    identity = avatar_identity(agent_identity, agent_name)
    meta = json.dumps({"agent_identity": agent_identity, "avatar_identity": identity,
                       **(options or {})})
    own = lk_api is None
    lk = lk_api or api.LiveKitAPI()
    try:
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name=agent_name, room=room.name, metadata=meta))
    finally:
        if own:
            await lk.aclose()
    # wait_playback_start: the avatar reports when each reply really starts playing (it calls
    # lk.playback_started, which the output registers only with this set).
    agent_session.output.audio = DataStreamAudioOutput(
        room, destination_identity=identity, wait_remote_track=rtc.TrackKind.KIND_VIDEO,
        wait_playback_start=True)
    return identity


__all__ = ["ATTRIBUTE_PUBLISH_ON_BEHALF", "DEFAULT_AGENT_NAME", "SessionVideoGenerator",
           "avatar_identity", "avatar_options", "start_local_avatar", "start_remote_avatar"]
