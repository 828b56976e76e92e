"""A speech queue: text (spoken by espeak-ng) and pushed PCM on one continuous 16 kHz timeline.

This is the audio source a chatbot drives.  Utterances play one after another in the order they
were accepted; between them the source yields silence frames, so the player's timeline never stops
and the avatar idles naturally.  Frame k is delivered at ``t0 + (k + 1) · 20 ms`` on the injected
clock (when its last sample would have been "captured"), exactly like a microphone.

* ``say(text)`` → an utterance id at once; synthesis runs on a worker thread.  While it runs the
  timeline goes on with silence (on a :class:`~avatar_agent.clock.FakeClock` virtual time is held,
  so tests are deterministic).
* ``push(pcm, rate, channels)`` → any rate/format is resampled to 16 kHz mono.  ``final=False``
  opens a *stream*: later pushes extend the same utterance until one with ``final=True``.  A stream
  starts playing once ``prebuffer_ms`` of it is buffered (absorbs network jitter); if it then runs
  dry, silence fills the gap (counted in ``underruns``).
* ``interrupt()`` drops everything not yet emitted: the next frame is already silence.
* Listeners get ``speech_started`` / ``speech_finished`` events with timeline sample positions;
  every accepted utterance gets exactly one ``speech_finished`` (interrupted, failed or played).
* The queue is bounded by ``max_queued_s`` seconds of not-yet-played audio; beyond it ``say`` and
  ``push`` raise :class:`QueueFullError` and accept nothing, so nothing accepted is dropped silently.

Utterances always start on a frame boundary (the last frame of one is zero-padded).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import numpy as np

from ..clock import Clock, SystemClock
from ..types import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, Phoneme
from .frames import capture_time
from .resample import PCM_FORMATS, AudioFormatError, Framer, StreamResampler, to_float

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]
"""``listener(kind, data)``: kind is "speech_started" or "speech_finished"."""

MAX_TEXT_CHARS = 10_000
"""Longest text one ``say`` accepts (≈10 minutes of speech)."""

_PCM_DTYPES = {name: dt for fmt, dt in {**PCM_FORMATS, "f64le": "<f8"}.items()
               for name in (fmt, np.dtype(dt).name)}
"""Byte formats ``push`` accepts for raw bytes (little-endian, interleaved): the wire formats of
:data:`~avatar_agent.audio.resample.PCM_FORMATS`, f64le (in-process callers only), and each
one's numpy name (int16, float32, ...)."""


class QueueFullError(RuntimeError):
    """The speech queue holds ``max_queued_s`` already: nothing was accepted; retry later or
    interrupt."""


class TooLongError(ValueError):
    """One say/push longer than the whole queue (``max_queued_s``): it can never fit, so waiting
    would not help; split it or raise the limit."""


class StreamError(ValueError):
    """A push that does not fit the open stream (different rate/channels) or bad PCM."""


def pcm_to_array(pcm: np.ndarray | bytes | bytearray | memoryview, dtype: str | None = None
                 ) -> np.ndarray:
    """Raw little-endian bytes or an array → a numpy array of the PCM's own dtype.

    Args:
        pcm: bytes (interpreted with ``dtype``, default s16le) or an array (``dtype`` ignored).
        dtype: byte format: s16le/int16, s32le/int32, f32le/float32, f64le/float64, u8/uint8.
    """
    if isinstance(pcm, np.ndarray):
        return pcm
    if not isinstance(pcm, (bytes, bytearray, memoryview)):
        raise StreamError(f"pcm must be bytes or a numpy array, got {type(pcm).__name__}")
    name = (dtype or "s16le").lower()
    if name not in _PCM_DTYPES:
        raise StreamError(f"PCM format {dtype!r} is not supported; use one of "
                          f"{', '.join(sorted(_PCM_DTYPES))}")
    dt = np.dtype(_PCM_DTYPES[name])
    if len(pcm) % dt.itemsize:
        raise StreamError(f"{len(pcm)} bytes is not a whole number of {name} samples "
                          f"({dt.itemsize} bytes each)")
    return np.frombuffer(bytes(pcm), dtype=dt).astype(dt.newbyteorder("="))


