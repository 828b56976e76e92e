"""WebRTC sink: any number of browser viewers watch and hear the live avatar (aiortc).

aiortc tracks are *pulled*: each viewer's RTP sender calls ``recv()`` in a loop.  The player pushes.
The bridge is a mailbox per viewer: a two-slot video mailbox (a viewer whose encoder falls behind
by more than one frame skips the oldest instead of lagging; one slot more absorbs a single late
encode — a GC pause, a burst of HTTP requests on the loop — without losing a frame) and a short
audio queue.  ``recv()`` waits on
the mailbox, so the player's clock paces every viewer; nothing here sleeps on its own timer.

Timestamps come from the frame index, never from wall time: video pts on the 90 kHz RTP clock is
``(index - first) * 90000 / fps`` and audio pts on the 48 kHz clock is ``(index - first) * 48000 /
fps`` (+960 for the second 20 ms half), with ``first`` the first frame this viewer received.  Audio
and video of one frame therefore carry the same instant, which is what the browser's lip sync uses.

Each frame's 16 kHz slice is upsampled ×3 once (shared by all viewers) and cut into 20 ms s16
frames of 960 samples, the unit Opus encodes.  A viewer that disconnects, fails or never connects
is closed and removed; the others and the player never notice.

**Sessions.**  Every accepted offer is a session with an unguessable id (WHIP/WHEP style: the
server answers ``Location: /session/<id>`` and ``DELETE /session/<id>`` ends it).

**Uplink (chatbots).**  A peer whose offer *sends* audio (``sendrecv``/``sendonly``) is the
speaker.  This sink only reads its track: each decoded ``av.AudioFrame`` (aiortc hands out 20 ms
frames, usually 48 kHz stereo s16) goes to the :class:`~avatar_agent.audio.uplink.Uplink` the
wiring gave it (``uplink=``), which converts, cuts utterances and pushes them into the speech
source; when the peer leaves (DELETE, ICE failure, close, connect timeout) the uplink is told to
end an open utterance.  Only one speaker at a time: while one is connected a second sending offer
is refused with :class:`UplinkBusyError` (HTTP 409); viewers (recvonly offers) are never refused
for that.  Without an uplink, a sending offer is accepted but its audio is declined in the answer
(the transceiver becomes ``sendonly`` from our side), so nothing buffers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

from avatar_agent.audio.resample import Upsampler3
from avatar_agent.queues import DropOldest
from avatar_agent.audio.uplink import Uplink, UplinkCallback
from avatar_agent.types import SAMPLE_RATE, VideoFrame

log = logging.getLogger(__name__)

_PIP_LINE = "pip install 'avatar-agent[webrtc]'  (or: pip install aiortc==1.16.0)"

VIDEO_CLOCK = 90_000
VIDEO_SLOTS = 2
"""Video frames a viewer may have waiting for its encoder (beyond: the oldest is skipped)."""
AUDIO_RATE = 48_000
AUDIO_FRAME = 960  # 20 ms at 48 kHz: one Opus frame


class WebRtcError(RuntimeError):
    """A viewer could not be added (bad offer, too many viewers, sink not started)."""


class OfferError(WebRtcError, ValueError):
    """The SDP offer itself is unusable; the message says what is wrong (HTTP 400)."""


class UplinkBusyError(WebRtcError):
    """Another peer is already sending audio; offer audio as recvonly to watch (HTTP 409)."""


class Answer(NamedTuple):
    """What :meth:`WebRtcSink.accept` returns: the SDP answer and the new session's id."""

    sdp: str
    type: str
    session: str


def _import_aiortc() -> Any:
    try:
        import aiortc
    except ImportError as e:  # optional dependency
        raise WebRtcError(f"the WebRTC sink needs aiortc: {_PIP_LINE}") from e
    return aiortc


