"""WebRtcSink + the real aiohttp app, watched by real aiortc client peers over 127.0.0.1.

Every packet stays on loopback (aioice's host addresses are patched to 127.0.0.1), so the tests
also pass in a network namespace with nothing but ``lo``.  Also: sessions (Location header,
DELETE), and the uplink — a peer that *sends* audio, decoded and handed to ``on_uplink_audio``.

``Viewer``, ``connect``, ``PcmTrack`` and ``wait_for`` are reused by tests/test_chatbot_webrtc.py
and bench/bench_chatbot.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_agent.audio.uplink import Uplink
from avatar_agent.sinks.webrtc import OfferError, UplinkBusyError, WebRtcError, WebRtcSink
from avatar_agent.types import VideoFrame
from tests.sinks.conftest import live_stream, loopback_ice

pytestmark = pytest.mark.timeout(60)


class PcmTrack(MediaStreamTrack):
    """A chatbot's TTS as an outgoing WebRTC audio track: queued 48 kHz PCM, then silence.

    Paced in real time like a microphone (one 20 ms stereo s16 frame per 20 ms); ``play()``
    queues more speech while the track is live; ``sent_at`` records when each queued clip's
    first frame left.
    """

    kind = "audio"

    def __init__(self, pcm48: np.ndarray | None = None) -> None:
        super().__init__()
        self._buf = np.zeros(0, np.int16)
        self._t0: float | None = None
        self._n = 0
        self._marks: list[int] = []    # buffer offsets where a clip starts
        self.sent_at: list[float] = []  # monotonic time each clip's first frame was handed out
        if pcm48 is not None:
            self.play(pcm48)

    def play(self, pcm48: np.ndarray) -> None:
        """Queue float32 [-1, 1] 48 kHz mono samples after what is still queued."""
        x = np.clip(np.rint(np.asarray(pcm48, np.float32) * 32767), -32768, 32767).astype(np.int16)
        self._marks.append(self._buf.size)
        self._buf = np.concatenate([self._buf, x])

    async def recv(self) -> Any:
        import av

        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        wait = self._t0 + self._n * 0.02 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = np.zeros(960, np.int16)
        take = self._buf[:960]
        chunk[: take.size] = take
        if self._marks and self._marks[0] < 960:
            self.sent_at.append(time.monotonic())
        self._marks = [m - 960 for m in self._marks if m >= 960] if self._marks else []
        self._buf = self._buf[960:]
        frame = av.AudioFrame(format="s16", layout="stereo", samples=960)
        frame.planes[0].update(np.repeat(chunk, 2).tobytes())
        frame.sample_rate = 48_000
        frame.pts = self._n * 960
        frame.time_base = Fraction(1, 48_000)
        self._n += 1
        return frame


@dataclass
class Viewer:
    """An aiortc client peer that records what it receives."""

    pc: RTCPeerConnection
    sizes: set = field(default_factory=set)
    frames: int = 0
    last_image: np.ndarray | None = None
    audio: list = field(default_factory=list)  # mono float32 chunks at 48 kHz
    tasks: list = field(default_factory=list)
    session: str = ""                            # the server's session id (Location header)
    location: str = ""
    pts: list = field(default_factory=list)      # video pts (90 kHz) in arrival order
    video_times: list = field(default_factory=list)  # monotonic arrival time of each video frame
    audio_times: list = field(default_factory=list)  # monotonic arrival time of each audio chunk
    on_video: Callable[[np.ndarray, int], None] | None = None  # (rgb image, pts) per frame

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
                viewer.pts.append(frame.pts)
                viewer.video_times.append(time.monotonic())
                if viewer.on_video is not None:
                    viewer.on_video(viewer.last_image, frame.pts)
            else:
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
                viewer.audio.append(pcm.astype(np.float32) / 32768.0)
                viewer.audio_times.append(time.monotonic())


async def connect(url: str, answer: bool = True, send: MediaStreamTrack | None = None,
                  expect: int = 200) -> Viewer:
    """Offer recvonly video + audio (sendrecv audio with ``send``); ``expect``: the POST status."""
    pc = RTCPeerConnection()
    viewer = Viewer(pc)
    pc.addTransceiver("video", direction="recvonly")
    if send is None:
        pc.addTransceiver("audio", direction="recvonly")
    else:
        pc.addTransceiver(send, direction="sendrecv")

    @pc.on("track")
    def _on_track(track: Any) -> None:
        viewer.tasks.append(asyncio.ensure_future(_consume(viewer, track)))

    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "offer", json={"sdp": pc.localDescription.sdp,
                                               "type": pc.localDescription.type}) as r:
            assert r.status == expect, await r.text()
            if expect != 200:
                await pc.close()
                viewer.location = await r.text()  # the error message
                return viewer
            body = await r.json()
            viewer.location = r.headers.get("Location", "")
            viewer.session = body.get("session", "")
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


async def test_nothing_of_a_viewer_outlives_it() -> None:
    """Viewers joining and leaving for hours must not add up (the soak's RSS): once a viewer has
    left, its record, peer connection, tracks and encoder are garbage."""
    import gc
    import weakref

    refs: list[weakref.ref] = []
    with loopback_ice():
        async with live_stream(160, 120, freq=330.0) as live:
            for _ in range(3):
                v = await connect(live.url)
                await wait_for(lambda v=v: v.frames >= 5 and live.sink.viewers == 1)
                (viewer,) = live.sink._viewers.values()
                refs += [weakref.ref(o) for o in (viewer, viewer.pc, viewer.video, viewer.audio)]
                refs += [weakref.ref(t.sender) for t in viewer.pc.getTransceivers()]
                del viewer
                await v.close()
                await wait_for(lambda: live.sink.viewers == 0)
            await asyncio.sleep(0.2)                  # the peers' own closing tasks finish
            gc.collect()
            alive = [type(r()).__name__ for r in refs if r() is not None]
            assert live.player_error is None
    assert len(refs) >= 3 * 6 and alive == []


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


async def test_full_sink_gives_a_stalled_viewers_slot_to_a_new_one() -> None:
    with loopback_ice():
        async with live_stream(160, 120, connect_timeout=30.0, max_viewers=2,
                               connect_grace=1.0) as live:
            ghost = await connect(live.url, answer=False)       # never completes ICE
            first = await connect(live.url)
            await wait_for(lambda: first.frames >= 5)
            # Full, and the ghost is younger than the grace: refused.
            refused = await connect(live.url, expect=503)
            assert "2 viewers" in refused.location
            await asyncio.sleep(1.1)
            # Now the ghost's slot goes to the newcomer; the connected viewer is never evicted.
            second = await connect(live.url)
            await wait_for(lambda: second.frames >= 5)
            assert live.sink.viewers == 2 and live.sink.sessions_closed == 1
            n = first.frames
            await wait_for(lambda: first.frames >= n + 5)
            await connect(live.url, expect=503)                 # both connected: full again
            for v in (ghost, first, second):
                await v.close()
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


# ---- sessions and the uplink ------------------------------------------------------------------

class Collector:
    """An ``on_uplink_audio`` callback that records what the sink hands over, per utterance."""

    def __init__(self) -> None:
        self.utterances: list[list[np.ndarray]] = []   # the last one is open unless finals match
        self.finals = 0

    def __call__(self, samples: np.ndarray, final: bool) -> int:
        assert samples.dtype == np.float32 and samples.ndim == 1
        if len(self.utterances) == self.finals:       # no utterance open: this block opens one
            self.utterances.append([])
        self.utterances[-1].append(samples)
        self.finals += int(final)
        return len(self.utterances)

    def utterance(self, k: int) -> np.ndarray:
        if k >= len(self.utterances):
            return np.zeros(0, np.float32)
        return np.concatenate(self.utterances[k])

    @property
    def audio(self) -> np.ndarray:
        parts = [self.utterance(k) for k in range(len(self.utterances))]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _tone48(seconds: float, freq: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(48_000 * seconds)) / 48_000
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


async def _http(method: str, url: str, **kw: Any) -> tuple[int, str, dict]:
    async with aiohttp.ClientSession() as s, s.request(method, url, **kw) as r:
        return r.status, await r.text(), dict(r.headers)


async def test_uplink_audio_is_decoded_to_16k_mono_in_utterances_ended_by_silence_or_leaving() -> None:
    got = Collector()
    with loopback_ice():
        async with live_stream(160, 120, freq=330.0) as live:
            live.sink.uplink = Uplink(got)
            track = PcmTrack()
            v = await connect(live.url, send=track)
            assert live.sink.speaker == v.session
            await wait_for(lambda: v.frames >= 10)
            await asyncio.sleep(0.5)
            assert got.utterances == []                 # silence alone opens nothing
            track.play(_tone48(1.0, 700.0, 0.4))
            await wait_for(lambda: got.finals == 1)     # ended by 0.4 s of silence, still connected
            first = got.utterance(0)
            await asyncio.sleep(0.5)
            assert len(got.utterances) == 1             # the silence after it is not pushed
            track.play(_tone48(3.0, 500.0, 0.3))
            await wait_for(lambda: got.utterance(1).size >= 16_000)
            assert got.finals == 1                      # open while the peer talks
            await v.close()                             # ... and ended when it leaves mid-word
            await wait_for(lambda: got.finals == 2 and live.sink.viewers == 0)
            assert live.sink.speaker is None            # the slot is free again
            assert live.player_error is None
    # Utterance 1: the whole 1 s tone + 0.4 s hangover, no leading silence beyond the pre-roll.
    assert 16_000 * 1.4 - 400 <= first.size <= 16_000 * 1.5, first.size
    rms = np.sqrt(np.mean(first[: first.size // 320 * 320].reshape(-1, 320) ** 2, axis=1))
    loud = np.flatnonzero(rms > 0.2)                             # 20 ms blocks of the tone
    assert loud[0] <= 3 and loud.size >= 47, (loud[0], loud.size)
    assert (rms[loud[-1] + 3 :] < 0.01).all() and rms.size - loud[-1] >= 18  # then the hangover
    # 16 kHz: the 700 Hz tone sits at 700 Hz only if the rate conversion is right.
    seg = first[loud[0] * 320 + 800 : loud[0] * 320 + 800 + 12_800]
    spec = np.abs(np.fft.rfft(seg * np.hanning(seg.size)))
    assert abs(np.argmax(spec) * 16_000 / seg.size - 700.0) < 3
    assert abs(float(np.sqrt(np.mean(seg ** 2))) - 0.4 / np.sqrt(2)) < 0.05  # level kept (mono)
    second = got.utterance(1)
    spec = np.abs(np.fft.rfft(second[-8000:] * np.hanning(8000)))
    assert abs(np.argmax(spec) * 2 - 500.0) < 5                 # cut while the tone still sounded


async def test_one_speaker_at_a_time_viewers_always_welcome() -> None:
    got = Collector()
    with loopback_ice():
        async with live_stream(160, 120) as live:
            live.sink.uplink = Uplink(got)
            a = await connect(live.url, send=PcmTrack())
            b = await connect(live.url, send=PcmTrack(), expect=409)   # second speaker refused
            assert "already sending audio" in b.location
            c = await connect(live.url)                                # a plain viewer is fine
            await wait_for(lambda: a.frames >= 5 and c.frames >= 5)
            assert live.sink.viewers == 2 and live.sink.speaker == a.session
            await a.close()
            await wait_for(lambda: live.sink.speaker is None)
            d = await connect(live.url, send=PcmTrack(_tone48(0.5, 500.0)))  # now it may speak
            assert live.sink.speaker == d.session
            await wait_for(lambda: got.finals == 1)   # d's tone, ended by the silence after it
            await d.close()
            await c.close()
            await wait_for(lambda: live.sink.viewers == 0)
    assert got.finals == 1 and len(got.utterances) == 1   # a silent speaker pushes nothing
    assert np.abs(got.utterance(0)).max() > 0.3


async def test_sending_offer_without_callback_is_watch_only() -> None:
    with loopback_ice():
        async with live_stream(160, 120) as live:
            assert live.sink.on_uplink_audio is None
            v = await connect(live.url, send=PcmTrack(_tone48(1.0, 500.0)))
            await wait_for(lambda: v.frames >= 10 and sum(a.size for a in v.audio) > 48_000)
            audio_m = v.pc.remoteDescription.sdp.split("m=audio")[1]
            assert "a=sendonly" in audio_m      # we declined their audio in the answer
            assert live.sink.speaker is None
            await v.close()


async def test_sessions_location_delete_and_whip_style_sdp() -> None:
    with loopback_ice():
        async with live_stream(160, 120) as live:
            a = await connect(live.url)
            b = await connect(live.url)
            assert a.location == f"/session/{a.session}" and len(a.session) >= 16
            assert a.session != b.session and set(live.sink.sessions) == {a.session, b.session}
            await wait_for(lambda: a.frames >= 5 and b.frames >= 5)
            status, _, _ = await _http("DELETE", live.url + a.location.lstrip("/"))
            assert status == 204 and live.sink.viewers == 1
            status, text, _ = await _http("DELETE", live.url + a.location.lstrip("/"))
            assert status == 404 and "no such session" in text
            await wait_for(lambda: a.pc.connectionState in ("closed", "failed"), timeout=40)
            n = b.frames
            await wait_for(lambda: b.frames >= n + 25)   # B is untouched by A's end
            # WHIP/WHEP: bare SDP in, 201 + bare SDP answer + Location out.
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            status, text, headers = await _http("POST", live.url + "offer", data=pc.localDescription.sdp,
                                                headers={"Content-Type": "application/sdp"})
            assert status == 201 and text.startswith("v=0") and "m=video" in text
            assert headers["Content-Type"].startswith("application/sdp")
            assert headers["Location"].startswith("/session/")
            status, _, _ = await _http("DELETE", live.url + headers["Location"].lstrip("/"))
            assert status == 204
            await pc.close()
            await a.close()
            await b.close()
            assert live.player_error is None


async def test_uplink_busy_error_in_process() -> None:
    """The sink itself: a second sending offer raises UplinkBusyError and leaves nothing behind."""
    sink = WebRtcSink(uplink=Uplink(Collector()))
    await sink.start(160, 120, 25)
    offers = []
    for _ in range(2):
        pc = RTCPeerConnection()
        pc.addTransceiver(PcmTrack(), direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        offers.append((pc, pc.localDescription.sdp))
    first = await sink.accept(offers[0][1], "offer")
    assert sink.speaker == first.session and first.type == "answer"
    with pytest.raises(UplinkBusyError, match="already sending audio"):
        await sink.accept(offers[1][1], "offer")
    assert sink.viewers == 1
    assert not await sink.close_session("été") and not await sink.close_session(first.session[:-1])
    assert await sink.close_session(first.session) and sink.speaker is None
    assert not await sink.close_session(first.session)
    await sink.close()
    for pc, _ in offers:
        await pc.close()


async def test_whip_ingest_sendonly_audio_peer_is_the_speaker() -> None:
    """A WHIP client: bare SDP, one sendonly audio track, nothing to receive; DELETE ends it."""
    got = Collector()
    with loopback_ice():
        async with live_stream(160, 120) as live:
            live.sink.uplink = Uplink(got)
            pc = RTCPeerConnection()
            track = PcmTrack(_tone48(0.6, 600.0, 0.4))
            pc.addTransceiver(track, direction="sendonly")
            await pc.setLocalDescription(await pc.createOffer())
            status, sdp, headers = await _http("POST", live.url + "offer", data=pc.localDescription.sdp,
                                               headers={"Content-Type": "application/sdp"})
            assert status == 201 and "a=recvonly" in sdp.split("m=audio")[1]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
            assert live.sink.speaker == headers["Location"].rsplit("/", 1)[1]
            await wait_for(lambda: got.finals == 1)    # the tone, then the hangover
            status, _, _ = await _http("DELETE", live.url + headers["Location"].lstrip("/"))
            assert status == 204 and live.sink.speaker is None and live.sink.viewers == 0
            await pc.close()
    tone = got.utterance(0)
    spec = np.abs(np.fft.rfft(tone[1600:9600] * np.hanning(8000)))
    assert abs(np.argmax(spec) * 2 - 600.0) < 5
