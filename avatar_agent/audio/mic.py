"""Microphone source: sounddevice (PortAudio) capture → 20 ms frames on the asyncio loop.

PortAudio calls our callback on its own thread; the callback only copies the block and hands it to
the loop with ``loop.call_soon_threadsafe``.  The loop side resamples (soxr) and frames it.

The timeline never stops: while the device is missing, starting or lost (unplugged, sound server
died) the source yields silence frames paced by the clock and retries opening the device with
capped exponential backoff; when audio flows again it continues the same sample counter.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, cast

import numpy as np

from avatar_agent.audio.resample import Framer, StreamResampler
from avatar_agent.queues import DropOldest
from avatar_agent.clock import Clock, SystemClock
from avatar_agent.types import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, AudioFrame

log = logging.getLogger(__name__)


class DeviceNotFoundError(ValueError):
    """The configured input device does not exist; the message lists the ones that do."""


@dataclass(frozen=True, slots=True)
class InputDevice:
    """One PortAudio capture device.

    Attributes:
        index: PortAudio device index (valid until PortAudio re-enumerates).
        name: device name as PortAudio reports it.
        hostapi: host API name (ALSA, JACK, ...).
        channels: maximum input channels.
        default_rate: the device's native sample rate in Hz.
        is_default: True for the system default input.
    """

    index: int
    name: str
    hostapi: str
    channels: int
    default_rate: float
    is_default: bool


def _sd() -> Any:
    try:
        import sounddevice
    except OSError as e:  # the wheel does not bundle PortAudio on Linux
        raise ImportError("sounddevice cannot load PortAudio: apt-get install libportaudio2") from e
    except ImportError as e:  # pragma: no cover - core dependency
        raise ImportError("sounddevice is missing: pip install sounddevice==0.5.6") from e
    return sounddevice


def list_devices() -> list[InputDevice]:
    """Every capture device PortAudio knows (for the CLI ``devices`` command)."""
    sd = _sd()
    try:
        default_in = sd.default.device[0]
        if default_in is None or default_in < 0:
            default_in = sd.query_hostapis()[0].get("default_input_device", -1)
    except Exception:  # noqa: BLE001 - no host API at all: no default
        default_in = -1
    apis = sd.query_hostapis()
    out = []
    for d in sd.query_devices():
        if d["max_input_channels"] <= 0:
            continue
        out.append(InputDevice(index=int(d["index"]), name=str(d["name"]),
                               hostapi=str(apis[d["hostapi"]]["name"]),
                               channels=int(d["max_input_channels"]),
                               default_rate=float(d["default_samplerate"]),
                               is_default=int(d["index"]) == default_in))
    return out


def format_devices(devices: list[InputDevice]) -> str:
    """Human-readable device table, one per line ("*" marks the default)."""
    if not devices:
        return ("  (no input devices: no sound server or card is visible to PortAudio; on Linux "
                "start PulseAudio/PipeWire or check ALSA)")
    return "\n".join(f"  {'*' if d.is_default else ' '} [{d.index}] {d.name} ({d.hostapi}, "
                     f"{d.channels} ch, {d.default_rate:g} Hz)" for d in devices)


def resolve_device(device: str | int | None) -> InputDevice:
    """Find an input device by index, by name substring (case-insensitive), or the default.

    An exact name match wins over substring matches; several substring matches are an error.

    Raises:
        DeviceNotFoundError: no (unique) match; the message lists the available inputs.
    """
    devices = list_devices()
    if isinstance(device, str):
        device = device.strip()
        if device == "":
            device = None
        elif device.isdigit():
            device = int(device)
    if device is None:
        for d in devices:
            if d.is_default:
                return d
        if devices:
            return devices[0]
        raise DeviceNotFoundError("no default input device.\nAvailable input devices:\n"
                                  + format_devices(devices))
    if isinstance(device, int):
        for d in devices:
            if d.index == device:
                return d
        raise DeviceNotFoundError(f"input device index {device} does not exist (or has no input "
                                  "channels).\nAvailable input devices:\n"
                                  + format_devices(devices)
                                  + "\nSet audio.device to one of the indices or names above.")
    exact = [d for d in devices if d.name.lower() == device.lower()]
    if exact:
        return exact[0]
    matches = [d for d in devices if device.lower() in d.name.lower()]
    if len(matches) == 1:
        return matches[0]
    what = "matches several input devices" if matches else "matches no input device"
    raise DeviceNotFoundError(f"audio device {device!r} {what}.\nAvailable input devices:\n"
                              + format_devices(matches or devices)
                              + "\nSet audio.device to a unique part of a name, or an index.")


class _Backoff:
    """Capped exponential reconnect delay: doubles from ``initial`` up to ``cap``."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial, self.cap, self.delay = initial, cap, initial

    def after(self, now: float) -> float:
        """When to retry after a failure at ``now``; the next failure waits twice as long."""
        t = now + self.delay
        self.delay = min(self.delay * 2, self.cap)
        return t

    def reset(self) -> None:
        """Audio flows again: the next failure starts from ``initial``."""
        self.delay = self.initial