def _track_classes() -> tuple[type, type]:
    """Build the two MediaStreamTrack subclasses (aiortc is imported only when needed)."""
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    async def _wait_live(track: Any, ready: Any) -> None:
        """Wait until ``ready()`` holds; MediaStreamError once the track has ended."""
        while not ready():
            if track.readyState != "live":
                raise MediaStreamError
            track._ready.clear()
            await track._ready.wait()
        if track.readyState != "live":
            raise MediaStreamError

    class MailboxVideoTrack(MediaStreamTrack):
        """Video track whose ``recv`` returns the newest frame pushed by the player."""

        kind = "video"

        def __init__(self, viewer: _Viewer) -> None:
            super().__init__()
            self._viewer = viewer
            self._slots: DropOldest[VideoFrame] = DropOldest(VIDEO_SLOTS)
            self._ready = asyncio.Event()
            self.frames_sent = 0

        @property
        def frames_skipped(self) -> int:
            """Frames dropped because the encoder was two frames behind."""
            return self._slots.dropped

        def put(self, frame: VideoFrame) -> None:
            self._slots.put(frame)
            self._ready.set()

        async def recv(self) -> Any:
            await _wait_live(self, lambda: len(self._slots) > 0)
            frame = self._slots.get_nowait()
            # Waited for above; first_index is set by the push that filled the slot.
            assert frame is not None and self._viewer.first_index is not None
            vf = av.VideoFrame.from_ndarray(frame.image, format="rgb24")
            vf.pts = (frame.index - self._viewer.first_index) * VIDEO_CLOCK // self._viewer.fps
            vf.time_base = Fraction(1, VIDEO_CLOCK)
            self.frames_sent += 1
            return vf

        def stop(self) -> None:
            super().stop()
            self._ready.set()  # wake a waiting recv so it can raise

    class QueueAudioTrack(MediaStreamTrack):
        """Audio track returning 20 ms 48 kHz s16 frames in the order the player sent them."""

        kind = "audio"

        def __init__(self, viewer: _Viewer, max_frames: int) -> None:
            super().__init__()
            self._viewer = viewer
            self._queue: deque[tuple[int, np.ndarray]] = deque(maxlen=max_frames)  # drop oldest
            self._ready = asyncio.Event()
            self._started = False
            self.frames_sent = 0

        def put(self, pts: int, pcm: np.ndarray) -> None:
            if self._started:  # before the sender starts, old audio would only add latency
                self._queue.append((pts, pcm))
                self._ready.set()

        async def recv(self) -> Any:
            self._started = True
            await _wait_live(self, lambda: bool(self._queue))
            pts, pcm = self._queue.popleft()
            # Stereo on purpose: aiortc's Opus encoder wants stereo, and FFmpeg's mono→stereo
            # upmix treats mono as front-centre and lowers it by 3 dB.
            af = av.AudioFrame(format="s16", layout="stereo", samples=AUDIO_FRAME)
            af.planes[0].update(np.repeat(pcm, 2).tobytes())
            af.sample_rate = AUDIO_RATE
            af.pts = pts
            af.time_base = Fraction(1, AUDIO_RATE)
            self.frames_sent += 1
            return af

        def stop(self) -> None:
            super().stop()
            self._ready.set()

    return MailboxVideoTrack, QueueAudioTrack


class _Viewer:
    """One browser: its peer connection, its two tracks and its timestamp origin."""

    def __init__(self, vid: int, pc: Any, fps: int, session: str = "") -> None:
        self.id = vid
        self.session = session
        self.pc = pc
        self.fps = fps
        self.first_index: int | None = None
        self.video: Any = None
        self.audio: Any = None
        self.uplink_task: asyncio.Task[None] | None = None   # reads its track (the speaker)
        self.timer: asyncio.TimerHandle | None = None  # the connect timeout
        self.joined = time.monotonic()

    def push(self, frame: VideoFrame, pcm_halves: tuple[np.ndarray, ...]) -> None:
        if self.first_index is None:
            self.first_index = frame.index
        self.video.put(frame)
        base = (frame.index - self.first_index) * AUDIO_RATE // self.fps
        for k, pcm in enumerate(pcm_halves):
            self.audio.put(base + k * AUDIO_FRAME, pcm)


