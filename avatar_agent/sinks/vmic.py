"""Virtual microphone sink: the agent's voice as a PulseAudio/PipeWire source Zoom or Meet can pick.

The player hands every sink the same frame with exactly its audio slice, at the frame's due time;
this sink plays that slice into a null sink whose monitor is remapped to a named *source* (a
microphone to applications).  So the voice reaches the meeting delayed exactly like the video: by
the player's latency, plus this sink's small fixed output buffer (``latency_ms``).

Devices (created on :meth:`VirtualMicSink.start`, removed on :meth:`close` — only the modules this
sink loaded are unloaded)::

    pactl load-module module-null-sink sink_name=avatar_agent_out rate=16000 channels=1 ...
    pactl load-module module-remap-source master=avatar_agent_out.monitor \\
          source_name=avatar_agent_mic source_properties=device.description=avatar-agent-microphone

Audio goes in through a libpulse-simple playback stream (s16le, 16 kHz, mono) owned by one writer
thread; ``send`` only enqueues, so a stalled sound server never blocks the event loop.  The delay is
*held fixed*: every block is stamped when the player sends it and must start playing exactly
``latency_ms`` later.  Before writing a block the thread asks the server how much audio is still
buffered; if the block would play early (the buffer ran low: a late frame), silence is inserted;
if it would play more than ``slack_ms`` late (a stall piled audio up), the block's head is
trimmed.  So a hiccup costs a tiny glitch, never a permanent lip-sync drift.  PipeWire's
pipewire-pulse serves the same protocol.  Needs apt ``pulseaudio-utils`` (pactl) and libpulse0.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from avatar_agent.queues import SyncDropOldest
from avatar_agent.sinks.writer import WriterThread
from avatar_agent.types import SAMPLE_RATE, VideoFrame

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class VirtualMicError(RuntimeError):
    """The virtual microphone could not be created or stopped working; the message says why."""


@dataclass
class VirtualMicStats:
    """Counters of one sink."""

    frames: int = 0
    """Frames whose audio was written to the server."""
    dropped: int = 0
    """Frames dropped because the writer fell a whole second behind."""
    padded_ms: float = 0.0
    """Silence inserted to hold the delay when frames came late."""
    trimmed_ms: float = 0.0
    """Audio cut to hold the delay after a stall."""
    max_error_ms: float = 0.0
    """Largest |play time − (send time + latency)| seen before correction."""


def _run_pactl(args: Sequence[str], timeout: float = 5.0) -> str:
    try:
        r = subprocess.run(["pactl", *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise VirtualMicError("pactl not found: apt install pulseaudio-utils (and run PulseAudio "
                              "or PipeWire with pipewire-pulse)") from None
    except subprocess.TimeoutExpired:
        raise VirtualMicError(f"pactl {' '.join(args[:2])} did not answer within {timeout:g} s: "
                              "is the sound server hung?") from None
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip()
        if "Connection refused" in msg or "Connection failure" in msg:
            msg += (" — no PulseAudio/PipeWire server reachable for this user (start it, or set "
                    "PULSE_SERVER)")
        raise VirtualMicError(f"pactl {' '.join(args)} failed: {msg}")
    return r.stdout


def _names(kind: str) -> set[str]:
    out = _run_pactl(["list", "short", kind])
    return {line.split("\t")[1] for line in out.splitlines() if "\t" in line}


def _props(key: str, description: str) -> str:
    """``key="device.description='...'"``: modargs strips the outer quotes, the proplist parser
    the inner ones, so descriptions may contain spaces."""
    return f"{key}=\"device.description='{description}'\""


# ------------------------------------------------------------------------------------------------
# libpulse-simple through ctypes (one stream, used from one thread)
# ------------------------------------------------------------------------------------------------

_PA_STREAM_PLAYBACK = 1
_PA_SAMPLE_S16LE = 3


class _SampleSpec(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("rate", ctypes.c_uint32), ("channels", ctypes.c_uint8)]


class _BufferAttr(ctypes.Structure):
    _fields_ = [("maxlength", ctypes.c_uint32), ("tlength", ctypes.c_uint32),
                ("prebuf", ctypes.c_uint32), ("minreq", ctypes.c_uint32),
                ("fragsize", ctypes.c_uint32)]


def _libs() -> tuple[Any, Any]:
    names = (ctypes.util.find_library("pulse-simple") or "libpulse-simple.so.0",
             ctypes.util.find_library("pulse") or "libpulse.so.0")
    try:
        simple, pulse = (ctypes.CDLL(n) for n in names)
    except OSError:
        raise VirtualMicError("libpulse-simple is missing: apt install libpulse0") from None
    simple.pa_simple_new.restype = ctypes.c_void_p
    simple.pa_simple_new.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                     ctypes.c_char_p, ctypes.c_char_p,
                                     ctypes.POINTER(_SampleSpec), ctypes.c_void_p,
                                     ctypes.POINTER(_BufferAttr), ctypes.POINTER(ctypes.c_int)]
    simple.pa_simple_write.restype = ctypes.c_int
    simple.pa_simple_write.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                       ctypes.POINTER(ctypes.c_int)]
    simple.pa_simple_get_latency.restype = ctypes.c_uint64
    simple.pa_simple_get_latency.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    simple.pa_simple_free.restype = None
    simple.pa_simple_free.argtypes = [ctypes.c_void_p]
    pulse.pa_strerror.restype = ctypes.c_char_p
    pulse.pa_strerror.argtypes = [ctypes.c_int]
    return simple, pulse


class _Playback:
    """The playback stream, used only on its writer thread: each block starts ``latency`` after
    it was sent (the thread, the queue and error hand-back are :class:`WriterThread`'s)."""

    MAX_BLOCKS = 50
    """Blocks queued at most (2 s of 40 ms frames); more: the oldest is dropped (counted)."""

    def __init__(self, sink: str, latency_s: float, slack_s: float, stats: VirtualMicStats
                 ) -> None:
        self.sink, self.latency, self.slack, self.stats = sink, latency_s, slack_s, stats
        self._simple: Any = None
        self._pulse: Any = None
        self._handle: Any = None
        self._err = ctypes.c_int(0)

    def open(self) -> None:
        """Connect the stream (raises VirtualMicError with the server's reason)."""
        simple, pulse = _libs()
        err = self._err
        spec = _SampleSpec(_PA_SAMPLE_S16LE, SAMPLE_RATE, 1)
        bps = 2 * SAMPLE_RATE
        # A roomy target length (never blocks on a 40 ms block) and a tiny prebuffer (restart at
        # once after an underrun): the delay itself is held by write(), not by these.
        attr = _BufferAttr(0xFFFFFFFF, int(bps * (self.latency + 0.04)) // 2 * 2,
                           int(bps * 0.002) // 2 * 2, 0xFFFFFFFF, 0xFFFFFFFF)
        # pa_simple cannot pass PA_STREAM_ADJUST_LATENCY; libpulse sets it (with this latency)
        # when PULSE_LATENCY_MSEC is in the environment at connect time.  Without it the server
        # configures the sink for the whole target length and hides ~50 ms more delay than it
        # reports.  Set only around the connect call, restored right after.
        saved = os.environ.get("PULSE_LATENCY_MSEC")
        os.environ["PULSE_LATENCY_MSEC"] = str(max(1, round(self.latency * 1000)))
        handle = simple.pa_simple_new(None, b"avatar-agent", _PA_STREAM_PLAYBACK,
                                      self.sink.encode(), b"avatar-agent voice",
                                      ctypes.byref(spec), None, ctypes.byref(attr),
                                      ctypes.byref(err))
        if saved is None:
            del os.environ["PULSE_LATENCY_MSEC"]
        else:
            os.environ["PULSE_LATENCY_MSEC"] = saved
        if not handle:
            raise VirtualMicError(f"cannot open a playback stream on {self.sink!r}: "
                                  f"{pulse.pa_strerror(err.value).decode()}")
        self._simple, self._pulse, self._handle = simple, pulse, handle

    def write(self, block: tuple[float, bytes]) -> None:
        """Write one block so that it starts at its send time + latency."""
        t_sent, pcm = block
        simple, pulse, handle, err = self._simple, self._pulse, self._handle, self._err
        try:
            lat = simple.pa_simple_get_latency(handle, ctypes.byref(err))
            if lat == 0xFFFFFFFFFFFFFFFF:
                raise VirtualMicError(pulse.pa_strerror(err.value).decode())
            # This block would start after what is buffered; it should start at
            # t_sent + latency.  error > 0: late (trim), error < 0: early (pad).
            error = time.monotonic() + lat / 1e6 - (t_sent + self.latency)
            self.stats.max_error_ms = max(self.stats.max_error_ms, abs(error) * 1000)
            if error < -self.latency / 2:
                pad = int(-error * SAMPLE_RATE)
                pcm = bytes(2 * pad) + pcm
                self.stats.padded_ms += pad / SAMPLE_RATE * 1000
            elif error > self.slack:
                cut = min(len(pcm) // 2, int(error * SAMPLE_RATE))
                pcm = pcm[2 * cut:]
                self.stats.trimmed_ms += cut / SAMPLE_RATE * 1000
            if pcm and simple.pa_simple_write(handle, pcm, len(pcm), ctypes.byref(err)) < 0:
                raise VirtualMicError(pulse.pa_strerror(err.value).decode())
        except VirtualMicError as e:
            raise VirtualMicError(f"playback to {self.sink!r} failed: {e} (sound server gone?)"
                                  ) from None
        self.stats.frames += 1

    def free(self, error: BaseException | None = None) -> None:
        """Release the stream (after the last write, or after a failed one)."""
        if error is not None:
            log.error("virtual microphone: %s", error)
        handle, self._handle = self._handle, None
        if handle:
            self._simple.pa_simple_free(handle)


class VirtualMicSink:
    """A Sink that plays each frame's audio slice into a virtual microphone.

    Args:
        source_name: the microphone applications see (a PulseAudio source name).
        sink_name: the null sink the audio is played into (its monitor feeds the source).
        description: the human-readable device name shown in Zoom/Meet/pavucontrol.
        manage_modules: create the devices on start and remove them on close (False: they are
            set up by the user, e.g. in default.pa, and only played into).
        latency_ms: fixed delay from ``send`` to playback (the output buffer; it adds to the
            audio's delay relative to the video, so keep it small).
        slack_ms: how late a block may play before its head is trimmed to restore the delay.
        name: sink name in logs and stats.
    """

    def __init__(self, source_name: str = "avatar_agent_mic", sink_name: str = "avatar_agent_out",
                 description: str = "avatar-agent microphone", *, manage_modules: bool = True,
                 latency_ms: int = 10, slack_ms: int = 15, name: str = "vmic") -> None:
        for what, v in (("source_name", source_name), ("sink_name", sink_name)):
            if not _NAME.match(v):
                raise ValueError(f"{what} {v!r}: use 1-64 letters, digits, '_', '.', '-'")
        if not description or any(c in description for c in "'\"\\=\n"):
            raise ValueError(f"description {description!r}: a non-empty name without quotes, "
                             "backslashes, '=' or newlines")
        if not 1 <= latency_ms <= 500:
            raise ValueError(f"latency_ms={latency_ms} must be within 1..500")
        if not 1 <= slack_ms <= 500:
            raise ValueError(f"slack_ms={slack_ms} must be within 1..500")
        self.name = name
        self.source_name = source_name
        self.sink_name = sink_name
        self.description = description
        self.manage_modules = manage_modules
        self.latency_ms = latency_ms
        self.slack_ms = slack_ms
        self.stats = VirtualMicStats()
        self.modules: list[int] = []
        """Indices of the modules this sink loaded (exactly these are unloaded on close)."""
        self._writer: WriterThread[tuple[float, bytes]] | None = None

    # -------------------------------------------------------------------------------------------

    async def start(self, width: int, height: int, fps: int) -> None:
        """Create the devices (if managed) and open the playback stream."""
        await asyncio.to_thread(self._start_blocking)

    def _start_blocking(self) -> None:
        if self.manage_modules:
            try:
                self._load_modules()
            except Exception:
                self._unload_modules()
                raise
        elif self.sink_name not in _names("sinks"):
            raise VirtualMicError(f"sink {self.sink_name!r} does not exist and manage_modules is "
                                  "off: create it or let the agent manage the devices")
        pb = _Playback(self.sink_name, self.latency_ms / 1000, self.slack_ms / 1000, self.stats)
        # Audio that cannot be written within 2 s would play late anyway: drop the oldest, and
        # on close stop without writing the rest.
        w = WriterThread("vmic-writer", SyncDropOldest[tuple[float, bytes]](_Playback.MAX_BLOCKS),
                         pb.write, open=pb.open, finish=pb.free, on_error=pb.free, drain=False)
        w.start()
        w.ready.wait(10)
        if w.error or not w.ready.is_set():
            w.stop()
            if self.manage_modules:
                self._unload_modules()
            raise VirtualMicError(str(w.error) if w.error else
                                  "the playback stream did not open within 10 s")
        self._writer = w
        log.info("virtual microphone %r ready (sink %s, %d ms delay)", self.source_name,
                 self.sink_name, self.latency_ms)

    def _load_modules(self) -> None:
        sinks, sources = _names("sinks"), _names("sources")
        if self.sink_name in sinks or self.source_name in sources:
            raise VirtualMicError(
                f"a device named {self.sink_name!r} or {self.source_name!r} already exists (another "
                "agent, or one that crashed): unload it with `pactl list short modules` + "
                "`pactl unload-module N`, or choose other names")
        idx = _run_pactl(["load-module", "module-null-sink", f"sink_name={self.sink_name}",
                          f"rate={SAMPLE_RATE}", "channels=1", "channel_map=mono",
                          _props("sink_properties", f"{self.description} output")]).strip()
        self.modules.append(int(idx))
        idx = _run_pactl(["load-module", "module-remap-source",
                          f"master={self.sink_name}.monitor", f"source_name={self.source_name}",
                          _props("source_properties", self.description)]).strip()
        self.modules.append(int(idx))

    def _unload_modules(self) -> None:
        errors = []
        for idx in reversed(self.modules):
            try:
                _run_pactl(["unload-module", str(idx)])
            except VirtualMicError as e:
                errors.append(str(e))
        self.modules.clear()
        if errors:
            log.warning("could not unload virtual microphone modules: %s", "; ".join(errors))

    async def send(self, frame: VideoFrame) -> None:
        """Queue the frame's audio slice, stamped now (never blocks)."""
        w = self._writer
        if w is None:
            raise VirtualMicError("virtual microphone not started")
        if w.error is not None or not w.is_alive():
            raise VirtualMicError(str(w.error) if w.error else
                                  "the virtual microphone writer stopped")
        pcm = np.clip(np.asarray(frame.audio, np.float32), -1.0, 1.0)
        if w.put((time.monotonic(), (pcm * 32767.0).round().astype("<i2").tobytes())):
            self.stats.dropped += 1

    async def close(self) -> None:
        """Stop the playback stream and remove the devices this sink created."""
        await asyncio.to_thread(self._close_blocking)

    def _close_blocking(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            w.stop()
            w.join(timeout=5)
        if self.manage_modules:
            self._unload_modules()


__all__ = ["VirtualMicSink", "VirtualMicError", "VirtualMicStats"]