class MicSource:
    """Live capture from a PortAudio input device (implements AudioSource).

    Attributes:
        status: "idle" (frames() not started), "starting" (waiting for the first audio),
            "running", "reconnecting" (device lost; yielding silence, retrying) or "closed".
        dropped_blocks: capture blocks dropped because the consumer fell behind (queue full).
        overflows: blocks PortAudio flagged as input overflow (audio lost in the driver).
        silence_frames: frames of silence yielded while no device audio was flowing.
        reconnects: times audio flowed again after a loss.
        open_failures: failed attempts to open the device.
        device_info: the InputDevice in use (after the first successful open).
    """

    def __init__(self, device: str | int | None = None, *, channels: int = 1,
                 block_ms: int = FRAME_MS, queue_blocks: int = 50, clock: Clock | None = None,
                 retry_initial_s: float = 0.5, retry_max_s: float = 8.0,
                 stall_s: float = 1.0, start_timeout_s: float = 5.0,
                 fail_if_missing: bool = True) -> None:
        """
        Args:
            device: index, name substring, or None/"" for the system default input.
            channels: channels to capture (downmixed to mono).
            block_ms: PortAudio block length.
            queue_blocks: blocks buffered between the PortAudio thread and the loop; when full
                the oldest is dropped (counted in ``dropped_blocks``).
            clock: paces silence while the device is down (default: SystemClock).
            retry_initial_s / retry_max_s: reconnect backoff, doubling from initial up to max.
            stall_s: no audio for this long while running means the device is lost.
            start_timeout_s: an opened stream that delivers nothing for this long is retried
                (PulseAudio can take ~2 s to deliver the first block).
            fail_if_missing: raise DeviceNotFoundError at start if the device does not exist
                (a configuration error); False: wait for it like for an unplugged device.
        """
        if channels < 1:
            raise ValueError(f"MicSource channels = {channels}: must be ≥ 1")
        if queue_blocks < 1:
            raise ValueError(f"MicSource queue_blocks = {queue_blocks}: must be ≥ 1")
        if not 0 < retry_initial_s <= retry_max_s:
            raise ValueError("MicSource retry_initial_s must be > 0 and ≤ retry_max_s")
        self.device = device
        self.channels = channels
        self.block_ms = block_ms
        self.clock: Clock = clock or SystemClock()
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.stall_s = stall_s
        self.start_timeout_s = start_timeout_s
        self.fail_if_missing = fail_if_missing
        self.status = "idle"
        self.overflows = 0
        self.silence_frames = 0
        self.reconnects = 0
        self.open_failures = 0
        self.device_info: InputDevice | None = None
        # Overflow policy: drop the oldest block so latency stays bounded.
        self._queue = DropOldest[tuple[str, Any]](queue_blocks)
        self._stream: Any = None
        self._stream_gen = 0  # generation id: callbacks of a stream we already dropped are ignored
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rate = float(SAMPLE_RATE)

    # ------------------------------------------------------------------ PortAudio side

    def _make_callbacks(self, gen: int) -> tuple[Any, Any]:
        loop = self._loop
        assert loop is not None

        def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
            # PortAudio thread: copy (the buffer is reused) and hand over; nothing else here.
            data = indata.copy()
            overflow = bool(status and status.input_overflow)
            try:
                loop.call_soon_threadsafe(self._on_block, gen, data, overflow)
            except RuntimeError:  # loop closed during shutdown
                pass

        def finished() -> None:
            try:
                loop.call_soon_threadsafe(self._on_finished, gen)
            except RuntimeError:
                pass

        return callback, finished

    def _on_block(self, gen: int, data: np.ndarray, overflow: bool) -> None:
        if gen != self._stream_gen or self._closed:
            return
        if overflow:
            self.overflows += 1
        self._put(("data", data))

    def _on_finished(self, gen: int) -> None:
        if gen != self._stream_gen or self._closed:
            return
        self._put(("lost", "stream stopped by PortAudio"))

    @property
    def dropped_blocks(self) -> int:
        """Capture blocks dropped because the consumer fell behind (queue full)."""
        return self._queue.dropped

    def _put(self, item: tuple[str, Any]) -> None:
        if self._queue.put(item) and (self.dropped_blocks == 1 or self.dropped_blocks % 100 == 0):
            log.warning("mic: consumer too slow, dropped %d capture block(s) so far",
                        self.dropped_blocks)

    def _open_blocking(self) -> tuple[Any, InputDevice]:
        sd = _sd()
        info = resolve_device(self.device)
        rate = info.default_rate or SAMPLE_RATE
        self._stream_gen += 1
        cb, fin = self._make_callbacks(self._stream_gen)
        stream = sd.InputStream(device=info.index, channels=min(self.channels, info.channels),
                                samplerate=rate, dtype="float32",
                                blocksize=max(1, int(round(rate * self.block_ms / 1000))),
                                callback=cb, finished_callback=fin)
        try:
            stream.start()
        except Exception:
            stream.close()
            raise
        return stream, info

    async def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        self._stream_gen += 1  # late callbacks of this stream are now ignored
        if stream is None:
            return
        def _close() -> None:
            try:
                stream.abort()
            finally:
                stream.close()
        try:
            # A stream on a dead server can block in close; never block the loop on it.
            with self.clock.hold():  # a fake clock must not run ahead of thread work
                await asyncio.wait_for(asyncio.to_thread(_close), timeout=2.0)
        except Exception as e:  # noqa: BLE001 - closing a broken stream is best effort
            log.debug("mic: closing the old stream failed: %r", e)

    # ------------------------------------------------------------------ loop side

    async def _get(self, deadline: float) -> tuple[str, Any] | None:
        """Next queue item, or None once the clock reaches ``deadline``."""
        if len(self._queue):
            return self._queue.get_nowait()
        getter = asyncio.ensure_future(self._queue.get())
        sleeper = asyncio.ensure_future(self.clock.sleep_until(deadline))
        try:
            await asyncio.wait({getter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Yield 20 ms frames forever (until close()); silence while the device is down."""
        if self._loop is not None:
            raise RuntimeError("MicSource.frames() can be iterated only once")
        self._loop = asyncio.get_running_loop()
        if self.fail_if_missing:
            resolve_device(self.device)  # configuration error: fail fast, with the device list
        framer = Framer()
        resampler: StreamResampler | None = None
        clock = self.clock
        retry = _Backoff(self.retry_initial_s, self.retry_max_s)
        next_try = clock.now()
        # Silence pacing: frame index `anchor_i` corresponds to clock time `anchor_t`.
        anchor_t, anchor_i = clock.now(), 0
        opened_at = 0.0
        last_data = 0.0
        had_audio = False
        self.status = "starting"
        try:
            while not self._closed:
                now = clock.now()
                if self.status != "running":
                    due = anchor_i + int((now - anchor_t) * SAMPLE_RATE)
                    n = (due - framer.next_index) // FRAME_SAMPLES
                    if n > 0:
                        self.silence_frames += n
                        for f in framer.silence(n):
                            yield f
                    if self._stream is None and now >= next_try:
                        try:
                            with clock.hold():
                                self._stream, info = await asyncio.to_thread(
                                    self._open_blocking)
                            if self._closed:  # close() ran while the device was opening
                                break
                            self.device_info = info
                            self._rate = info.default_rate or SAMPLE_RATE
                            resampler = StreamResampler(self._rate, min(self.channels,
                                                                         info.channels),
                                                        name="mic")
                            opened_at = clock.now()
                            log.info("mic: opened %r at %g Hz", info.name, self._rate)
                        except Exception as e:  # noqa: BLE001 - any open failure: retry later
                            self.open_failures += 1
                            if self.open_failures == 1 or self.open_failures % 10 == 0:
                                log.warning("mic: cannot open input device %r (%s); retrying "
                                            "in %.1f s", self.device, e, retry.delay)
                            next_try = retry.after(clock.now())
                    elif self._stream is not None and now - opened_at > self.start_timeout_s:
                        log.warning("mic: device opened but delivered no audio for %.1f s; "
                                    "reopening", self.start_timeout_s)
                        await self._close_stream()
                        next_try = retry.after(clock.now())
                    # Wake for the next silence frame (or a block / retry, whichever is first).
                    next_i = framer.next_index + FRAME_SAMPLES
                    deadline = anchor_t + (next_i - anchor_i) / SAMPLE_RATE
                    if self._stream is None:
                        deadline = min(deadline, max(next_try, clock.now()))
                else:
                    deadline = last_data + self.stall_s
                item = await self._get(deadline)
                if self._closed:
                    break
                if item is None:
                    if self.status == "running" and clock.now() - last_data >= self.stall_s:
                        item = ("lost", f"no audio for {self.stall_s:g} s")
                    else:
                        continue
                kind, payload = item
                if kind == "data" and self._stream is not None and resampler is not None:
                    if self.status != "running":
                        if had_audio:
                            self.reconnects += 1
                            log.info("mic: audio flowing again (reconnect #%d)", self.reconnects)
                        self.status = "running"
                        had_audio = True
                        retry.reset()
                    last_data = clock.now()
                    for f in framer.push(resampler.process(cast(np.ndarray, payload))):  # see _on_block
                        yield f
                elif kind == "lost" and self._stream is not None:
                    log.warning("mic: input device lost (%s); yielding silence and retrying",
                                payload)
                    if self.status == "running" and resampler is not None:
                        for f in framer.push(resampler.flush()) + framer.flush(pad=True):
                            yield f
                        anchor_t, anchor_i = last_data, framer.next_index
                    await self._close_stream()
                    self.status = "reconnecting"
                    next_try = retry.after(clock.now())
        finally:
            await self._close_stream()
            self.status = "closed"

    async def close(self) -> None:
        """Stop capturing; a running ``frames()`` loop ends after its current frame."""
        self._closed = True
        self.status = "closed"
        self._stream_gen += 1
        self._queue.close()  # wakes a waiting _get (it returns None; frames() sees _closed)
        await self._close_stream()
