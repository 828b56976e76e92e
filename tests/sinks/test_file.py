"""Mp4Sink: real H.264/AAC encoding with PyAV, checked by decoding the file with PyAV."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest

from avatar_agent.audio.resample import Upsampler3
from avatar_agent.sinks.file import FileSinkError, Mp4Sink
from avatar_agent.types import VideoFrame
from tests.sinks.conftest import PY, child_env, pattern_frame, tone

W, H, FPS, SPF = 128, 96, 25, 640


def decode(path: Path) -> tuple[list[float], list[np.ndarray], np.ndarray, float]:
    """(video frame times, RGB frames, 48 kHz audio, audio start time); tolerates a cut-off tail."""
    times: list[float] = []
    images: list[np.ndarray] = []
    audio: list[np.ndarray] = []
    a0 = 0.0
    with av.open(str(path)) as c:
        try:
            for f in c.decode():
                if isinstance(f, av.VideoFrame):
                    times.append(float(f.time))
                    images.append(f.to_ndarray(format="rgb24"))
                else:
                    if not audio:
                        a0 = float(f.time)
                    audio.append(f.to_ndarray()[0])
        except av.error.FFmpegError:
            pass  # a SIGKILLed file ends in a partial fragment
    return times, images, np.concatenate(audio) if audio else np.zeros(0, np.float32), a0


def bar_x(img: np.ndarray) -> int:
    """x of the moving red bar drawn by pattern_frame."""
    return int(np.argmax(img[H // 2 :, :, 0].mean(axis=0)))


async def test_frames_audio_duration_and_onset(tmp_path: Path) -> None:
    n, onset_frame = 100, 50
    sink = Mp4Sink(tmp_path / "out.mp4", fps=FPS, offline=True)
    await sink.start(W, H, FPS)
    for i in range(n):
        # silence, then a 440 Hz tone from frame 50 on (the onset the A/V check looks for)
        audio = tone(SPF, 440.0, start=i * SPF) if i >= onset_frame else np.zeros(SPF, np.float32)
        await sink.send(VideoFrame(pattern_frame(i, W, H), i, audio))
    await sink.close()
    assert sink.frames_written == n and sink.frames_dropped == 0

    times, images, audio, a0 = decode(tmp_path / "out.mp4")
    assert abs(len(times) - n) <= 1  # duration × fps
    assert images[0].shape == (H, W, 3)
    # frames are in order and each shows its own bar position (pts came from frame.index)
    for i in (1, 17, 42, 99):
        assert abs(bar_x(images[i]) - bar_x(pattern_frame(i, W, H))) <= 1, i
    video_dur = n / FPS
    audio_dur = audio.size / 48_000
    assert abs(audio_dur - video_dur) <= 1 / FPS
    onset_t = a0 + int(np.argmax(np.abs(audio) > 0.1)) / 48_000
    assert abs(onset_t - times[onset_frame]) <= 0.5 / FPS  # audio onset lands on frame 50
    rms = float(np.sqrt(np.mean(audio[-48_000:] ** 2)))
    assert abs(rms - 0.5 / np.sqrt(2)) < 0.05  # the tone survives AAC at the right level


async def test_index_gap_is_filled_with_silence(tmp_path: Path) -> None:
    sink = Mp4Sink(tmp_path / "gap.mp4", offline=True)
    await sink.start(W, H, FPS)
    for i in list(range(0, 20)) + list(range(30, 50)):  # frames 20..29 never produced
        await sink.send(VideoFrame(pattern_frame(i, W, H), i, tone(SPF, 300.0, start=i * SPF)))
    await sink.close()
    times, _images, audio, a0 = decode(tmp_path / "gap.mp4")
    assert len(times) == 40
    # frame 30 is shown 29 frame periods after frame 1 (times[0] is 0.0: the muxer's AAC-priming
    # shift moves every other frame by 21 ms, and the first one is stretched to meet them)
    assert abs(times[20] - times[1] - 29 / FPS) < 1e-3
    assert abs(audio.size / 48_000 - 50 / FPS) <= 1 / FPS  # audio covers the gap
    off = times[1] - 1 / FPS - a0  # where the timeline's t=0 sits in the decoded audio
    gap = audio[int((20 / FPS + off + 0.02) * 48_000) : int((30 / FPS + off - 0.02) * 48_000)]
    assert gap.size > 0.3 * 48_000
    assert float(np.abs(gap).max()) < 0.02


async def test_live_overflow_drops_images_keeps_audio(tmp_path: Path) -> None:
    sink = Mp4Sink(tmp_path / "burst.mp4", max_queued_images=5)
    await sink.start(W, H, FPS)
    for i in range(60):  # a burst far faster than real time: the queue must overflow
        await sink.send(VideoFrame(pattern_frame(i, W, H), i, tone(SPF, 300.0, start=i * SPF)))
    await sink.close()
    assert sink.frames_dropped > 0 and sink.frames_written + sink.frames_dropped == 60
    times, _images, audio, _a0 = decode(tmp_path / "burst.mp4")
    assert len(times) == sink.frames_written
    assert abs(audio.size / 48_000 - 60 / FPS) <= 1 / FPS  # no audio lost


def test_upsampler_exact_and_continuous() -> None:
    up = Upsampler3()
    x = tone(16_000, 440.0)
    chunks = [up(x[i : i + 640]) for i in range(0, x.size, 640)]
    assert all(c.size == 1920 for c in chunks)
    y = np.concatenate(chunks)
    ref = tone(48_000, 440.0, rate=48_000)
    d = 35  # ≈ the filter's group delay in output samples
    err = y[100 + d : -100] - ref[100 : -100 - d]
    assert float(np.abs(err).max()) < 0.02  # chunk seams are invisible


async def test_bad_input_messages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even frame size"):
        await Mp4Sink(tmp_path / "x.mp4").start(127, 96, FPS)
    with pytest.raises(ValueError, match="30 fps"):
        await Mp4Sink(tmp_path / "x.mp4", fps=30).start(W, H, FPS)
    sink = Mp4Sink(tmp_path / "x.mp4")
    await sink.start(W, H, FPS)
    with pytest.raises(ValueError, match=r"expected uint8 \(96, 128, 3\)"):
        await sink.send(VideoFrame(np.zeros((10, 10, 3), np.uint8), 0, np.zeros(SPF, np.float32)))
    with pytest.raises(ValueError, match="expected 640"):
        await sink.send(VideoFrame(np.zeros((H, W, 3), np.uint8), 0, np.zeros(320, np.float32)))
    await sink.close()
    with pytest.raises(FileSinkError, match="cannot create"):
        await Mp4Sink(tmp_path / "x.mp4" / "inside-a-file.mp4").start(W, H, FPS)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
async def test_full_disk_raises_clear_error() -> None:
    sink = Mp4Sink("/dev/full", gop=5)
    await sink.start(W, H, FPS)
    with pytest.raises(FileSinkError, match=r"writing /dev/full failed: .*No space left"):
        for i in range(200):  # the first fragment fails to write; a later send reports it
            await sink.send(VideoFrame(pattern_frame(i, W, H), i, np.zeros(SPF, np.float32)))
            await asyncio.sleep(0.005)
    with pytest.raises(FileSinkError):
        await sink.close()


KILLED_CHILD = r"""
import asyncio, sys, numpy as np
from avatar_agent.sinks.file import Mp4Sink
from avatar_agent.types import VideoFrame
from tests.sinks.conftest import pattern_frame, tone
async def main():
    sink = Mp4Sink(sys.argv[1])
    await sink.start(128, 96, 25)
    loop = asyncio.get_running_loop(); t0 = loop.time()
    for i in range(100000):
        await asyncio.sleep(max(0.0, t0 + i / 25 - loop.time()))
        await sink.send(VideoFrame(pattern_frame(i, 128, 96), i, tone(640, 440.0, start=i * 640)))
        print("sent", i, flush=True)
asyncio.run(main())
"""


def test_sigkill_leaves_playable_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.mp4"
    proc = subprocess.Popen([PY, "-c", KILLED_CHILD, str(path)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = -1
    deadline = time.monotonic() + 40
    assert proc.stdout is not None
    while sent < 70 and time.monotonic() < deadline:  # ~2.8 s of live recording
        line = proc.stdout.readline()
        if not line:
            break
        sent = int(line.split()[1])
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert sent >= 70, proc.stderr.read() if proc.stderr else ""
    times, images, audio, _a0 = decode(path)
    # everything but the fragment in progress (one second = 25 frames) survives
    assert len(times) >= (sent + 1) - 25 - 2, (len(times), sent)
    assert abs(bar_x(images[len(images) - 1]) - bar_x(pattern_frame(len(images) - 1, W, H))) <= 1
    assert audio.size / 48_000 >= (len(times) - 25) / FPS
