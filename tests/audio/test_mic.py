"""MicSource against a real PulseAudio daemon: espeak-ng speech played into the fake microphone."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import soundfile as sf

from avatar_agent.audio.mic import DeviceNotFoundError, MicSource, list_devices, resolve_device
from avatar_agent.audio.resample import to_pipeline
from avatar_agent.audio.vad import WebRtcVad
from avatar_agent.chunker import Chunker, ChunkerParams, SpeechEnded, SpeechStarted
from avatar_agent.clock import FakeClock
from avatar_agent.types import FRAME_SAMPLES, SAMPLE_RATE

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """Consumes a source in a task, keeping every frame and the clock time it arrived."""

    def __init__(self, src: MicSource) -> None:
        self.src = src
        self.frames: list = []
        self.arrival: list[float] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for f in self.src.frames():
            self.frames.append(f)
            self.arrival.append(time.monotonic())

    async def wait_for(self, cond, timeout: float, what: str) -> None:
        t_end = time.monotonic() + timeout
        while not cond():
            if self.task.done():
                self.task.result()
                raise AssertionError(f"source ended while waiting for {what}")
            assert time.monotonic() < t_end, \
                f"timed out waiting for {what} (status {self.src.status})"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await self.src.close()
        await asyncio.wait_for(self.task, 5)

    def audio(self) -> np.ndarray:
        return np.concatenate([f.samples for f in self.frames])


def assert_contiguous(frames) -> None:
    idx = np.array([f.index for f in frames])
    assert idx[0] == 0
    np.testing.assert_array_equal(idx, np.arange(len(frames)) * FRAME_SAMPLES)
    assert all(f.samples.shape == (FRAME_SAMPLES,) and f.samples.dtype == np.float32
               for f in frames)


def test_list_and_resolve_devices(pulse_server):
    devs = list_devices()
    names = [d.name for d in devs]
    assert "pulse" in names
    assert resolve_device("PULSE").name == "pulse"  # case-insensitive exact match
    idx = names.index("pulse")
    assert resolve_device(devs[idx].index).name == "pulse"
    assert resolve_device(str(devs[idx].index)).name == "pulse"
    assert resolve_device(None).is_default or len(devs) == 1


def test_missing_device_error_lists_devices(pulse_server):
    with pytest.raises(DeviceNotFoundError) as e:
        resolve_device("no-such-microphone")
    msg = str(e.value)
    assert "no-such-microphone" in msg and "pulse" in msg and "audio.device" in msg
    with pytest.raises(DeviceNotFoundError, match="index 999"):
        resolve_device(999)


async def test_missing_device_fails_fast_by_default(pulse_server):
    src = MicSource("no-such-microphone")
    with pytest.raises(DeviceNotFoundError, match="pulse"):
        async for _ in src.frames():
            break


@pytest.mark.slow
async def test_speech_lands_where_it_was_played(pulse_server, speech_wav, tmp_path):
    a = speech_wav("Hello there, how are you today?")
    b = speech_wav("The weather is lovely.")
    gap_s = 1.2
    x = np.concatenate([a.samples, np.zeros(int(gap_s * a.rate), np.float32), b.samples])
    wav = tmp_path / "two.wav"
    sf.write(wav, x, a.rate, subtype="PCM_16")
    ref = to_pipeline(sf.read(wav, dtype="float32")[0], a.rate)
    # Ground truth speech intervals of the played file, on its own 16 kHz timeline.
    truth = [(a.speech_start, a.speech_end),
             (a.duration + gap_s + b.speech_start, a.duration + gap_s + b.speech_end)]

    src = MicSource("pulse")
    rec = Recorder(src)
    # Start recording first and wait for real audio: Pulse can take ~2 s to deliver a block.
    await rec.wait_for(lambda: src.status == "running", 15, "audio from the device")
    await asyncio.sleep(0.3)
    play_index = len(rec.frames) * FRAME_SAMPLES  # timeline position when playback starts
    player = pulse_server.play(wav)
    await asyncio.to_thread(player.wait, 20)
    assert player.returncode == 0, player.stderr.read()
    n_target = len(rec.frames) + int(0.8 * SAMPLE_RATE / FRAME_SAMPLES)
    await rec.wait_for(lambda: len(rec.frames) >= n_target, 10, "trailing silence")
    await rec.stop()

    frames = rec.frames
    assert_contiguous(frames)
    assert src.status == "closed" and src.device_info.name == "pulse"
    y = rec.audio()
    # Where did the file land on the recording's timeline?  Cross-correlate with the reference.
    seg = y[play_index:]
    corr = np.correlate(seg, ref, mode="valid") if seg.size >= ref.size else np.zeros(1)
    lag = int(np.argmax(corr))
    norm = corr[lag] / (np.linalg.norm(ref) * np.linalg.norm(seg[lag:lag + ref.size]) + 1e-9)
    assert norm > 0.8, f"recording does not contain the played speech (r = {norm:.2f})"
    offset = play_index + lag  # timeline sample where the file's first sample was captured
    # paplay starts within a fraction of a second of being launched.
    assert 0 <= lag < 0.8 * SAMPLE_RATE

    # VAD + chunker on the recording find the two utterances where they were played.
    vad = WebRtcVad(3, 30)
    ch = Chunker(ChunkerParams(fps=25, hop_ms=160, window_ms=3200, left_context_ms=400,
                               lookahead_ms=80, min_speech_ms=60, pre_roll_ms=120, hangover_ms=300,
                               max_utterance_s=30.0))
    events = []
    for f in frames:
        events += ch.push(f, vad.is_speech(f.samples))
    events += ch.flush()
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert len(starts) == 2 and len(ends) == 2, events
    # Onsets within 100 ms; ends within one hop (webrtcvad itself holds "voiced" ~0.1 s after
    # the energy stops: its internal overhang).
    hop = ch.params.hop_ms * SAMPLE_RATE // 1000
    for (t0, t1), s, e in zip(truth, starts, ends, strict=False):
        assert abs(s.onset - (offset + t0 * SAMPLE_RATE)) <= 0.1 * SAMPLE_RATE
        assert abs(e.offset - (offset + t1 * SAMPLE_RATE)) <= hop

    # Energy: speech where it was played, digital silence well away from it.
    rms = np.sqrt((y[: len(frames) * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES) ** 2).mean(1))
    t_frame = (np.arange(len(frames)) * FRAME_SAMPLES - offset) / SAMPLE_RATE
    margin = 0.15
    inside = np.zeros(len(frames), bool)
    near = np.zeros(len(frames), bool)
    for t0, t1 in truth:
        inside |= (t_frame >= t0 + margin) & (t_frame < t1 - margin)
        near |= (t_frame >= t0 - margin) & (t_frame < t1 + margin)
    assert np.median(rms[inside]) > 0.02
    assert rms[~near].max() < 1e-3


@pytest.mark.slow
async def test_keeps_timeline_through_server_crash_and_reconnects(pulse_server, speech_wav):
    src = MicSource("pulse", retry_initial_s=0.1, retry_max_s=0.4, stall_s=0.5)
    rec = Recorder(src)
    await rec.wait_for(lambda: src.status == "running", 15, "audio from the device")
    await asyncio.sleep(0.2)
    pulse_server.stop(kill=True)  # the sound server dies mid-run
    await rec.wait_for(lambda: src.status == "reconnecting", 5, "loss detection")
    n_lost = len(rec.frames)
    t_lost = time.monotonic()
    await asyncio.sleep(1.5)
    outage_frames = len(rec.frames) - n_lost
    outage_s = time.monotonic() - t_lost
    assert src.open_failures >= 2  # it kept retrying while the server was down
    pulse_server.start()
    await rec.wait_for(lambda: src.status == "running", 20, "reconnect")
    assert src.reconnects == 1
    # Audio captured after the reconnect is real audio again.
    s = speech_wav("Back again.")
    mark = len(rec.frames)
    player = pulse_server.play(s.path)
    await asyncio.to_thread(player.wait, 20)
    n_target = len(rec.frames) + 25
    await rec.wait_for(lambda: len(rec.frames) >= n_target, 10, "frames after playback")
    await rec.stop()

    assert_contiguous(rec.frames)
    # While the server was down the source yielded silence paced by the clock.
    outage = np.concatenate([f.samples for f in rec.frames[n_lost:n_lost + outage_frames]])
    assert not outage.any()
    assert 10 <= outage_frames <= (outage_s + 0.2) / FRAME_MS_S  # paced, not flooded nor stopped
    assert src.silence_frames >= outage_frames
    after = np.concatenate([f.samples for f in rec.frames[mark:]])
    assert np.sqrt((after ** 2).mean()) > 0.01


FRAME_MS_S = FRAME_SAMPLES / SAMPLE_RATE


async def test_missing_device_backoff_yields_silence(pulse_server):
    # A fake clock makes the schedule exact: silence frames and retries are both clock-paced.
    clock = FakeClock()
    src = MicSource("no-such-microphone", fail_if_missing=False, retry_initial_s=0.05,
                    retry_max_s=0.2, clock=clock)
    frames = []
    async for f in src.frames():
        frames.append(f)
        if f.index >= 1.2 * SAMPLE_RATE:
            break
    await src.close()
    assert_contiguous(frames)
    assert len(frames) == 61 and not np.concatenate([f.samples for f in frames]).any()
    assert src.silence_frames == 61 and src.status == "closed" and src.device_info is None
    # Frame k arrives when it has "played": 61 frames → t = 1.22 s.
    assert clock.now() == pytest.approx(1.22)
    # Attempts at t = 0, .05, .15, .35 (doubling), then every 0.2 s (cap): .55 .75 .95 1.15.
    assert src.open_failures == 8


async def test_overflow_drops_oldest_and_counts(pulse_server):
    src = MicSource("pulse", queue_blocks=3)
    rec = Recorder(src)
    await rec.wait_for(lambda: src.status == "running", 15, "audio from the device")
    n0 = len(rec.frames)
    time.sleep(0.5)  # block the event loop: ~25 capture blocks pile up behind it
    await rec.wait_for(lambda: len(rec.frames) >= n0 + 10, 5, "frames after the stall")
    await rec.stop()
    assert src.dropped_blocks >= 10  # all but the newest 3 blocks were dropped
    assert_contiguous(rec.frames)  # the timeline stays gap-free (it just skips the lost audio)
