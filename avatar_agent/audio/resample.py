"""Any PCM → the pipeline's 16 kHz mono float32, and fixed 20 ms framing.

Every source funnels its raw blocks through :class:`StreamResampler` (dtype → float, downmix,
NaN/inf scrub, soxr, clip) and then :class:`Framer` (exact 320-sample frames stamped from a running
sample counter).  ``to_pipeline`` does the same for a whole buffer at once.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from avatar_agent.types import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, Phoneme

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = ("uint8", "int16", "int32", "float32", "float64")

PCM_FORMATS: dict[str, str] = {"s16le": "<i2", "s32le": "<i4", "f32le": "<f4", "u8": "u1"}
"""Raw PCM byte formats of the wire APIs (HTTP upload, WebSocket stream, Python client): name →
little-endian numpy dtype, interleaved channels.  The API's format enum, sample widths and error
messages are derived from this table."""
PCM_WIDTH: dict[str, int] = {name: np.dtype(dt).itemsize for name, dt in PCM_FORMATS.items()}
"""Bytes per sample of each :data:`PCM_FORMATS` format."""
PCM_RATES = (1000, 384000)
"""Sample rates (Hz, inclusive) raw PCM and WAV uploads may declare."""
PCM_CHANNELS = (1, 16)
"""Channel counts (inclusive) raw PCM and WAV uploads may declare."""


class AudioFormatError(ValueError):
    """Raw audio that cannot be interpreted (bad dtype, shape, rate or channel count)."""


def to_float(x: np.ndarray) -> np.ndarray:
    """Integer or float PCM → float32 at full scale ±1 (no clipping, no scrubbing).

    uint8 is offset binary (128 = silence), as in 8-bit WAV; int16/int32 are two's complement.
    """
    x = np.asarray(x)
    dt = x.dtype
    if dt == np.float32:
        return x
    if dt == np.float64:
        return x.astype(np.float32)
    if dt == np.int16:
        return x.astype(np.float32) * np.float32(1.0 / 32768.0)
    if dt == np.int32:
        # float64 intermediate: float32 cannot hold 31 bits, the product would round oddly.
        return (x.astype(np.float64) * (1.0 / 2147483648.0)).astype(np.float32)
    if dt == np.uint8:
        return (x.astype(np.float32) - 128.0) * np.float32(1.0 / 128.0)
    raise AudioFormatError(
        f"audio dtype {dt} is not supported; convert to one of {', '.join(SUPPORTED_DTYPES)}")


def downmix(x: np.ndarray, channels: int) -> np.ndarray:
    """[n] or [n, channels] (interleaved frames) float32 → [n] mono by averaging channels."""
    if channels < 1:
        raise AudioFormatError(f"channel count {channels} must be ≥ 1")
    if x.ndim == 1:
        if channels == 1:
            return x
        if x.size % channels:
            raise AudioFormatError(
                f"interleaved block of {x.size} samples is not a whole number of "
                f"{channels}-channel "
                "frames")
        x = x.reshape(-1, channels)
    if x.ndim != 2 or x.shape[1] != channels:
        raise AudioFormatError(f"audio block shape {x.shape} does not match {channels} channel(s); "
                               "expected [samples] or [samples, channels]")
    if channels == 1:
        return x[:, 0]
    return x.mean(axis=1, dtype=np.float32)


class _Scrubber:
    """Replaces NaN/inf with 0 and counts them; logs the first occurrence only."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nonfinite = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(x)
        n = int(bad.sum())
        if n:
            if self.nonfinite == 0:
                log.warning("%s: %d NaN/inf samples replaced by 0 (further ones are only counted)",
                            self.name, n)
            self.nonfinite += n
            x = np.where(bad, np.float32(0.0), x)
        return x


