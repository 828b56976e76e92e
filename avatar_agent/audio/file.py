"""File source: anything PyAV (FFmpeg) decodes → 20 ms frames, real-time or as fast as possible."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator

import numpy as np

from avatar_agent.audio.frames import paced
from avatar_agent.audio.resample import Framer, StreamResampler
from avatar_agent.clock import Clock, SystemClock
from avatar_agent.types import SAMPLE_RATE, AudioFrame

log = logging.getLogger(__name__)


class AudioFileError(ValueError):
    """An audio file that cannot be used: missing, unreadable, corrupt, or without audio."""


def _av() -> Any:
    try:
        import av
    except ImportError as e:  # pragma: no cover - core dependency
        raise ImportError("PyAV is missing: pip install av==18.1.0") from e
    return av


def _open(path: Path) -> Any:
    """Open a container and return (container, its first audio stream), with clear errors."""
    av = _av()
    try:
        container = av.open(str(path), mode="r")
    except FileNotFoundError as e:
        raise AudioFileError(f"audio file {str(path)!r} does not exist") from e
    except PermissionError as e:
        raise AudioFileError(f"audio file {str(path)!r} is not readable (permission denied)") from e
    except IsADirectoryError as e:
        raise AudioFileError(f"audio file {str(path)!r} is a directory, not a file") from e
    except av.FFmpegError as e:
        raise AudioFileError(f"audio file {str(path)!r} cannot be decoded: it is not a media file "
                             f"FFmpeg understands, or it is corrupt ({e})") from e
    if not container.streams.audio:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        container.close()
        raise AudioFileError(f"audio file {str(path)!r} has no audio stream (it has: {kinds}); "
                             "use a file with a sound track")
    return container, container.streams.audio[0]


def _frame_to_array(frame: Any) -> tuple[np.ndarray, int, int]:
    """A decoded av.AudioFrame → ([n, channels] array, rate, channels) in its native dtype."""
    arr = frame.to_ndarray()
    ch = frame.layout.nb_channels
    if frame.format.is_planar:
        arr = arr.T  # [channels, n] → [n, channels]
    else:
        arr = arr.reshape(-1, ch)  # packed: [1, n*channels] interleaved
    if arr.dtype == np.int64:  # s64 is rare; float64 holds it well enough for audio
        arr = (arr.astype(np.float64) / 2.0 ** 63)
    elif arr.dtype not in (np.uint8, np.int16, np.int32, np.float32, np.float64):
        arr = arr.astype(np.float64)
    return arr, int(frame.sample_rate), ch


class FileSource:
    """Decodes an audio (or video) file's first audio track to 16 kHz mono frames.

    Attributes:
        path: the file.
        rate / channels: the track's native format (from the probe at construction).
        duration: the container's duration estimate in seconds (None if unknown).
    """

    def __init__(self, path: str | Path, realtime: bool = False, clock: Clock | None = None
                 ) -> None:
        """
        Args:
            path: any file FFmpeg decodes (wav, mp3, ogg, flac, m4a, mp4/mkv/webm sound tracks...).
            realtime: pace frames at the audio's own speed (each frame is yielded when it would
                have finished playing, like a microphone); False: as fast as possible.
            clock: time source for pacing (default: SystemClock).

        Raises:
            AudioFileError: missing, unreadable, corrupt, or no audio stream (checked now, so a
                bad configuration fails at startup).
        """
        self.path = Path(path)
        self.realtime = realtime
        self.clock: Clock = clock or SystemClock()
        self.nonfinite = 0
        self._closed = False
        self._container: Any = None
        self.rate: int = 0
        self.channels: int = 0
        self.duration: float | None = None
        self._empty = self.path.is_file() and self.path.stat().st_size == 0
        if self._empty:
            log.warning("audio file %s is empty (0 bytes): no audio", self.path)
            return
        container, stream = _open(self.path)
        try:
            self.rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            self.channels = int(stream.codec_context.channels or 0)
            if stream.duration is not None and stream.time_base is not None:
                self.duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                self.duration = container.duration / 1_000_000
        finally:
            container.close()

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Yield the whole file as contiguous 20 ms frames (last one zero-padded), then end."""
        if self._empty or self._closed:
            return
        # realtime: frame k is due when it would have finished playing.
        decoded = self._decode()
        source = paced(decoded, self.clock) if self.realtime else decoded
        async with contextlib.aclosing(source) as frames:
            async for f in frames:
                yield f

    async def _decode(self) -> AsyncGenerator[AudioFrame, None]:
        """Every frame of the file as fast as decoding goes."""
        av = _av()
        container, stream = _open(self.path)
        self._container = container
        framer = Framer()
        resampler: StreamResampler | None = None
        since_yield = 0
        try:
            try:
                for frame in container.decode(stream):
                    arr, rate, ch = _frame_to_array(frame)
                    out: list[AudioFrame] = []
                    if resampler is None or rate != resampler.rate or ch != resampler.channels:
                        # Format change mid-stream (rare: chained streams): restart the resampler.
                        if resampler is not None:
                            self.nonfinite += resampler.nonfinite
                            out += framer.push(resampler.flush())
                        resampler = StreamResampler(rate, ch, name=f"file {self.path.name}")
                    out += framer.push(resampler.process(arr))
                    for f in out:
                        yield f
                    since_yield += len(out)
                    if not self.realtime and since_yield >= 50:
                        since_yield = 0
                        await asyncio.sleep(0)  # decoding must not starve the loop
                    if self._closed:
                        return
            except av.FFmpegError as e:
                raise AudioFileError(f"audio file {str(self.path)!r} is corrupt: decoding failed "
                                     f"after {framer.next_index / SAMPLE_RATE:.2f} s ({e})") from e
            if resampler is not None:
                self.nonfinite += resampler.nonfinite
                for f in framer.push(resampler.flush()) + framer.flush(pad=True):
                    yield f
        finally:
            container.close()
            self._container = None

    async def close(self) -> None:
        """Stop decoding; a running ``frames()`` ends at its next frame."""
        self._closed = True