class WebRtcSink:
    """Serves the player's frames and audio to WebRTC viewers (VP8/H.264 video + Opus audio).

    Args:
        name: sink name for logs and metrics.
        max_viewers: further offers are refused with WebRtcError (HTTP 503 in the server).
        connect_timeout: seconds a new viewer may take to reach "connected" before it is dropped.
        connect_grace: when the sink is full, a viewer still not connected after this many
            seconds gives its slot to the new offer (a peer that never completes ICE must not
            lock real viewers out for the whole ``connect_timeout``).
        ice_servers: optional STUN/TURN URLs for viewers outside the LAN (none: host candidates).
        uplink: where a speaking peer's decoded audio goes (see the module docstring); None
            declines peers' audio.  May also be set later as the ``uplink`` attribute
            (``make_app`` does).

    Use: ``await sink.start(w, h, fps)``; the server calls ``await sink.accept(sdp, "offer")`` per
    peer and returns the answer (an :class:`Answer`: sdp, type, session id); ``await
    sink.close_session(id)`` ends one; the player calls ``await sink.send(frame)`` every tick.
    """

    def __init__(self, name: str = "webrtc", max_viewers: int = 16, connect_timeout: float = 30.0,
                 connect_grace: float = 5.0, ice_servers: list[str] | None = None,
                 uplink: Uplink | None = None) -> None:
        self.name = name
        self.max_viewers = max_viewers
        self.connect_timeout = connect_timeout
        self.connect_grace = connect_grace
        self.ice_servers = list(ice_servers or [])
        self.uplink = uplink
        self.sessions_opened = 0
        self.sessions_closed = 0
        self._speaker: _Viewer | None = None
        self.width = self.height = self.fps = 0
        self.frames_sent = 0
        self._viewers: dict[int, _Viewer] = {}
        self._pending = 0  # offers being negotiated: they hold a slot of max_viewers already
        self._ids = itertools.count(1)
        self._upsample = Upsampler3()
        self._classes: tuple[type, type] | None = None
        self._started = False
        self._tasks: set[asyncio.Task[None]] = set()  # keeps fire-and-forget drops alive

    @property
    def viewers(self) -> int:
        """Number of viewers currently attached (connecting or connected)."""
        return len(self._viewers)

    @property
    def pending_offers(self) -> int:
        """Offers being negotiated right now (each holds one of the ``max_viewers`` slots)."""
        return self._pending

    @property
    def sessions(self) -> list[str]:
        """Ids of the sessions currently attached."""
        return [v.session for v in self._viewers.values()]

    @property
    def speaker(self) -> str | None:
        """Session id of the peer whose audio is the uplink now (None: nobody sends audio)."""
        return self._speaker.session if self._speaker is not None else None

    @property
    def on_uplink_audio(self) -> UplinkCallback | None:
        """Where the uplink pushes (None: peers' audio is declined)."""
        return self.uplink.push if self.uplink is not None else None

    def uplink_stats(self) -> dict[str, Any]:
        """The current uplink's counters (frames received, 16 kHz samples pushed, blocks dropped)."""
        speaker, up = self._speaker, self.uplink
        if speaker is None or speaker.uplink_task is None or up is None:
            return {"session": None}
        return {"session": speaker.session, **up.stats()}

    async def start(self, width: int, height: int, fps: int) -> None:
        """Fix the stream geometry; viewers may connect from now on."""
        if width <= 0 or height <= 0 or fps <= 0:
            raise ValueError(f"{self.name}: width/height/fps must be positive, got {width}x{height}@{fps}")
        if AUDIO_RATE % fps or SAMPLE_RATE % fps:
            raise ValueError(f"{self.name}: fps must divide 16000 and 48000 exactly (25 does), got {fps}")
        _import_aiortc()
        self._classes = _track_classes()
        self.width, self.height, self.fps = width, height, fps
        self._started = True

    async def send(self, frame: VideoFrame) -> None:
        """Hand one frame and its audio slice to every viewer (never waits on a viewer)."""
        if not self._started:
            raise WebRtcError(f"{self.name}: send() before start() or after close()")
        audio = np.asarray(frame.audio, np.float32).reshape(-1)
        if audio.size * self.fps != SAMPLE_RATE:
            raise ValueError(f"{self.name}: frame {frame.index} carries {audio.size} audio samples, "
                             f"expected {SAMPLE_RATE // self.fps} (16 kHz at {self.fps} fps)")
        up = self._upsample(audio)  # [3 * 16000/fps] float32 at 48 kHz
        pcm = np.clip(np.rint(up * 32767.0), -32768, 32767).astype(np.int16)
        halves = tuple(pcm[i : i + AUDIO_FRAME] for i in range(0, pcm.size, AUDIO_FRAME))
        self.frames_sent += 1
        for viewer in list(self._viewers.values()):
            try:
                viewer.push(frame, halves)
            except Exception as e:  # one broken viewer must not stop the others
                log.warning("%s: viewer %d failed (%s); dropping it", self.name, viewer.id, e)
                await self._drop(viewer)

    async def accept(self, sdp: str, type_: str = "offer") -> Answer:
        """Add a peer from its SDP offer; returns the answer and its session id.

        Raises:
            OfferError: the offer is unusable (HTTP 400).
            UplinkBusyError: it sends audio while another peer is the speaker (HTTP 409).
            WebRtcError: not started, or ``max_viewers`` reached (HTTP 503).
        """
        if not self._started:
            raise WebRtcError(f"{self.name}: the stream has not started yet; retry in a moment")
        if type_ != "offer":
            raise OfferError(f"expected an SDP of type 'offer', got {type_!r}")
        if not isinstance(sdp, str) or not sdp.startswith("v=0"):
            raise OfferError("the 'sdp' field must be an SDP text starting with 'v=0'")
        # The cap counts offers still negotiating: the check and the reservation happen with no
        # await between them, so concurrent offers can never overshoot it.
        while len(self._viewers) + self._pending >= self.max_viewers:
            if not await self._evict_stalled():
                raise WebRtcError(f"{self.name}: {self.max_viewers} viewers already connected "
                                  "or connecting; retry later")
        self._pending += 1
        try:
            return await self._accept(sdp)
        finally:
            self._pending -= 1

    async def _accept(self, sdp: str) -> Answer:
        """Negotiate one offer (its slot is reserved by :meth:`accept`)."""
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

        config = RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in self.ice_servers])
        pc = RTCPeerConnection(configuration=config)
        viewer = _Viewer(next(self._ids), pc, self.fps, session=secrets.token_urlsafe(12))
        video_cls, audio_cls = self._classes  # type: ignore[misc]
        viewer.video = video_cls(viewer)
        viewer.audio = audio_cls(viewer, max_frames=AUDIO_RATE // AUDIO_FRAME // 2)  # 0.5 s
        uplink_track: Any = None
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            kinds = {t.kind for t in pc.getTransceivers()}
            if "video" not in kinds and "audio" not in kinds:
                raise OfferError("the offer asks for neither video nor audio; add recvonly transceivers")
            for t in pc.getTransceivers():
                if t.kind == "video":
                    pc.addTrack(viewer.video)
                elif t.kind == "audio":
                    pc.addTrack(viewer.audio)
                    if t.receiver.track is not None:  # the peer sends audio: an uplink offer
                        if uplink_track is not None or self.uplink is None:
                            t.direction = "sendonly"  # decline it: nothing is received or buffered
                        elif self._speaker is not None:
                            raise UplinkBusyError(
                                f"{self.name}: another peer is already sending audio; end that "
                                "session (DELETE its Location) or offer audio as recvonly")
                        else:
                            uplink_track = t.receiver.track
                            self._speaker = viewer  # reserved now: the awaits below yield
            await pc.setLocalDescription(await pc.createAnswer())
        except (OfferError, UplinkBusyError):
            if self._speaker is viewer:
                self._speaker = None
            await pc.close()
            raise
        except Exception as e:  # aiortc's parse/negotiation errors: the offer is at fault
            if self._speaker is viewer:
                self._speaker = None
            await pc.close()
            raise OfferError(f"cannot negotiate this offer: {e}") from e

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            log.info("%s: viewer %d %s", self.name, viewer.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self._drop(viewer)

        if uplink_track is not None:
            assert self.uplink is not None
            self.uplink.begin(f"{self.name} session {viewer.id}")
            viewer.uplink_task = asyncio.ensure_future(self._read_uplink(self.uplink, uplink_track))
        viewer.timer = asyncio.get_running_loop().call_later(self.connect_timeout,
                                                             self._check_connected, viewer)
        self._viewers[viewer.id] = viewer
        self.sessions_opened += 1
        log.info("%s: viewer %d joined%s (%d now)", self.name, viewer.id,
                 " as the speaker" if uplink_track is not None else "", len(self._viewers))
        return Answer(pc.localDescription.sdp, pc.localDescription.type, viewer.session)

    async def close_session(self, session: str) -> bool:
        """End one session (WHEP DELETE); False when no such session is attached."""
        key = session.encode("utf-8", "replace")  # compare_digest refuses non-ASCII str
        for viewer in list(self._viewers.values()):
            if secrets.compare_digest(viewer.session.encode(), key):
                await self._drop(viewer)
                return True
        return False

    async def _evict_stalled(self) -> bool:
        """Free the slot of the oldest viewer still not connected after ``connect_grace`` s.

        A peer that offers and never completes ICE would otherwise hold its slot for the whole
        ``connect_timeout``, refusing real viewers when the sink is full.
        """
        now = time.monotonic()
        stalled = [v for v in self._viewers.values()
                   if v.pc.connectionState != "connected" and now - v.joined >= self.connect_grace]
        if not stalled:
            return False
        oldest = min(stalled, key=lambda v: v.joined)
        log.warning("%s: full; dropping viewer %d, still not connected after %.1f s", self.name,
                    oldest.id, now - oldest.joined)
        await self._drop(oldest)
        return True

    def _check_connected(self, viewer: _Viewer) -> None:
        if viewer.id in self._viewers and viewer.pc.connectionState != "connected":
            log.warning("%s: viewer %d did not connect in %.0f s; dropping it",
                        self.name, viewer.id, self.connect_timeout)
            task = asyncio.ensure_future(self._drop(viewer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drop(self, viewer: _Viewer) -> None:
        if self._viewers.pop(viewer.id, None) is None:
            return
        self.sessions_closed += 1
        if viewer.timer is not None:  # the pending timer would keep the whole peer alive for 30 s
            viewer.timer.cancel()
            viewer.timer = None
        for track in (viewer.video, viewer.audio):
            track.stop()
        try:
            await viewer.pc.close()
        except Exception as e:  # closing a half-dead connection may fail; it is gone either way
            log.debug("%s: closing viewer %d: %s", self.name, viewer.id, e)
        task = viewer.uplink_task
        if task is not None:
            # pc.close() ended the remote track, so the reader is finishing; never wait long.
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), 2.0)
                except (TimeoutError, asyncio.CancelledError):
                    task.cancel()
                except Exception as e:
                    log.debug("%s: uplink reader of viewer %d: %s", self.name, viewer.id, e)
            if self.uplink is not None:
                await self.uplink.finish()  # a no-op when the reader already ended the stream
            if self._speaker is viewer:
                self._speaker = None
        log.info("%s: viewer %d left (%d now)", self.name, viewer.id, len(self._viewers))

    async def _read_uplink(self, uplink: Uplink, track: Any) -> None:
        """Hand the speaker's decoded frames to the uplink until its track ends."""
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                await uplink.push_frame(await track.recv())
        except MediaStreamError:
            pass
        finally:
            await uplink.finish()

    async def close_viewers(self) -> None:
        """Disconnect every viewer (server shutdown); the sink stays usable."""
        await asyncio.gather(*(self._drop(v) for v in list(self._viewers.values())))

    async def close(self) -> None:
        """Disconnect every viewer and stop accepting new ones."""
        self._started = False
        await self.close_viewers()
