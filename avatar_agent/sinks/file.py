"""MP4 file sink: H.264 video + AAC audio via PyAV, written so that a killed run stays playable.

The file is a *fragmented* MP4 (``movflags=frag_keyframe+empty_moov+default_base_moof``): the
header holds no sample table, and every keyframe starts a self-contained fragment (moof + mdat).
With one keyframe per ``gop`` frames (default: one per second) and ``flush_packets=1``, a SIGKILL
loses at most the fragment in progress plus what is still queued; everything before it decodes.

Timing is exact by construction: video pts is the frame's index (time base 1/fps); audio is every
frame's own 16 kHz slice, upsampled ×3 to 48 kHz by a fixed FIR (so each slice becomes exactly 3×
as many samples) and stamped with a running sample count.  Missing indices (frames the player
never produced) become silence, so audio duration == video duration and they stay in sync.

Encoding runs in one worker thread; ``send`` only enqueues.  Overflow policy (live mode): at most
``max_queued_images`` frames keep their image; beyond that the *oldest queued image* is dropped
(counted in ``frames_dropped``, logged once per second) but its audio is kept, so the recording's
sound never has holes — the previous picture is simply held a frame longer.  Offline mode
(``avatar-agent render``) never drops: ``send`` waits for room instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from avatar_agent.audio.resample import Upsampler3
from avatar_agent.queues import SyncDropOldest
from avatar_agent.sinks.writer import WriterThread
from avatar_agent.types import SAMPLE_RATE, VideoFrame

log = logging.getLogger(__name__)

_PIP_LINE = "pip install av==18.1.0"


class FileSinkError(RuntimeError):
    """The mp4 file could not be written (the message names the path and the cause)."""


def _import_av() -> Any:
    try:
        import av
    except ImportError as e:  # optional at import time, required to use the sink
        raise FileSinkError(f"the mp4 file sink needs PyAV: {_PIP_LINE}") from e
    return av


@dataclass(slots=True)
class _Entry:
    """One frame's audio (its image travels in the bounded image queue)."""

    index: int
    audio: np.ndarray


