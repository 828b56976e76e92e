"""The LiveKit VideoGenerator against livekit-agents' own objects and a real avatar session.

No LiveKit server can run here, so the room is the one stand-in (:class:`OfflineRoom`: connected,
publishes nowhere).  Everything else is LiveKit's: ``QueueAudioOutput`` (the agent's audio output
and the runner's receiver), ``AvatarRunner`` with its real ``AudioSource``/``VideoSource``/
``AVSynchronizer`` (native FFI, real-time audio pacing), ``AudioSegmentEnd``, rtc frame types.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

lk_avatar = pytest.importorskip("livekit.agents.voice.avatar",
                                reason="needs the livekit extra (./install.sh --dev installs it)")
from livekit import rtc  # noqa: E402

from avatar_agent.integrations.livekit import (SessionVideoGenerator, avatar_options,  # noqa: E402
                                               start_local_avatar)
from avatar_agent.types import SegmentEnded  # noqa: E402

from .sessions import SIZE, running_session, tone  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

AudioSegmentEnd = lk_avatar.AudioSegmentEnd
QueueAudioOutput = lk_avatar.QueueAudioOutput
AvatarRunner = lk_avatar.AvatarRunner
FRAME_S = 0.04
TTS_RATE = 24_000


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session():
    # max_queued_s = 2: a 3 s push fills the queue, so the generator's back-pressure path runs.
    async with running_session("audio.max_queued_s=2.0") as s:
        yield s


class OfflineRoom(rtc.EventEmitter):
    """The network boundary: a connected room whose publications go nowhere."""

    def __init__(self) -> None:
        super().__init__()
        self.local_participant = _LocalParticipant()

    def isconnected(self) -> bool:
        return True


class _LocalParticipant:
    identity = "agent"

    def __init__(self) -> None:
        self.published: list[tuple[str, int]] = []

    async def publish_track(self, track: Any, options: Any) -> "_Publication":
        self.published.append((track.name, options.source))
        return _Publication()


class _Publication:
    async def wait_for_subscription(self) -> None:
        return None


class Recorder(lk_avatar.VideoGenerator):
    """Wraps a VideoGenerator and logs what it yields, with the time (monotonic s)."""

    def __init__(self, inner: SessionVideoGenerator) -> None:
        self.inner = inner
        self.log: list[tuple[float, object]] = []
        self.cleared_at: float | None = None

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        await self.inner.push_audio(frame)

    def clear_buffer(self) -> None:
        self.cleared_at = time.monotonic()
        self.inner.clear_buffer()

    async def __aiter__(self) -> AsyncIterator[Any]:   # type: ignore[override]
        async for item in self.inner:
            self.log.append((time.monotonic(), item))
            yield item

    def audio_frames(self) -> list[rtc.AudioFrame]:
        return [x for _, x in self.log if isinstance(x, rtc.AudioFrame)]


async def tts(out: QueueAudioOutput, seconds: float, flush: bool = True) -> None:
    """What an AgentSession does with TTS audio: 10 ms frames, faster than real time, flush."""
    pcm = tone(seconds, TTS_RATE)
    step = TTS_RATE // 100
    for i in range(0, len(pcm), step):
        await out.capture_frame(rtc.AudioFrame(pcm[i:i + step].tobytes(), TTS_RATE, 1,
                                               len(pcm[i:i + step])))
    if flush:
        out.flush()


async def start_runner(session) -> tuple[QueueAudioOutput, Recorder, AvatarRunner, OfflineRoom]:
    out = QueueAudioOutput(wait_playback_start=True)
    rec = Recorder(SessionVideoGenerator(session))
    room = OfflineRoom()
    runner = AvatarRunner(room, audio_recv=out, video_gen=rec, options=avatar_options(session))
    await runner.start()
    return out, rec, runner, room


async def test_direct_contract_types_and_lockstep(session) -> None:
    """push_audio (48 kHz stereo) + AudioSegmentEnd → rtc.VideoFrame RGB24 + rtc.AudioFrame
    16 kHz mono, one audio frame per video frame while the segment plays, then one
    AudioSegmentEnd; idle frames carry no audio."""
    gen = SessionVideoGenerator(session)
    stereo = np.repeat(tone(0.6, 48_000)[:, None], 2, axis=1)
    await gen.push_audio(rtc.AudioFrame(stereo.tobytes(), 48_000, 2, len(stereo)))
    await gen.push_audio(AudioSegmentEnd())
    items: list[object] = []
    it = aiter(gen)
    async with asyncio.timeout(10):
        while not any(isinstance(x, AudioSegmentEnd) for x in items):
            items.append(await anext(it))
        for _ in range(5):                               # idle frames after the segment
            items.append(await anext(it))
    videos = [x for x in items if isinstance(x, rtc.VideoFrame)]
    audios = [x for x in items if isinstance(x, rtc.AudioFrame)]
    assert all(v.type == rtc.VideoBufferType.RGB24 and (v.width, v.height) == (SIZE, SIZE)
               for v in videos)
    assert all((a.sample_rate, a.num_channels, a.samples_per_channel) == (16_000, 1, 640)
               for a in audios)
    # 0.6 s = 15 frames of speech (the last one zero-padded), each right after its video frame
    assert len(audios) == 15
    for i, x in enumerate(items):
        if isinstance(x, rtc.AudioFrame):
            assert isinstance(items[i - 1], rtc.VideoFrame)
    end = items.index(next(x for x in items if isinstance(x, AudioSegmentEnd)))
    assert isinstance(items[end - 1], rtc.AudioFrame)
    assert not any(isinstance(x, rtc.AudioFrame) for x in items[end:])
    # the audio is the pushed tone (resampled), not silence
    a = np.concatenate([np.frombuffer(x.data, np.int16) for x in audios[:14]]) / 32767
    assert 0.15 < float(np.sqrt(np.mean(a ** 2))) < 0.25          # 0.3 amplitude sine: 0.21


async def test_a_stalled_runner_does_not_keep_the_stall_as_latency(session) -> None:
    """The runner is held up for 1 s (publishing waits for a subscriber): the idle frames that
    piled up meanwhile are skipped, so the frames after the stall are fresh and paced, not a
    burst of stale ones that would leave a second of latency behind."""
    gen = SessionVideoGenerator(session)
    it = aiter(gen)
    await anext(it)
    await asyncio.sleep(1.0)
    await anext(it)                                     # drains the backlog
    t = time.monotonic()
    for _ in range(10):
        await anext(it)
    assert gen.frames_skipped >= 20
    assert time.monotonic() - t > 8 * FRAME_S          # paced by the session, not a burst


async def test_runner_plays_a_segment_paced_with_its_audio(session) -> None:
    """QueueAudioOutput → AvatarRunner → our generator → LiveKit's AVSynchronizer: frames at
    25 fps, audio carried with video, AudioSegmentEnd only after the segment has played, and
    the agent's wait_for_playout() reports the full position, not interrupted."""
    out, rec, runner, room = await start_runner(session)
    try:
        t_push = time.monotonic()
        await tts(out, 1.0)
        ev = await asyncio.wait_for(out.wait_for_playout(), 10)
        t_done = time.monotonic()
    finally:
        await runner.aclose()
    times = [t for t, x in rec.log if isinstance(x, rtc.VideoFrame)]
    steps = np.diff(times)
    a_times = [t for t, x in rec.log if isinstance(x, rtc.AudioFrame)]
    end_t = next(t for t, x in rec.log if isinstance(x, AudioSegmentEnd))
    print(f"livekit runner: {len(times)} frames, step mean {np.mean(steps) * 1000:.2f} ms "
          f"p95 {np.percentile(steps, 95) * 1000:.1f} ms; push -> first audio "
          f"{(a_times[0] - t_push) * 1000:.0f} ms; position {ev.playback_position:.3f} s")
    assert ev.interrupted is False
    assert ev.playback_position == pytest.approx(1.0, abs=FRAME_S)
    pace = (times[-1] - times[2]) / (len(times) - 3)      # after the start-up frames
    assert pace == pytest.approx(FRAME_S, rel=0.05)               # paced at fps
    assert np.percentile(steps, 95) < 2.5 * FRAME_S
    assert len(a_times) == 25
    assert end_t - a_times[0] >= 0.9                  # played in real time, not dumped at once
    assert a_times[0] - t_push < 1.0                  # first audio within the session's latency
    assert t_done >= end_t
    assert {name for name, _ in room.local_participant.published} == {"avatar_audio",
                                                                      "avatar_video"}


