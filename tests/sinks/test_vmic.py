"""Virtual microphone on a private PulseAudio daemon: devices, samples, and A/V offset ≤ 1 frame."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time

import numpy as np
import pytest

from avatar_agent.clock import SystemClock
from avatar_agent.sinks.vmic import VirtualMicError, VirtualMicSink
from avatar_agent.types import SAMPLE_RATE, VideoFrame

FPS = 25
SPF = SAMPLE_RATE // FPS
IMG = np.zeros((8, 8, 3), np.uint8)


def pactl(*args: str) -> str:
    return subprocess.run(["pactl", *args], capture_output=True, text=True, check=True).stdout


def names(kind: str) -> set[str]:
    return {line.split("\t")[1] for line in pactl("list", "short", kind).splitlines()}


class Recorder:
    """``pacat --record`` of a source; remembers when each block arrived (monotonic clock).

    Recorded sample n was captured at about t0 + n / rate, where t0 is estimated from the
    arrivals: a block ending at sample e that arrives at time a was captured no later than a, so
    t0 ≤ a − e / rate for every block; the minimum over blocks is the tightest bound (arrival
    jitter only ever makes blocks late).
    """

    def __init__(self, source: str) -> None:
        self.proc = subprocess.Popen(
            ["pacat", "--record", "--raw", f"--device={source}", "--format=s16le",
             f"--rate={SAMPLE_RATE}", "--channels=1", "--latency-msec=5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.chunks: list[bytes] = []
        self.arrivals: list[tuple[float, int]] = []      # (time, samples received so far)
        self._n = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            b = os.read(fd, 640)
            if not b:
                return
            t = time.monotonic()
            self.chunks.append(b)
            self._n += len(b)
            self.arrivals.append((t, self._n // 2))

    def wait_started(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._n < 2 * 1600 and time.monotonic() < deadline:     # 100 ms recorded
            time.sleep(0.01)
        assert self._n >= 3200, "recording did not start"

    def stop(self) -> np.ndarray:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        self._thread.join(timeout=5)
        raw = b"".join(self.chunks)
        return np.frombuffer(raw[: len(raw) // 2 * 2], "<i2").astype(np.float32) / 32768

    def t0(self) -> float:
        return min(a - n / SAMPLE_RATE for a, n in self.arrivals)


async def play(sink: VirtualMicSink, audio: np.ndarray, t_start: float) -> list[float]:
    """Send frames at the player's pace (frame k due at t_start + k / fps); returns send times."""
    clock = SystemClock()
    sent = []
    for k in range(len(audio) // SPF):
        await clock.sleep_until(t_start + k / FPS)
        sent.append(time.monotonic())
        await sink.send(VideoFrame(IMG, k, audio[k * SPF:(k + 1) * SPF].copy()))
    return sent


async def test_devices_are_created_and_removed_exactly(pulse_server) -> None:
    mods_before = pactl("list", "short", "modules")
    sink = VirtualMicSink(source_name="test_mic", sink_name="test_out",
                          description="Avatar test mic")
    await sink.start(64, 64, FPS)
    try:
        assert "test_mic" in names("sources") and "test_out" in names("sinks")
        assert len(sink.modules) == 2
        desc = pactl("list", "sources")
        assert "Description: Avatar test mic" in desc
        # A second agent with the same names is refused with a clear message, nothing loaded.
        other = VirtualMicSink(source_name="test_mic", sink_name="test_out")
        with pytest.raises(VirtualMicError, match="already exists"):
            await other.start(64, 64, FPS)
        assert other.modules == []
    finally:
        await sink.close()
    assert "test_mic" not in names("sources") and "test_out" not in names("sinks")
    assert pactl("list", "short", "modules") == mods_before     # the fixture's own are intact
    assert "vmic" in names("sources")


def click_track(n_frames: int, clicks: list[int]) -> np.ndarray:
    # A low tone everywhere (so the stream is in steady state) and full-scale clicks as markers.
    audio = 0.01 * np.sin(2 * np.pi * 200 * np.arange(n_frames * SPF) / SAMPLE_RATE)
    audio = audio.astype(np.float32)
    for k in clicks:
        audio[k * SPF:k * SPF + 16] = 0.9
    return audio


def click_offsets(rec: Recorder, recorded: np.ndarray, sent: list[float], clicks: list[int]
                  ) -> list[float]:
    peaks = np.flatnonzero(np.abs(recorded) > 0.5)
    onsets = [int(p) for i, p in enumerate(peaks) if i == 0 or p - peaks[i - 1] > SPF]
    assert len(onsets) == len(clicks), f"expected {len(clicks)} clicks, heard {len(onsets)}"
    for o in onsets:                                   # each click arrives intact
        assert np.allclose(recorded[o:o + 16], 0.9, atol=2e-3)
    return [rec.t0() + o / SAMPLE_RATE - sent[k] for o, k in zip(onsets, clicks, strict=False)]


async def record_play(sink: VirtualMicSink, audio: np.ndarray, stall_at: int | None = None
                      ) -> tuple[Recorder, np.ndarray, list[float]]:
    rec = Recorder(sink.source_name)
    try:
        await asyncio.to_thread(rec.wait_started)       # recording runs before anything plays
        t_start = time.monotonic() + 0.05
        if stall_at is None:
            sent = await play(sink, audio, t_start)
        else:
            # The player stalls for 200 ms, then catches up by sending 5 frames back to back.
            sent = await play(sink, audio[:stall_at * SPF], t_start)
            await asyncio.sleep(0.2)
            for k in range(stall_at, stall_at + 5):
                sent.append(time.monotonic())
                await sink.send(VideoFrame(IMG, k, audio[k * SPF:(k + 1) * SPF].copy()))
            rest = await play(sink, audio[(stall_at + 5) * SPF:], time.monotonic() + 1 / FPS)
            sent += rest
        await asyncio.sleep(0.4)
    finally:
        recorded = await asyncio.to_thread(rec.stop)
    return rec, recorded, sent


async def test_click_reaches_the_virtual_source_within_one_frame_of_its_due_time(
        pulse_server) -> None:
    sink = VirtualMicSink()
    await sink.start(64, 64, FPS)
    try:
        rec, recorded, sent = await record_play(sink, click_track(75, [25, 50]))
    finally:
        await sink.close()
    assert sink.stats.frames == 75 and sink.stats.dropped == 0
    offsets = click_offsets(rec, recorded, sent, [25, 50])
    print(f"virtual mic: clicks heard {[round(o * 1000, 1) for o in offsets]} ms after their "
          f"frames were sent; stats {sink.stats}")
    assert all(-0.005 <= o <= 1 / FPS for o in offsets)


async def test_delay_is_restored_after_the_player_stalls(pulse_server) -> None:
    sink = VirtualMicSink()
    await sink.start(64, 64, FPS)
    try:
        # Frames 20..24 arrive in a burst 200 ms late; the click at 40 is sent on time again.
        rec, recorded, sent = await record_play(sink, click_track(60, [10, 40]), stall_at=20)
    finally:
        await sink.close()
    offsets = click_offsets(rec, recorded, sent, [10, 40])
    print(f"virtual mic after a stall: {[round(o * 1000, 1) for o in offsets]} ms; {sink.stats}")
    assert all(-0.005 <= o <= 1 / FPS for o in offsets)
    assert sink.stats.trimmed_ms > 0 or sink.stats.padded_ms > 0   # it had to correct


async def test_frames_after_the_server_dies_raise_a_clear_error(pulse_server) -> None:
    sink = VirtualMicSink()
    await sink.start(64, 64, FPS)
    await sink.send(VideoFrame(IMG, 0, np.zeros(SPF, np.float32)))
    pulse_server.stop(kill=True)
    with pytest.raises(VirtualMicError, match="sound server|writer stopped"):
        for k in range(1, 200):                          # pacat notices and exits
            await sink.send(VideoFrame(IMG, k, np.zeros(SPF, np.float32)))
            await asyncio.sleep(0.01)
    sink.manage_modules = False                         # nothing left to unload on a dead server
    await sink.close()


async def test_no_server_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PULSE_SERVER", f"unix:{tmp_path}/nothing")
    sink = VirtualMicSink()
    with pytest.raises(VirtualMicError, match="pactl"):
        await sink.start(64, 64, FPS)


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="source_name"):
        VirtualMicSink(source_name="bad name; rm")
    with pytest.raises(ValueError, match="description"):
        VirtualMicSink(description="x' sink_name=evil")
    with pytest.raises(ValueError, match="latency_ms"):
        VirtualMicSink(latency_ms=0)