class Mp4Sink:
    """Writes the player's frames and audio slices to a fragmented, kill-safe MP4.

    Args:
        path: output file (overwritten).
        fps: expected frame rate; if given, ``start`` checks the player agrees.
        crf: x264 constant rate factor (lower = better, 18–28 is sensible).
        preset: x264 speed preset; "veryfast" keeps one core free for the rest of the agent.
        gop: frames per keyframe = per fragment (default: fps, one second); also the most a
            SIGKILL can lose (plus the queue).
        audio_bitrate: AAC bit rate in bit/s.
        offline: True for ``avatar-agent render``: never drop, ``send`` waits for the encoder.
        max_queued_images: images held while the encoder catches up (live mode; default 2 s).
        threads: x264 threads; 1 leaves the second core of a 2-core machine to inference.
        name: sink name for logs and metrics.
    """

    AUDIO_RATE = 48_000

    def __init__(self, path: str | Path, fps: int | None = None, crf: int = 23,
                 preset: str = "veryfast", gop: int | None = None, audio_bitrate: int = 64_000,
                 offline: bool = False, max_queued_images: int | None = None, threads: int = 1,
                 name: str = "file") -> None:
        if not 0 <= crf <= 51:
            raise ValueError(f"Mp4Sink crf must be in 0..51, got {crf}")
        if gop is not None and gop < 1:
            raise ValueError(f"Mp4Sink gop must be ≥ 1 frame, got {gop}")
        self.name = name
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self.preset = preset
        self.gop = gop
        self.audio_bitrate = audio_bitrate
        self.offline = offline
        self.max_queued_images = max_queued_images
        self.threads = threads
        self.frames_written = 0
        self.audio_samples_written = 0  # at 48 kHz
        self.finished = False
        """True once close() finalised the file without an error."""
        self.failure: str | None = None
        """Why the file could not be created or written (None: no failure so far)."""
        self._writer: WriterThread[_Entry] | None = None
        self._images: SyncDropOldest[tuple[int, np.ndarray]] | None = None
        self._expected: int | None = None  # writer thread: the next index it should encode
        self._next_index: int | None = None
        self._first_index = 0
        self._samples_per_frame = 0
        self._last_drop_log = 0.0
        self._av: Any = None
        self._container: Any = None
        self._vstream: Any = None
        self._astream: Any = None

    async def start(self, width: int, height: int, fps: int) -> None:
        """Create the file and the encoders (in a thread: opening a file can block)."""
        if self._container is not None:
            raise FileSinkError(f"{self.name}: start() called twice")
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"{self.name}: H.264 4:2:0 needs a positive even frame size, got {width}x{height}")
        if self.fps is not None and fps != self.fps:
            raise ValueError(f"{self.name}: sink was made for {self.fps} fps but the player runs at {fps}")
        self.fps = fps
        self._samples_per_frame = SAMPLE_RATE // fps
        if self.max_queued_images is None:
            self.max_queued_images = 2 * fps
        try:
            self._av = _import_av()
            await asyncio.to_thread(self._open, width, height, fps)
        except Exception as e:
            self.failure = str(e)
            raise
        # Audio is never dropped (an entry is a few KB); images are, oldest first, beyond
        # max_queued_images — the worker finds an entry's image at the head of this queue, or
        # knows it was dropped.
        self._images = SyncDropOldest(self.max_queued_images)
        self._writer = WriterThread(f"{self.name}-encoder", SyncDropOldest[_Entry](None),
                                    self._write, finish=self._finish, on_error=self._failed)
        self._writer.start()

    def _open(self, width: int, height: int, fps: int) -> None:
        av = self._av
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.open("wb").close()  # PyAV opens lazily; surface a bad path here, not mid-run
            container = av.open(str(self.path), "w", format="mp4", options={
                "movflags": "frag_keyframe+empty_moov+default_base_moof",
                "flush_packets": "1",  # hand each finished fragment to the OS at once
            })
        except Exception as e:
            raise FileSinkError(f"{self.name}: cannot create {self.path}: {e}") from e
        gop = self.gop or fps
        v = container.add_stream("libx264", rate=fps, options={
            "crf": str(self.crf),
            "preset": self.preset,
            "tune": "zerolatency",  # no lookahead/B-frames: a frame is in the file one fragment later
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
        })
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.time_base = Fraction(1, fps)
        v.codec_context.time_base = Fraction(1, fps)
        v.codec_context.gop_size = gop
        v.codec_context.thread_count = self.threads
        a = container.add_stream("aac", rate=self.AUDIO_RATE, layout="mono")
        a.bit_rate = self.audio_bitrate
        a.time_base = Fraction(1, self.AUDIO_RATE)
        self._vtb, self._atb = Fraction(1, fps), Fraction(1, self.AUDIO_RATE)
        self._container, self._vstream, self._astream = container, v, a
        self._upsample = Upsampler3()
        self._abuf = np.zeros(0, np.float32)  # 48 kHz samples not yet in an AAC frame
        self._apts = 0

    async def send(self, frame: VideoFrame) -> None:
        """Queue a frame and its audio slice for encoding (never blocks in live mode)."""
        writer, images = self._writer, self._images
        if writer is not None and writer.error is not None:
            raise FileSinkError(f"{self.name}: writing {self.path} failed: {writer.error}") from writer.error
        if writer is None or images is None or writer.queue.closed:
            raise FileSinkError(f"{self.name}: send() before start() or after close()")
        assert self.fps is not None and self.max_queued_images is not None  # set by start()
        v = self._vstream
        if frame.image.shape != (v.height, v.width, 3) or frame.image.dtype != np.uint8:
            raise ValueError(f"{self.name}: frame {frame.index} is {frame.image.dtype} {frame.image.shape}, "
                             f"expected uint8 ({v.height}, {v.width}, 3)")
        audio = np.asarray(frame.audio, np.float32).reshape(-1)
        if abs(audio.size - SAMPLE_RATE / self.fps) >= 1:
            raise ValueError(f"{self.name}: frame {frame.index} carries {audio.size} audio samples, expected "
                             f"{SAMPLE_RATE / self.fps:g} (16 kHz at {self.fps} fps); A/V sync depends on it")
        if self._next_index is not None and frame.index < self._next_index:
            log.warning("%s: frame %d arrived after %d; ignored", self.name, frame.index, self._next_index - 1)
            return
        if self._next_index is None:
            self._first_index = frame.index
        self._next_index = frame.index + 1
        if self.offline:
            while len(images) >= self.max_queued_images and writer.error is None:
                await asyncio.to_thread(images.wait_for_room, 1.0)
        # The image first: when the worker takes the entry, its image is queued or dropped.
        if images.put((frame.index, frame.image)):  # live overflow: the oldest image went
            now = time.monotonic()
            if now - self._last_drop_log > 1.0:
                self._last_drop_log = now
                log.warning("%s: encoder behind, %d images dropped so far (audio kept)",
                            self.name, self.frames_dropped)
        writer.put(_Entry(frame.index, audio))

    @property
    def frames_dropped(self) -> int:
        """Images dropped because the encoder fell behind (their audio was kept)."""
        return self._images.dropped if self._images is not None else 0

    async def close(self) -> None:
        """Encode what is queued, flush the encoders and finalise the file."""
        writer = self._writer
        if writer is None or writer.queue.closed:
            return
        writer.stop()
        await asyncio.to_thread(writer.join)
        if writer.error is not None:
            self.failure = f"writing {self.path} failed: {writer.error}"
            raise FileSinkError(f"{self.name}: writing {self.path} failed: {writer.error}") from writer.error
        self.finished = True
        log.info("%s: wrote %d frames (%d dropped) to %s", self.name, self.frames_written,
                 self.frames_dropped, self.path)

    # ---- worker thread ----------------------------------------------------------------------

    def _write(self, entry: _Entry) -> None:
        """Writer thread: one frame's audio, and its image unless it was dropped."""
        expected = entry.index if self._expected is None else self._expected
        if entry.index > expected:  # frames never produced: keep audio continuous
            self._encode_audio(np.zeros((entry.index - expected) * self._samples_per_frame, np.float32))
        self._expected = entry.index + 1
        self._encode_audio(entry.audio)
        assert self._images is not None  # set by start()
        image = self._images.pop_if(lambda item: item[0] == entry.index)
        if image is not None:
            self._encode_video(entry.index, image[1])

    def _failed(self, e: BaseException) -> None:
        """Writer thread: the encoder failed (reported through send()/close())."""
        log.error("%s: encoder failed: %s", self.name, e)
        try:
            self._container.close()
        except Exception:
            pass

    def _encode_video(self, index: int, image: np.ndarray) -> None:
        vf = self._av.VideoFrame.from_ndarray(image, format="rgb24")
        vf.pts = index - self._first_index
        vf.time_base = self._vtb  # the stream's own time base changes when the muxer starts
        self._container.mux(self._vstream.encode(vf))
        self.frames_written += 1

    def _encode_audio(self, samples16k: np.ndarray, final: bool = False) -> None:
        self._abuf = np.concatenate([self._abuf, self._upsample(samples16k)])
        size = self._astream.codec_context.frame_size or 1024
        while self._abuf.size >= size or (final and self._abuf.size):
            n = min(size, self._abuf.size)
            af = self._av.AudioFrame.from_ndarray(self._abuf[None, :n].copy(), format="fltp", layout="mono")
            af.sample_rate = self.AUDIO_RATE
            af.pts = self._apts
            af.time_base = self._atb
            self._apts += n
            self._abuf = self._abuf[n:]
            self._container.mux(self._astream.encode(af))
        self.audio_samples_written = self._apts + self._abuf.size

    def _finish(self) -> None:
        self._encode_audio(np.zeros(0, np.float32), final=True)
        self._container.mux(self._vstream.encode(None))
        self._container.mux(self._astream.encode(None))
        self._container.close()
