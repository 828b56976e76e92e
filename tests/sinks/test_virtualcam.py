"""VirtualCamSink through pyvirtualcam's real native backend, against a fake v4l2loopback node.

The kernel here has no module loader, so /dev/videoN cannot exist.  tests/sinks/fakev4l2.c is
LD_PRELOADed into a child process and answers the two ioctls pyvirtualcam issues for paths under
$FAKE_V4L2_PREFIX; everything else (open, the RGB→I420 conversion, write) is the real code path.
The test reads what a webcam consumer would read: the bytes written to the node.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from avatar_agent.sinks.virtualcam import (
    MODPROBE_LINE, VirtualCamError, VirtualCamSink, available_devices, rgb_to_yuyv,
)
from avatar_agent.types import VideoFrame
from tests.sinks.conftest import PY, FifoCamera, child_env

W, H = 64, 48

CHILD = r"""
import asyncio, sys, numpy as np
from avatar_agent.sinks.virtualcam import VirtualCamSink, VirtualCamError
from avatar_agent.types import VideoFrame
device, fourcc, n, fps, unlink_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
async def main():
    sink = VirtualCamSink(device=device, fourcc=fourcc)
    await sink.start(64, 48, fps)
    red = np.zeros((48, 64, 3), np.uint8); red[..., 0] = 255
    loop = asyncio.get_running_loop(); t0 = loop.time()
    try:
        for i in range(n):
            if i == unlink_at:
                import os; os.unlink(device)
            # the test's player: the clock lives here, the sink never sleeps
            await asyncio.sleep(max(0.0, t0 + i / fps - loop.time()))
            await sink.send(VideoFrame(image=red, index=i, audio=np.zeros(640, np.float32)))
    except VirtualCamError as e:
        print("ERROR", i, e, flush=True)
    await sink.close()
    print("DONE", sink.frames_written, sink.frames_dropped, sink.device_path, flush=True)