class StreamResampler:
    """Streaming converter: raw blocks at ``rate``/``channels``/any dtype → 16 kHz mono float32.

    Order matters: NaN/inf are scrubbed *before* soxr (one NaN would smear over the filter length),
    and clipping to [-1, 1] happens *after* it (resampling can overshoot full-scale input).

    Attributes:
        nonfinite: NaN/inf input samples replaced by 0 so far.
        clipped: output samples clipped to ±1 so far.
    """

    def __init__(self, rate: float, channels: int = 1, *, quality: str = "HQ",
                 name: str = "audio") -> None:
        if not rate or rate <= 0 or not np.isfinite(rate):
            raise AudioFormatError(f"{name}: sample rate {rate!r} must be a positive number of Hz")
        if channels < 1:
            raise AudioFormatError(f"{name}: channel count {channels} must be ≥ 1")
        self.rate = float(rate)
        self.channels = int(channels)
        self.clipped = 0
        self._scrub = _Scrubber(name)
        self._stream = None
        if self.rate != SAMPLE_RATE:
            import soxr  # core dependency; imported here so the module loads without it for tests

            self._stream = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32",
                                               quality=quality)

    @property
    def nonfinite(self) -> int:
        """NaN/inf samples replaced by 0 so far."""
        return self._scrub.nonfinite

    def process(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        """Convert one block; returns float32 [m] (m varies: the resampler buffers a few samples).

        Args:
            block: [n] (interleaved when channels > 1) or [n, channels], any supported dtype.
            last: True on the final block, to flush soxr's internal delay line.
        """
        x = downmix(to_float(block), self.channels)
        x = self._scrub(np.ascontiguousarray(x, dtype=np.float32))
        if self._stream is not None:
            x = self._stream.resample_chunk(x, last=last)
        return self._clip(x)

    def flush(self) -> np.ndarray:
        """Remaining samples held by the resampler (call once, at end of stream)."""
        if self._stream is None:
            return np.zeros(0, np.float32)
        return self._clip(self._stream.resample_chunk(np.zeros(0, np.float32), last=True))

    def _clip(self, x: np.ndarray) -> np.ndarray:
        over = np.abs(x) > 1.0
        n = int(over.sum())
        if n:
            self.clipped += n
            x = np.clip(x, -1.0, 1.0)
        return x.astype(np.float32, copy=False)


def to_pipeline(x: np.ndarray, rate: float, channels: int = 1) -> np.ndarray:
    """A whole buffer → 16 kHz mono float32 in [-1, 1] (NaN/inf → 0).

    Args:
        x: [n] (interleaved if channels > 1) or [n, channels]; uint8/int16/int32/float32/float64.
        rate: its sample rate in Hz.
        channels: its channel count.
    """
    rs = StreamResampler(rate, channels, name="to_pipeline")
    out = rs.process(x, last=True)
    return out


class Framer:
    """Cuts a stream of arbitrary-length blocks into exact 20 ms AudioFrames: the one framing.

    Frames are stamped from a running sample counter: frame k has ``index = start + 320 k``, so the
    timeline is contiguous by construction and independent of how the input was blocked.  Phonemes
    handed to :meth:`push` (times in seconds on this timeline) are attached to every frame they
    overlap, whichever later push or :meth:`flush` emits it.
    """

    def __init__(self, start: int = 0) -> None:
        self._next = int(start)
        self._buf = np.zeros(0, np.float32)
        self._phon: list[Phoneme] = []   # sorted by start; those before _first ended already
        self._first = 0

    @property
    def next_index(self) -> int:
        """Sample index the next emitted frame will carry."""
        return self._next

    @property
    def pending(self) -> int:
        """Samples buffered that do not yet fill a frame."""
        return int(self._buf.size)

    def push(self, samples: np.ndarray, phonemes: Iterable[Phoneme] = ()) -> list[AudioFrame]:
        """Append samples (16 kHz mono float32); return every frame now complete.

        ``phonemes`` (times in seconds on this timeline) are attached to each frame they overlap,
        including frames that later pushes complete.
        """
        new = list(phonemes)
        if new:
            # Timsort merges the two sorted runs in linear time.
            self._phon = sorted(self._phon[self._first:] + new, key=lambda p: p.start)
            self._first = 0
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        buf = np.concatenate([self._buf, samples]) if self._buf.size else samples
        n = buf.size // FRAME_SAMPLES
        frames = []
        for k in range(n):
            idx = self._next + k * FRAME_SAMPLES
            seg = buf[k * FRAME_SAMPLES:(k + 1) * FRAME_SAMPLES].copy()
            frames.append(AudioFrame(seg, idx, self._overlapping(idx)))
        self._next += n * FRAME_SAMPLES
        self._buf = buf[n * FRAME_SAMPLES:].copy()
        return frames

    def flush(self, pad: bool = True) -> list[AudioFrame]:
        """End of stream: the partial last frame zero-padded to 320 samples (or dropped)."""
        if not self._buf.size:
            return []
        if not pad:
            self._buf = np.zeros(0, np.float32)
            return []
        tail = np.zeros(FRAME_SAMPLES, np.float32)
        tail[: self._buf.size] = self._buf
        self._buf = np.zeros(0, np.float32)
        frame = AudioFrame(tail, self._next, self._overlapping(self._next))
        self._next += FRAME_SAMPLES
        return [frame]

    def silence(self, n_frames: int) -> list[AudioFrame]:
        """``n_frames`` frames of zeros continuing the timeline (any partial buffer is dropped:
        used when a device is lost and the timeline must go on without audio)."""
        self._buf = np.zeros(0, np.float32)
        frames = [AudioFrame(np.zeros(FRAME_SAMPLES, np.float32), self._next + k * FRAME_SAMPLES)
                  for k in range(max(0, n_frames))]
        self._next += len(frames) * FRAME_SAMPLES
        return frames

    def _overlapping(self, index: int) -> tuple[Phoneme, ...]:
        """The phonemes overlapping the frame at ``index`` (amortised O(1) per frame: time only
        moves forward, so phonemes that ended before this frame are skipped for good)."""
        ph = self._phon
        if not ph:
            return ()
        t0 = index / SAMPLE_RATE
        t1 = (index + FRAME_SAMPLES) / SAMPLE_RATE
        while self._first < len(ph) and ph[self._first].end <= t0:
            self._first += 1
        out = []
        j = self._first
        while j < len(ph) and ph[j].start < t1:   # sorted by start: none after j can overlap
            if ph[j].end > t0:
                out.append(ph[j])
            j += 1
        if self._first == len(ph):
            self._phon, self._first = [], 0
        return tuple(out)


def frame_audio(samples: np.ndarray, phonemes: Iterable[Phoneme] = (), start: int = 0
                ) -> list[AudioFrame]:
    """A whole 16 kHz buffer → its 20 ms frames from sample ``start`` (the last one zero-padded),
    each with the phonemes (seconds on the same timeline) it overlaps."""
    framer = Framer(start)
    return framer.push(samples, phonemes) + framer.flush(pad=True)


class Upsampler3:
    """Streaming ×3 upsampler (16 kHz → 48 kHz) with exact sample accounting.

    Every call returns exactly ``3 * len(x)`` samples; the fixed group delay is
    ``(taps - 1) / 2`` output samples (35.5 at 72 taps ≈ 0.74 ms at 48 kHz).  A windowed-sinc
    low-pass at 7.6 kHz removes the images that zero-stuffing creates.
    """

    FACTOR = 3

    def __init__(self, taps: int = 72) -> None:
        if taps % self.FACTOR:
            raise ValueError(f"Upsampler3 taps must be a multiple of 3, got {taps}")
        n = np.arange(taps) - (taps - 1) / 2
        cutoff = 7600.0 / 48000.0  # cycles per output sample
        h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, 8.0)
        h *= self.FACTOR / h.sum()  # unit DC gain after zero-stuffing
        self._phases = [h[p :: self.FACTOR].astype(np.float64) for p in range(self.FACTOR)]
        self._hist = np.zeros(taps // self.FACTOR - 1, np.float64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 [N] at 16 kHz → float32 [3N] at 48 kHz."""
        x = np.asarray(x, np.float64).reshape(-1)
        if x.size == 0:
            return np.zeros(0, np.float32)
        xx = np.concatenate([self._hist, x])  # [K-1+N] history + new input
        self._hist = xx[xx.size - self._hist.size :]
        out = np.empty((x.size, self.FACTOR), np.float64)  # [N, 3] one column per phase
        for p, hp in enumerate(self._phases):
            out[:, p] = np.convolve(xx, hp, mode="valid")
        return out.reshape(-1).astype(np.float32)