@dataclass(eq=False)
class _Utterance:
    """One queued utterance (mutated only under the source's lock).

    Its audio is framed as it arrives by its own :class:`Framer`, on the utterance's timeline
    (sample 0 = its first sample); :meth:`SpeechQueueSource._next_frame` moves each frame onto
    the source's timeline when it plays.
    """

    id: int
    kind: str                                   # "tts" or "push"
    final: bool = False                         # all of its audio has arrived
    estimate: int = 0                           # samples expected while synthesis is pending
    framer: Framer = field(default_factory=Framer)
    frames: collections.deque[AudioFrame] = field(default_factory=collections.deque)
    start: int | None = None                    # timeline sample of its first sample, once playing
    error: str | None = None
    cancelled: bool = False
    resampler: StreamResampler | None = None
    stream_format: tuple[float, int] | None = None

    @property
    def available(self) -> int:
        """Samples buffered, not yet emitted."""
        return len(self.frames) * FRAME_SAMPLES + self.framer.pending

    def append(self, x: np.ndarray, phonemes: tuple[Phoneme, ...] = ()) -> None:
        """More audio (and its phonemes, seconds from the utterance's start)."""
        self.frames.extend(self.framer.push(x, phonemes))

    def take(self) -> tuple[AudioFrame, int]:
        """The next frame (the last one zero-padded once final) and how many real samples it
        holds."""
        if self.frames:
            return self.frames.popleft(), FRAME_SAMPLES
        n = self.framer.pending
        return self.framer.flush(pad=True)[0], n