asyncio.run(main())
"""


def run_child(so: Path, prefix: str, device: str, fourcc: str, n: int, fps: int = 25,
              unlink_at: int = -1, log: str = "") -> subprocess.Popen:
    env = child_env(LD_PRELOAD=str(so), FAKE_V4L2_PREFIX=prefix, FAKE_V4L2_LOG=log)
    return subprocess.Popen([PY, "-c", CHILD, device, fourcc, str(n), str(fps), str(unlink_at)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_i420_fifo_bytes_colour_and_pacing(fakev4l2_so: Path, tmp_path: Path) -> None:
    prefix = str(tmp_path / "fake-")
    dev = prefix + "video0"
    os.mkfifo(dev)
    log = tmp_path / "sfmt.log"
    n, frame_bytes = 30, W * H * 3 // 2
    cam = FifoCamera(dev, frame_bytes)     # the webcam consumer
    frames, stamps, t = cam.frames, cam.stamps, cam.thread
    proc = run_child(fakev4l2_so, prefix, dev, "I420", n, log=str(log))
    out, err = proc.communicate(timeout=60)
    t.join(10)
    assert proc.returncode == 0, err
    assert out.split()[0] == "DONE", out
    assert log.read_text().split() == ["64", "48", "YU12"]  # S_FMT asked for planar YUV 4:2:0

    assert len(frames) == n  # nothing dropped at 25 fps, every frame exactly w*h*3/2 bytes
    f = np.frombuffer(frames[-1], np.uint8)
    y, u, v = f[: W * H], f[W * H : W * H * 5 // 4], f[W * H * 5 // 4 :]
    # BT.601 limited-range red: Y 82, U 90, V 240 (pyvirtualcam's integer path gives 239)
    assert abs(int(np.median(y)) - 82) <= 1
    assert abs(int(np.median(u)) - 90) <= 1
    assert abs(int(np.median(v)) - 240) <= 1

    # Pacing comes from the (test) player: the consumer sees ~40 ms between frames.
    intervals = np.diff(stamps[1:])  # the first frame waits for the reader to open
    assert 0.030 < float(np.mean(intervals)) < 0.055, intervals


def test_yuyv_regular_file(fakev4l2_so: Path, tmp_path: Path) -> None:
    prefix = str(tmp_path / "fake-")
    dev = prefix + "video0"
    Path(dev).touch()
    log = tmp_path / "sfmt.log"
    n = 10
    proc = run_child(fakev4l2_so, prefix, dev, "YUYV", n, fps=100, log=str(log))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert log.read_text().split() == ["64", "48", "YUYV"]
    data = np.frombuffer(Path(dev).read_bytes(), np.uint8)
    written = int(out.split()[1])
    assert data.size == written * W * H * 2 and written >= n - 2  # a 100 fps burst may overwrite a slot
    quad = data[: W * H * 2].reshape(H, W // 2, 4)
    for channel, want in ((0, 82), (1, 90), (2, 82), (3, 240)):  # Y0 U Y1 V of BT.601 red
        values = np.unique(quad[..., channel])
        assert values.size == 1 and abs(int(values[0]) - want) <= 1, (channel, values)


def test_rgb_to_yuyv_primaries() -> None:
    img = np.zeros((2, 4, 3), np.uint8)
    img[:, 0:2] = (255, 255, 255)
    img[:, 2:4] = (0, 0, 255)
    q = rgb_to_yuyv(img).reshape(2, 2, 4)
    assert q[0, 0].tolist() == [235, 128, 235, 128]  # white: Y 235, neutral chroma
    assert q[0, 1].tolist() == [41, 240, 41, 110]  # blue: Y 41, U 240, V 110
    with pytest.raises(ValueError, match="even frame width"):
        rgb_to_yuyv(np.zeros((2, 3, 3), np.uint8))


def test_failing_device_raises_clear_error(fakev4l2_so: Path, tmp_path: Path) -> None:
    prefix = str(tmp_path / "fake-")
    dev = prefix + "video0"
    Path(dev).touch()
    proc = run_child(fakev4l2_so, prefix, dev, "I420", 80, unlink_at=10)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("ERROR"))
    i = int(line.split()[1])
    assert 10 < i <= 10 + 25 + 2  # noticed within about one second of frames
    assert "disappeared" in line and dev in line


def test_available_devices_sees_loopback_node(fakev4l2_so: Path, tmp_path: Path) -> None:
    prefix = str(tmp_path / "fake-")
    Path(prefix + "video3").touch()
    Path(prefix + "video1").touch()
    code = ("import sys; from avatar_agent.sinks.virtualcam import available_devices as a;"
            "print([(d.path[-6:], d.driver, d.card, d.loopback, d.output) for d in a(sys.argv[1])])")
    env = child_env(LD_PRELOAD=str(fakev4l2_so), FAKE_V4L2_PREFIX=prefix)
    out = subprocess.run([PY, "-c", code, prefix + "video*"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == str([("video1", "v4l2 loopback", "fake avatar-agent", True, True),
                               ("video3", "v4l2 loopback", "fake avatar-agent", True, True)])
    # Without the shim a regular file answers no V4L2 ioctl, so it is not listed.
    assert available_devices(prefix + "video*") == []


async def test_no_device_error_gives_modprobe_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "video42")
    for device in (None, missing):
        if device is None and any(d.loopback for d in available_devices()):
            continue  # a real loopback device exists on this host
        sink = VirtualCamSink(device=device)
        with pytest.raises(VirtualCamError) as info:
            await sink.start(64, 48, 25)
        msg = str(info.value)
        assert MODPROBE_LINE in msg
        assert "exclusive_caps=1" in msg and "Chrome" in msg
        if device:
            assert missing in msg


async def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fourcc"):
        VirtualCamSink(fourcc="RGB")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="even frame size"):
        await VirtualCamSink().start(63, 48, 25)
    with pytest.raises(VirtualCamError, match="before start"):
        await VirtualCamSink().send(VideoFrame(np.zeros((48, 64, 3), np.uint8), 0, np.zeros(640, np.float32)))


def _no_loopback_reason() -> str | None:
    if not os.path.exists("/proc/modules"):
        return "v4l2loopback cannot load: this kernel has no module loader"
    if not any(d.loopback and d.output for d in available_devices()):
        return f"no free v4l2loopback device; run: {MODPROBE_LINE}"
    return None


@pytest.mark.hostonly
@pytest.mark.skipif(_no_loopback_reason() is not None, reason=str(_no_loopback_reason()))
async def test_real_v4l2loopback_device() -> None:
    """On a host with v4l2loopback: frames reach the device and a reader gets them back."""
    dev = next(d.path for d in available_devices() if d.loopback and d.output)
    sink = VirtualCamSink(device=dev)
    await sink.start(W, H, 25)
    red = np.zeros((H, W, 3), np.uint8)
    red[..., 0] = 255
    for i in range(25):
        await sink.send(VideoFrame(red, i, np.zeros(640, np.float32)))
        await asyncio.sleep(0.04)
    fd = os.open(dev, os.O_RDONLY)
    try:
        data = np.frombuffer(os.read(fd, W * H * 3 // 2), np.uint8)
    finally:
        os.close(fd)
        await sink.close()
    assert data.size == W * H * 3 // 2
    assert abs(int(np.median(data[: W * H])) - 82) <= 1
    assert sink.frames_written >= 20
