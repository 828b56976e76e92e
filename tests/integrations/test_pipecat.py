"""The pipecat AvatarProcessor in real pipecat pipelines with a real avatar session: pipecat's
test runner (frame level, timed by an observer) and one SmallWebRTC transport on loopback with
an aiortc client."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

pytest.importorskip("pipecat", reason="needs the pipecat extra (./install.sh --dev installs it)")
from pipecat.frames.frames import (Frame, InterruptionFrame, OutputAudioRawFrame,  # noqa: E402
                                   OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame,
                                   TTSStoppedFrame)
from pipecat.observers.base_observer import BaseObserver, FramePushed  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from avatar_agent.integrations.pipecat import AvatarProcessor  # noqa: E402

from .sessions import SIZE, running_session, tone  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

FRAME_S = 0.04
TTS_RATE = 24_000


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session():
    # 2 s of queue: a 3 s utterance exercises the processor's back-pressure wait
    async with running_session("audio.max_queued_s=2.0") as s:
        yield s


class Timed(BaseObserver):
    """Records (monotonic time, frame) for every frame the processor pushes downstream."""

    def __init__(self, processor: AvatarProcessor) -> None:
        super().__init__()
        self.processor = processor
        self.log: list[tuple[float, Frame]] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        if data.source is self.processor:
            self.log.append((time.monotonic(), data.frame))

    def of(self, cls: type) -> list[tuple[float, Frame]]:
        return [(t, f) for t, f in self.log if isinstance(f, cls)]


def tts_frames(seconds: float) -> list[Frame]:
    """What a pipecat TTS service emits: started, 20 ms chunks (24 kHz), stopped."""
    pcm = tone(seconds, TTS_RATE)
    step = TTS_RATE // 50
    return ([TTSStartedFrame()]
            + [TTSAudioRawFrame(audio=pcm[i:i + step].tobytes(), sample_rate=TTS_RATE,
                                num_channels=1) for i in range(0, len(pcm), step)]
            + [TTSStoppedFrame()])


async def test_tts_audio_becomes_video_plus_the_same_audio_in_sync(session) -> None:
    proc = AvatarProcessor(session)
    obs = Timed(proc)
    down, _ = await run_test(proc, frames_to_send=[*tts_frames(1.0), SleepFrame(sleep=2.0)],
                             observers=[obs])
    images = obs.of(OutputImageRawFrame)
    audio = obs.of(OutputAudioRawFrame)
    steps = np.diff([t for t, _ in images])
    print(f"pipecat: {len(images)} images, step mean {np.mean(steps) * 1000:.2f} ms, "
          f"{len(audio)} audio frames")
    assert all(f.size == (SIZE, SIZE) and f.format == "RGB" and len(f.image) == SIZE * SIZE * 3
               for _, f in images)
    assert np.mean(steps) == pytest.approx(FRAME_S, rel=0.05)         # paced at 25 fps
    # the TTS audio came out as the avatar's copy: 16 kHz, one 40 ms slice per speaking frame,
    # each right after its image; none of the original 24 kHz frames passed through
    assert all(f.sample_rate == 16_000 and f.num_frames == 640 for _, f in audio)
    assert len(audio) == 25
    assert not any(isinstance(f, OutputAudioRawFrame) and f.sample_rate == TTS_RATE
                   for f in down)
    seq = [f for _, f in obs.log]
    for i, f in enumerate(seq):
        if isinstance(f, OutputAudioRawFrame):
            assert isinstance(seq[i - 1], OutputImageRawFrame)
    pcm = np.concatenate([np.frombuffer(f.audio, np.int16) for _, f in audio[:24]]) / 32767
    assert 0.15 < float(np.sqrt(np.mean(pcm ** 2))) < 0.25          # the tone, not silence
    # TTSStoppedFrame is held until the segment has played, then follows its last audio
    (t_stop, _), = obs.of(TTSStoppedFrame)
    assert t_stop >= audio[-1][0]
    assert t_stop - audio[0][0] >= 0.9
    assert seq.index(next(f for f in seq if isinstance(f, TTSStoppedFrame))) > \
        seq.index(audio[-1][1])


async def test_interruption_idles_within_one_frame(session) -> None:
    """InterruptionFrame mid-utterance: at most the frame in flight carries audio after it, the
    held TTSStoppedFrame is dropped, and video goes on (idle)."""
    proc = AvatarProcessor(session)
    obs = Timed(proc)
    t_int: list[float] = []
    frames = [*tts_frames(3.0), SleepFrame(sleep=1.5), InterruptionFrame(), SleepFrame(sleep=1.0)]
    task = asyncio.create_task(run_test(proc, frames_to_send=frames, observers=[obs]))
    async with asyncio.timeout(20):
        while not any(isinstance(f, InterruptionFrame) for _, f in obs.log):
            await asyncio.sleep(0.005)
    t_int.append(next(t for t, f in obs.log if isinstance(f, InterruptionFrame)))
    await task
    audio_after = [f for t, f in obs.of(OutputAudioRawFrame) if t > t_int[0]]
    images_after = [f for t, f in obs.of(OutputImageRawFrame) if t > t_int[0]]
    played = len([1 for t, _ in obs.of(OutputAudioRawFrame) if t <= t_int[0]]) * FRAME_S
    print(f"pipecat interrupt: {played:.2f} s played, {len(audio_after)} audio frames after")
    assert len(audio_after) <= 1
    assert len(images_after) >= 15                 # idle video continues
    assert obs.of(TTSStoppedFrame) == []
    assert 0.5 < played < 2.0                      # it really was cut mid-utterance


async def test_real_smallwebrtc_transport_on_loopback(session) -> None:
    """tts frames → AvatarProcessor → SmallWebRTC output → aiortc client: the client receives
    our video at 25 fps and the tone in the audio track, about when the video speaks."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
    from pipecat.workers.runner import WorkerRunner

    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="sendrecv")
    client.addTransceiver("video", direction="sendrecv")
    got: dict[str, list[tuple[float, Any]]] = {"audio": [], "video": []}
    readers: list[asyncio.Task] = []

    @client.on("track")
    def on_track(track: Any) -> None:
        async def read() -> None:
            while True:
                frame = await track.recv()
                got[track.kind].append((time.monotonic(), frame))
        readers.append(asyncio.create_task(read()))

    await client.setLocalDescription(await client.createOffer())
    conn = SmallWebRTCConnection()
    await conn.initialize(sdp=client.localDescription.sdp, type=client.localDescription.type)
    answer = conn.get_answer()
    await client.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    transport = SmallWebRTCTransport(conn, TransportParams(
        audio_out_enabled=True, video_out_enabled=True, video_out_is_live=True,
        video_out_width=SIZE, video_out_height=SIZE, video_out_framerate=session.fps))
    proc = AvatarProcessor(session)
    worker = PipelineWorker(Pipeline([proc, transport.output()]), params=PipelineParams(),
                            cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(20):
            while len(got["video"]) < 25:          # connected, idle video flowing
                await asyncio.sleep(0.02)
        t_push = time.monotonic()
        for f in tts_frames(1.0):
            await worker.queue_frame(f)
        await asyncio.sleep(2.5)
    finally:
        await worker.cancel()
        await asyncio.wait_for(run, 10)
        for r in readers:
            r.cancel()
        await client.close()
    vt = [t for t, _ in got["video"]]
    fps = (len(vt) - 1) / (vt[-1] - vt[0])
    v = got["video"][-1][1]
    loud = [t for t, f in got["audio"]
            if t > t_push and np.abs(f.to_ndarray().astype(np.float32)).max() > 3000]
    assert loud, "the tone never reached the client"
    print(f"smallwebrtc: video {fps:.1f} fps {v.width}x{v.height}; push -> tone at client "
          f"{(loud[0] - t_push) * 1000:.0f} ms, tone lasted {loud[-1] - loud[0]:.2f} s")
    assert (v.width, v.height) == (SIZE, SIZE)
    assert 22 < fps < 28
    assert 0.8 < loud[-1] - loud[0] < 1.3
    assert loud[0] - t_push < 1.0


async def test_audio_passes_through_when_the_session_stops() -> None:
    """The session stops producing frames (closed here; a crashed session ends the same way):
    TTS audio then reaches the transport unchanged (24 kHz frames) with its TTSStoppedFrame, so
    the bot keeps its voice without a face."""
    async with running_session("service.drain_s=0") as s:
        proc = AvatarProcessor(s)

        async def stop_session() -> None:
            await asyncio.sleep(0.5)
            await s.aclose()

        stopper = asyncio.create_task(stop_session())
        down, _ = await run_test(proc, frames_to_send=[SleepFrame(sleep=2.0), *tts_frames(0.5),
                                                       SleepFrame(sleep=0.2)])
        await stopper
    assert proc.failed == "the session ended"
    through = [f for f in down if isinstance(f, TTSAudioRawFrame) and f.sample_rate == TTS_RATE]
    assert len(through) == 25                      # every 20 ms chunk, as sent
    assert any(isinstance(f, TTSStoppedFrame) for f in down)
    first = down.index(through[0])
    assert not any(isinstance(f, OutputImageRawFrame) for f in down[first:])  # video had ended


async def test_loopback_example_runs(tmp_path) -> None:
    """examples/pipecat_loopback.py end to end on a short WAV (its own engine, its own viewer)."""
    import runpy
    import soundfile as sf

    wav = tmp_path / "speech.wav"
    sf.write(wav, tone(1.0, 22_050), 22_050)
    ns = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" /
                            "pipecat_loopback.py"), run_name="example")
    got = await ns["main"](str(wav), overrides=[f"render.size={SIZE}"])
    assert 22 < got["fps"] < 28
    assert 0.8 < got["speech_s"] < 1.3