class SpeechQueueSource:
    """An AudioSource fed by ``say`` (TTS) and ``push`` (PCM), paced by a clock.

    Args:
        clock: paces the frames (default: the system clock).
        voice: default espeak-ng voice for ``say``.
        rate_wpm: espeak-ng speaking rate.
        max_queued_s: most seconds of not-yet-played audio the queue holds.
        prebuffer_ms: a pushed stream starts once this much is buffered (or it is final).
        synthesize: the TTS function ``(text, voice, rate_wpm) -> Utterance``; default
            :func:`avatar_agent.audio.tts.synthesize`.
    """

    def __init__(self, clock: Clock | None = None, *, voice: str = "en-us", rate_wpm: int = 175,
                 max_queued_s: float = 120.0, prebuffer_ms: int = 100,
                 synthesize: Callable[..., Any] | None = None) -> None:
        if max_queued_s <= 0:
            raise ValueError(f"max_queued_s={max_queued_s} must be > 0")
        if prebuffer_ms < 0:
            raise ValueError(f"prebuffer_ms={prebuffer_ms} must be ≥ 0")
        self.clock: Clock = clock or SystemClock()
        self.voice = voice
        self.rate_wpm = rate_wpm
        self.max_queued = int(max_queued_s * SAMPLE_RATE)
        self.prebuffer = int(prebuffer_ms * SAMPLE_RATE / 1000)
        self._synthesize = synthesize
        self._lock = threading.RLock()
        self._queue: collections.deque[_Utterance] = collections.deque()
        self._by_id: dict[int, _Utterance] = {}
        self._stream: _Utterance | None = None       # open push stream (not final yet)
        self._ids = itertools.count(1)
        self._listeners: list[Listener] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tts")
        self._tasks: set[asyncio.Task[None]] = set()
        self._index = 0                               # next timeline sample to emit
        self._lead = 0.0                              # seconds frames are emitted ahead of time
        self._rewind: Callable[[int, int], int] | None = None
        self._silent = True                           # the last frame emitted was silence
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()                  # set when speech is queued (see _poke)
        self._closed = False
        self.underruns = 0
        """Frames of silence inserted inside a pushed stream that ran dry."""
        self.frames_emitted = 0
        self.speech_frames = 0

    # -------------------------------------------------------------------------------------------
    # Public control API (any thread)
    # -------------------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(kind, data)`` on speech events; returns a function that unsubscribes.

        Events: ``speech_started`` {utterance, sample}; ``speech_finished`` {utterance, sample,
        interrupted, started, error?}.  ``sample`` is a position on this source's timeline
        (seconds = sample / 16000).  Listeners run on the thread that caused the event.
        """
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    @property
    def position(self) -> int:
        """Timeline sample index of the next sample to be emitted."""
        return self._index

    @property
    def current(self) -> int | None:
        """Id of the utterance playing now (None while silent)."""
        with self._lock:
            head = self._queue[0] if self._queue else None
            return head.id if head is not None and head.start is not None else None

    @property
    def queued_seconds(self) -> float:
        """Not-yet-played audio in the queue (pending syntheses counted by estimate)."""
        with self._lock:
            return self._queued_samples() / SAMPLE_RATE

    @property
    def pending(self) -> int:
        """Utterances accepted and not finished (playing one included)."""
        with self._lock:
            return len(self._queue)

    def say(self, text: str, voice: str | None = None) -> int:
        """Queue ``text`` to be spoken; returns its utterance id at once.

        Raises:
            ValueError: empty or over-long text.
            QueueFullError: the queue already holds ``max_queued_s`` of speech.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"text has {len(text)} characters; at most {MAX_TEXT_CHARS} per say "
                             "(split it into sentences)")
        if voice is not None and (not isinstance(voice, str) or not voice.strip()):
            raise ValueError("voice must be a non-empty espeak-ng voice name such as 'en-us'")
        voice = voice or self.voice
        # espeak speaks ≈ rate_wpm · 6 characters a minute; a rough bound is enough for admission.
        estimate = int((len(text) / (self.rate_wpm * 6 / 60) + 0.5) * SAMPLE_RATE)
        with self._lock:
            self._check_open()
            self._admit(estimate, f"this text ({len(text)} characters)")
            utt = _Utterance(next(self._ids), "tts", estimate=estimate)
            self._enqueue(utt)
        self._start_synthesis(utt, text, voice)
        return utt.id

    def push(self, pcm: np.ndarray | bytes, rate: float = SAMPLE_RATE, channels: int = 1,
             dtype: str | None = None, *, final: bool = True) -> int:
        """Queue PCM audio; returns its utterance id.

        Args:
            pcm: an array ([n] interleaved or [n, channels]; int16/int32/uint8/float) or raw
                little-endian bytes in ``dtype`` (default s16le).
            rate: its sample rate in Hz.
            channels: its channel count.
            dtype: byte format when ``pcm`` is bytes (see :func:`pcm_to_array`).
            final: False opens (or extends) a stream that later pushes continue; True ends it.
                With no stream open, ``final=True`` queues a complete utterance.

        Raises:
            QueueFullError: this block would exceed ``max_queued_s`` (nothing of it is kept).
            StreamError / AudioFormatError: bad PCM, or a rate/channels change inside a stream.
        """
        x = pcm_to_array(pcm, dtype)
        try:
            to_float(x[:0])
        except AudioFormatError as e:
            raise StreamError(str(e)) from None
        rate, channels = float(rate), int(channels)
        with self._lock:
            self._check_open()
            utt = self._stream
            if (utt is not None and utt.stream_format is not None  # a pushed stream always has one
                    and utt.stream_format != (rate, channels)):
                raise StreamError(f"the open stream is {utt.stream_format[0]:g} Hz, "
                                  f"{utt.stream_format[1]} channel(s); got {rate:g} Hz, {channels}: "
                                  "finish the stream (final=True) before changing format")
            new = utt is None
            if new:
                utt = _Utterance(next(self._ids), "push")
                utt.stream_format = (rate, channels)
                utt.resampler = StreamResampler(rate, channels, name="push")
            assert utt is not None and utt.resampler is not None
            n_est = int(x.size / channels * SAMPLE_RATE / rate) if x.size else 0
            self._admit(n_est, "this audio")
            try:
                y = utt.resampler.process(x, last=final)
            except AudioFormatError as e:
                raise StreamError(str(e)) from None
            utt.append(np.ascontiguousarray(y, np.float32))
            if final:
                utt.final = True
                utt.resampler = None
                self._stream = None
            else:
                self._stream = utt
            if new:
                self._enqueue(utt)
        self._poke()
        return utt.id

    def end_stream(self) -> int | None:
        """Mark the open push stream complete (e.g. its WebSocket closed); returns its id."""
        with self._lock:
            utt = self._stream
            if utt is None:
                return None
            if utt.resampler is not None:
                utt.append(utt.resampler.flush())
            utt.final, utt.resampler, self._stream = True, None, None
            return utt.id

    def interrupt(self) -> tuple[int | None, int]:
        """Drop everything not yet emitted; the next frame is silence.

        Returns:
            (id of the utterance that was playing or None, timeline sample where it was cut).
        """
        with self._lock:
            pos = self._index
            head = self._queue[0] if self._queue else None
            playing = head.id if head is not None and head.start is not None else None
            events = []
            for utt in self._queue:
                utt.cancelled = True
                events.append(("speech_finished",
                               {"utterance": utt.id, "sample": pos, "interrupted": True,
                                "started": utt.start is not None}))
            self._queue.clear()
            self._by_id.clear()
            self._stream = None
        self._emit(events)
        return playing, pos

    async def close(self) -> None:
        """Stop: ``frames()`` ends after the frame in progress; pending syntheses are dropped."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        """Counters for the status API."""
        with self._lock:
            return {"position": self._index, "current": self.current, "pending": len(self._queue),
                    "queued_s": round(self._queued_samples() / SAMPLE_RATE, 3),
                    "underruns": self.underruns, "frames": self.frames_emitted,
                    "speech_frames": self.speech_frames}

    # -------------------------------------------------------------------------------------------
    # The timeline
    # -------------------------------------------------------------------------------------------

    def schedule(self, lead_s: float, rewind: Callable[[int, int], int] | None = None) -> None:
        """Emit frames ``lead_s`` ahead of real time (queued audio needs no capture wait).

        ``rewind(sample, buffered) -> sample``: called when an utterance is about to start after
        silence at ``sample``, which lies up to ``lead_s`` in the future; ``buffered`` is how
        much of it is there (−1: all of it; a live stream has only its pre-buffer).  It returns
        the earliest sample the consumer can still show (after dropping what it made of the
        silence beyond it), and the utterance starts there instead — so new speech is seen and
        heard at once, not ``lead_s`` later.  A live stream that runs dry while ahead of real
        time is waited for; a gap is inserted only once its real time has come.
        """
        if lead_s < 0:
            raise ValueError(f"lead_s={lead_s} must be ≥ 0")
        self._lead, self._rewind = float(lead_s), rewind

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Yield 20 ms frames forever (until :meth:`close`): queued speech, else silence.

        Frame ``k`` (samples from ``i = k·320``) is due at ``t0 + (i + 320) / 16000 − lead``.
        """
        t0 = self.clock.now()
        self._loop = asyncio.get_running_loop()
        while not self._closed:
            real = capture_time(t0, self._index)
            if self._silent and self._rewind is not None:
                await self._sleep_or_wake(real - self._lead)   # new speech need not wait 20 ms
            else:
                await self.clock.sleep_until(real - self._lead)
            if self._closed:
                return
            if self._starved() and self.clock.now() < real:
                # A live stream ran dry while we are ahead of time: wait for more of it (a gap
                # is inserted only once its real time has come, as for a microphone).
                await self.clock.sleep_until(min(real, self.clock.now() + 0.01))
                continue
            with self._lock:
                frame, events = self._next_frame()
            self._emit(events)
            yield frame

    async def _sleep_or_wake(self, t: float) -> None:
        """Sleep until ``t`` on the clock, or until speech is queued (:meth:`_poke`)."""
        self._wake.clear()
        if self._queue:
            return await self.clock.sleep_until(t)
        sleep = asyncio.ensure_future(self.clock.sleep_until(t))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleep, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleep, woken):
                task.cancel()

    def _poke(self) -> None:
        """Speech was queued: wake :meth:`frames` (from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    def _starved(self) -> bool:
        """True while the utterance playing is an open stream with less than a frame buffered."""
        with self._lock:
            head = self._queue[0] if self._queue else None
            return (head is not None and head.start is not None and not head.final
                    and head.available < FRAME_SAMPLES)

    def _next_frame(self) -> tuple[AudioFrame, list[tuple[str, dict[str, Any]]]]:
        """The frame at ``self._index`` and the events it causes (lock held)."""
        index = self._index
        events: list[tuple[str, dict[str, Any]]] = []
        frame: AudioFrame | None = None
        while self._queue and frame is None:
            head = self._queue[0]
            if head.start is None:
                if head.error is not None or (head.final and head.available == 0):
                    self._pop(head)
                    data: dict[str, Any] = {"utterance": head.id, "sample": index,
                                            "interrupted": False, "started": False}
                    if head.error is not None:
                        data["error"] = head.error
                    events.append(("speech_finished", data))
                    continue
                if not head.final and (head.kind == "tts" or head.available < self.prebuffer
                                       or head.available == 0):
                    break                                  # not ready yet: silence
                if self._silent and self._rewind is not None:   # start as early as still visible
                    buffered = head.available if not head.final else -1   # -1: all of it
                    index = self._index = min(index, self._rewind(index, buffered))
                head.start = index
                events.append(("speech_started", {"utterance": head.id, "sample": index}))
            if head.available >= FRAME_SAMPLES or (head.final and head.available > 0):
                own, n = head.take()
                off = head.start / SAMPLE_RATE              # onto the source's timeline
                frame = AudioFrame(own.samples, index,
                                   tuple(Phoneme(p.symbol, p.start + off, p.end + off)
                                         for p in own.phonemes))
                self.speech_frames += 1
                if head.final and head.available == 0:
                    self._pop(head)
                    # The timeline position (not start + length: underrun gaps count too).
                    events.append(("speech_finished",
                                   {"utterance": head.id, "sample": index + n,
                                    "interrupted": False, "started": True}))
            elif head.final:                               # started, nothing left (empty tail)
                self._pop(head)
                events.append(("speech_finished",
                               {"utterance": head.id, "sample": index,
                                "interrupted": False, "started": True}))
            else:
                self.underruns += 1                        # a live stream ran dry: fill the gap
                break
        self._silent = frame is None
        if frame is None:
            frame = AudioFrame(np.zeros(FRAME_SAMPLES, np.float32), index)
        self._index = index + FRAME_SAMPLES
        self.frames_emitted += 1
        return frame, events

    # -------------------------------------------------------------------------------------------
    # Helpers
    # -------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the speech queue is closed")

    def _queued_samples(self) -> int:
        return sum(u.available if (u.final or u.kind == "push") else max(u.estimate, u.available)
                   for u in self._queue)

    def _admit(self, n: int, what: str = "this speech") -> None:
        if n > self.max_queued:
            raise TooLongError(
                f"{what} is about {n / SAMPLE_RATE:.0f} s long, more than the speech queue ever "
                f"holds ({self.max_queued / SAMPLE_RATE:g} s, audio.max_queued_s): split it into "
                "shorter parts or raise audio.max_queued_s")
        queued = self._queued_samples()
        if queued + n > self.max_queued:
            raise QueueFullError(
                f"speech queue full: {queued / SAMPLE_RATE:.1f} s queued, this adds "
                f"{n / SAMPLE_RATE:.1f} s, limit {self.max_queued / SAMPLE_RATE:g} s; wait for "
                "speech_finished events or interrupt")

    def _enqueue(self, utt: _Utterance) -> None:
        self._queue.append(utt)
        self._by_id[utt.id] = utt

    def _pop(self, utt: _Utterance) -> None:
        if self._queue and self._queue[0] is utt:
            self._queue.popleft()
        self._by_id.pop(utt.id, None)

    def _emit(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        if not events:
            return
        with self._lock:
            listeners = list(self._listeners)
        for kind, data in events:
            for cb in listeners:
                try:
                    cb(kind, data)
                except Exception:  # a broken listener must not break the timeline
                    log.exception("speech event listener failed")

    def _start_synthesis(self, utt: _Utterance, text: str, voice: str) -> None:
        synth = self._synthesize
        if synth is None:
            from .tts import synthesize

            synth = synthesize
        rate = self.rate_wpm

        def work() -> Any:
            return synth(text, voice, rate)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:                               # called from a plain thread
            fut = self._pool.submit(work)
            fut.add_done_callback(lambda f: self._synthesized(utt, f))
            return

        async def run() -> None:
            # Hold virtual time while espeak runs (a no-op on the real clock), so that on a
            # FakeClock speech starts right after the say() instead of after thousands of
            # silence frames raced through while the thread worked.
            with self.clock.hold():
                cf = self._pool.submit(work)
                try:
                    await asyncio.wrap_future(cf)
                except asyncio.CancelledError:
                    cf.cancel()
                    with self._lock:
                        utt.error, utt.final = "synthesis cancelled", True
                    raise
                except Exception:
                    pass                               # reported by _synthesized below
            self._synthesized(utt, cf)

        task = loop.create_task(run(), name=f"tts-{utt.id}")
        self._tasks.add(task)                           # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    def _synthesized(self, utt: _Utterance, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            if utt.cancelled:
                return
            if fut.cancelled():
                utt.error = "synthesis cancelled"
            elif fut.exception() is not None:
                e = fut.exception()
                utt.error = f"{type(e).__name__}: {e}"
                log.error("TTS for utterance %d failed: %s", utt.id, utt.error)
            else:
                u = fut.result()
                utt.append(np.ascontiguousarray(u.audio, np.float32), tuple(u.phonemes))
            utt.final = True
        self._poke()


__all__ = ["SpeechQueueSource", "QueueFullError", "TooLongError", "StreamError", "pcm_to_array", "MAX_TEXT_CHARS"]