async def test_clear_buffer_idles_within_one_frame(session) -> None:
    """Interrupt mid-segment: the next frame is idle and silent, no AudioSegmentEnd for the cut
    segment, and the agent sees playback finished with interrupted=True at the played position
    (which the session's own SegmentEnded agrees with)."""
    marks = session.frames()
    out, rec, runner, _ = await start_runner(session)
    try:
        # 3 s into a 2 s queue: the generator's push waits for room while frames play
        await tts(out, 3.0)
        async with asyncio.timeout(10):
            while len(rec.audio_frames()) < 25:       # ~1 s played
                await asyncio.sleep(0.01)
        out.clear_buffer()
        ev = await asyncio.wait_for(out.wait_for_playout(), 5)
        n_at_clear = len(rec.audio_frames())
        await asyncio.sleep(0.5)
        ended = None
        async with asyncio.timeout(5):
            while ended is None:
                f = await anext(marks)
                ended = next((m for m in f.segments if isinstance(m, SegmentEnded)), None)
    finally:
        await runner.aclose()
        await marks.aclose()
    print(f"livekit clear_buffer: position {ev.playback_position:.3f} s, session played_s "
          f"{ended.played_s:.3f} s")
    assert ev.interrupted is True
    # the runner counts audio once its AudioSource took it: the frame it was still pushing
    # (blocked on the 100 ms source queue) when the clear came is not counted as played
    assert round(ev.playback_position / FRAME_S) in (n_at_clear - 1, n_at_clear)
    assert 0.9 < ev.playback_position < 1.5
    # after clear_buffer: at most the frame already in flight, then video only
    after = [x for t, x in rec.log if t > rec.cleared_at]
    assert sum(isinstance(x, rtc.AudioFrame) for x in after) <= 1
    first_video = next(i for i, x in enumerate(after) if isinstance(x, rtc.VideoFrame))
    assert not any(isinstance(x, rtc.AudioFrame) for x in after[first_video:])
    assert sum(isinstance(x, rtc.VideoFrame) for x in after) >= 10     # idle video goes on
    assert not any(isinstance(x, AudioSegmentEnd) for _, x in rec.log)
    assert ended.interrupted is True
    assert ended.played_s == pytest.approx(ev.playback_position, abs=2 * FRAME_S)


async def test_start_local_avatar_replaces_the_agents_audio_output(session) -> None:
    """The in-job helper wires QueueAudioOutput as the agent's audio output and runs the
    runner; audio captured by the agent comes back as a finished playback."""

    class _Output:
        audio: Any = None

    class _AgentSession:
        output = _Output()

    agent = _AgentSession()
    runner = await start_local_avatar(session, agent, OfflineRoom())
    try:
        assert isinstance(agent.output.audio, QueueAudioOutput)
        await tts(agent.output.audio, 0.4)
        ev = await asyncio.wait_for(agent.output.audio.wait_for_playout(), 10)
    finally:
        await runner.aclose()
    assert ev.interrupted is False and ev.playback_position == pytest.approx(0.4, abs=FRAME_S)
