"""WebRtcSink + the real aiohttp app, watched by real aiortc client peers over 127.0.0.1.

Every packet stays on loopback (aioice's host addresses are patched to 127.0.0.1), so the tests
also pass in a network namespace with nothing but ``lo``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from avatar_agent.sinks.webrtc import OfferError, WebRtcError, WebRtcSink
from avatar_agent.types import VideoFrame
from tests.sinks.conftest import live_stream, loopback_ice

pytestmark = pytest.mark.timeout(60)


@dataclass
class Viewer:
    """An aiortc client peer that records what it receives."""

    pc: RTCPeerConnection
    sizes: set = field(default_factory=set)
    frames: int = 0
    last_image: np.ndarray | None = None
    audio: list = field(default_factory=list)  # mono float32 chunks at 48 kHz
    tasks: list = field(default_factory=list)

    async def close(self) -> None:
        await self.pc.close()
        for t in self.tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, MediaStreamError):
                await t


async def _consume(viewer: Viewer, track: Any) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            if track.kind == "video":
                viewer.frames += 1
                viewer.sizes.add((frame.width, frame.height))
                viewer.last_image = frame.to_ndarray(format="rgb24")
            else:
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
                viewer.audio.append(pcm.astype(np.float32) / 32768.0)


async def connect(url: str, answer: bool = True) -> Viewer:
    pc = RTCPeerConnection()
    viewer = Viewer(pc)
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")

    @pc.on("track")
    def _on_track(track: Any) -> None:
        viewer.tasks.append(asyncio.ensure_future(_consume(viewer, track)))

    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "offer", json={"sdp": pc.localDescription.sdp,
                                               "type": pc.localDescription.type}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
    if answer:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    return viewer


async def wait_for(cond: Any, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.05)


def tone_check(audio: np.ndarray) -> tuple[float, float]:
    """(rms, dominant frequency in Hz) of 48 kHz audio."""
    rms = float(np.sqrt(np.mean(audio**2)))
    spec = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return rms, float(np.argmax(spec) * 48_000 / audio.size)


async def test_viewer_gets_video_and_tone() -> None:
    with loopback_ice():
        async with live_stream(160, 120, freq=440.0, amp=0.5) as live:
            v = await connect(live.url)
            await wait_for(lambda: v.frames >= 40 and sum(a.size for a in v.audio) >= 96_000)
            await v.close()
            assert live.player_error is None
    assert v.sizes == {(160, 120)}
    # the pattern's background is blue 60 with a full-height red bar (VP8 is lossy: loose bands)
    img = v.last_image
    assert img is not None and abs(float(np.median(img[:, :, 2])) - 60) < 15
    assert float(img[60:, :, 0].mean(axis=0).max()) > 180
    audio = np.concatenate(v.audio)[-48_000:]  # the last second, well past Opus start-up
    rms, f0 = tone_check(audio)
    assert abs(rms - 0.5 / np.sqrt(2)) < 0.07, rms  # Opus keeps the tone's level
    assert abs(f0 - 440.0) < 5, f0


async def test_two_viewers_one_leaves_other_continues() -> None:
    with loopback_ice():
        async with live_stream(160, 120, freq=330.0) as live:
            a = await connect(live.url)
            b = await connect(live.url)
            await wait_for(lambda: a.frames >= 10 and b.frames >= 10)
            assert live.sink.viewers == 2
            await a.close()  # viewer A leaves
            await wait_for(lambda: live.sink.viewers == 1)
            before, sent_before = b.frames, live.frames_sent
            await wait_for(lambda: live.frames_sent >= sent_before + 25)
            await wait_for(lambda: b.frames >= before + 20)  # B still receives after A left
            _rms, f0 = tone_check(np.concatenate(b.audio)[-24_000:])
            await b.close()
            assert live.player_error is None  # the player never saw either viewer's trouble
    assert abs(f0 - 330.0) < 5


async def test_viewer_that_never_connects_is_dropped() -> None:
    with loopback_ice():
        async with live_stream(160, 120, connect_timeout=1.5) as live:
            ghost = await connect(live.url, answer=False)  # offers, never completes ICE
            good = await connect(live.url)
            assert live.sink.viewers == 2
            await wait_for(lambda: live.sink.viewers == 1, timeout=10)
            n = good.frames
            await wait_for(lambda: good.frames >= n + 10)
            await ghost.close()
            await good.close()
            assert live.player_error is None


async def test_offer_validation_and_state_errors() -> None:
    sink = WebRtcSink()
    with pytest.raises(WebRtcError, match="not started"):
        await sink.accept("v=0\r\n", "offer")
    await sink.start(160, 120, 25)
    with pytest.raises(OfferError, match="type 'offer'"):
        await sink.accept("v=0\r\n", "answer")
    with pytest.raises(OfferError, match="v=0"):
        await sink.accept("hello", "offer")
    with pytest.raises(OfferError, match="cannot negotiate"):
        await sink.accept("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "offer")
    assert sink.viewers == 0  # failed offers leave nothing behind
    with pytest.raises(ValueError, match="expected 640"):
        await sink.send(VideoFrame(np.zeros((120, 160, 3), np.uint8), 0, np.zeros(320, np.float32)))
    await sink.close()
    with pytest.raises(ValueError, match="divide"):
        await WebRtcSink().start(160, 120, 30)


async def test_audio_and_video_pts_share_the_frame_index() -> None:
    """Lip sync by construction: frame k's video and audio carry the same instant."""
    from avatar_agent.sinks.webrtc import _track_classes, _Viewer

    video_cls, audio_cls = _track_classes()
    viewer = _Viewer(1, pc=None, fps=25)
    viewer.video, viewer.audio = video_cls(viewer), audio_cls(viewer, max_frames=25)
    viewer.audio._started = True  # as if its RTP sender had asked for the first frame
    pcm = np.zeros(960, np.int16)
    for index in (100, 101, 102, 110):  # 103..109 never produced
        viewer.push(VideoFrame(np.zeros((8, 8, 3), np.uint8), index, np.zeros(640, np.float32)), (pcm, pcm))
        vf = await viewer.video.recv()
        a1, a2 = await viewer.audio.recv(), await viewer.audio.recv()
        t_video = vf.pts * vf.time_base
        assert t_video == a1.pts * a1.time_base == Fraction(index - 100, 25)
        assert a2.pts - a1.pts == 960 and a1.samples == 960 and a1.sample_rate == 48_000
    viewer.video.stop()
    with pytest.raises(MediaStreamError):
        await viewer.video.recv()
