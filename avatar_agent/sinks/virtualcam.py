"""Virtual camera sink: the player's frames appear as a webcam (v4l2loopback on Linux).

pyvirtualcam is a *push* API: you call ``send`` and, usually, ``sleep_until_next_frame``.  Here the
player is the clock, so this sink never sleeps; it hands each frame to one writer thread through a
one-slot mailbox (latest frame wins, an overwritten frame is counted as dropped) so a slow or stuck
device never blocks the event loop.  Audio is not carried: a webcam has no audio track (a virtual
microphone sink carries the same slices).

Device setup on a real host (one device, visible to Chrome/Zoom/Meet)::

    sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label="avatar-agent"

``exclusive_caps=1`` makes the node report only CAPTURE once a writer has opened it; Chrome, Zoom
and Google Meet list a device as a camera only then.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import logging
import os
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from avatar_agent.queues import SyncDropOldest
from avatar_agent.sinks.writer import WriterThread
from avatar_agent.types import VideoFrame

log = logging.getLogger(__name__)

MODPROBE_LINE = 'sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label="avatar-agent"'
"""The command that creates a suitable device; every "no device" error repeats it."""

_PIP_LINE = "pip install 'avatar-agent[vcam]'  (or: pip install pyvirtualcam==0.15.0)"

Fourcc = Literal["I420", "YUYV"]

# VIDIOC_QUERYCAP = _IOR('V', 0, struct v4l2_capability); the struct is 104 bytes:
# driver[16] card[32] bus_info[32] version capabilities device_caps reserved[3].
_V4L2_CAP_STRUCT = struct.Struct("16s32s32sIII12x")
_VIDIOC_QUERYCAP = (2 << 30) | (_V4L2_CAP_STRUCT.size << 16) | (ord("V") << 8) | 0
_V4L2_CAP_VIDEO_OUTPUT = 0x00000002
_V4L2_CAP_DEVICE_CAPS = 0x80000000
_LOOPBACK_DRIVER = "v4l2 loopback"


class VirtualCamError(RuntimeError):
    """The virtual camera could not be opened or stopped working; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class VideoDevice:
    """One V4L2 node as seen by ``available_devices``.

    Attributes:
        path: device node, e.g. "/dev/video10".
        driver: driver name from VIDIOC_QUERYCAP ("v4l2 loopback" for a loopback device).
        card: the card label (``card_label=`` of the modprobe line).
        loopback: True for a v4l2loopback node (the only kind this sink can write to).
        output: True if the node currently accepts frames (VIDEO_OUTPUT capability).  With
            ``exclusive_caps=1`` a node that another writer holds reports capture only.
    """

    path: str
    driver: str
    card: str
    loopback: bool
    output: bool


def available_devices(pattern: str = "/dev/video*") -> list[VideoDevice]:
    """List V4L2 nodes matching ``pattern`` with their driver and capabilities (for ``check``).

    Nodes that cannot be opened or queried are skipped (they are not usable by this sink).
    """

    def node_number(path: str) -> tuple[int, str]:
        digits = "".join(c for c in os.path.basename(path) if c.isdigit())
        return (int(digits) if digits else -1, path)

    found: list[VideoDevice] = []
    for path in sorted(glob.glob(pattern), key=node_number):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            buf = bytearray(_V4L2_CAP_STRUCT.size)
            fcntl.ioctl(fd, _VIDIOC_QUERYCAP, buf, True)
        except OSError:
            continue
        finally:
            os.close(fd)
        driver, card, _bus, _version, caps, device_caps = _V4L2_CAP_STRUCT.unpack(bytes(buf))
        effective = device_caps if caps & _V4L2_CAP_DEVICE_CAPS else caps
        drv = driver.split(b"\0", 1)[0].decode(errors="replace")
        found.append(VideoDevice(
            path=path,
            driver=drv,
            card=card.split(b"\0", 1)[0].decode(errors="replace"),
            loopback=drv == _LOOPBACK_DRIVER,
            output=bool(effective & _V4L2_CAP_VIDEO_OUTPUT),
        ))
    return found


def rgb_to_yuyv(image: np.ndarray) -> np.ndarray:
    """Convert uint8 RGB [H, W, 3] (W even) to packed YUYV 4:2:2, BT.601 limited range.

    Returns uint8 [H, W * 2]: per pixel pair Y0 U Y1 V, chroma averaged over the pair.
    """
    h, w, _ = image.shape
    if w % 2:
        raise ValueError(f"YUYV needs an even frame width, got {w}; use fourcc='I420' or an even size")
    rgb = image.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0  # [H, W]
    rp = (r[:, 0::2] + r[:, 1::2]) * 0.5  # [H, W/2] chroma is shared by each pixel pair
    gp = (g[:, 0::2] + g[:, 1::2]) * 0.5
    bp = (b[:, 0::2] + b[:, 1::2]) * 0.5
    u = 128.0 + (-37.797 * rp - 74.203 * gp + 112.0 * bp) / 255.0  # [H, W/2]
    v = 128.0 + (112.0 * rp - 93.786 * gp - 18.214 * bp) / 255.0  # [H, W/2]
    out = np.empty((h, w // 2, 4), np.float32)  # [H, W/2, (Y0 U Y1 V)]
    out[..., 0] = y[:, 0::2]
    out[..., 1] = u
    out[..., 2] = y[:, 1::2]
    out[..., 3] = v
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(h, w * 2)


def _import_pyvirtualcam() -> Any:
    try:
        import pyvirtualcam
    except ImportError as e:  # optional dependency
        raise VirtualCamError(f"the virtual camera sink needs pyvirtualcam: {_PIP_LINE}") from e
    return pyvirtualcam


def _no_device_message(device: str | None, detail: str) -> str:
    where = f"device {device!r}" if device else "no v4l2loopback device in /dev/video[0-99]"
    return (
        f"virtual camera: {where} could not be opened ({detail.strip()}).\n"
        f"Create one with:\n    {MODPROBE_LINE}\n"
        "exclusive_caps=1 is required for Chrome, Zoom and Google Meet to list the camera; "
        "add video_nr=N to pin the node to /dev/videoN and pass that path as the sink's device. "
        "Your user must be in the 'video' group to write to it."
    )


class VirtualCamSink:
    """Pushes frames to a v4l2loopback device via pyvirtualcam.

    Args:
        device: node path such as "/dev/video10"; None picks the first loopback device.
        fourcc: pixel format written to the device: "I420" (YU12, what Chrome and most apps take;
            pyvirtualcam converts RGB natively) or "YUYV" (packed 4:2:2, converted here).
        name: sink name for logs and metrics.

    ``send`` never blocks: frames go to a writer thread through a one-slot mailbox.  If the writer
    fails (device gone, bad frame), the next ``send`` raises ``VirtualCamError`` with the cause, so
    the agent can log it and keep feeding its other sinks.
    """

    def __init__(self, device: str | None = None, fourcc: Fourcc = "I420",
                 name: str = "virtualcam") -> None:
        if fourcc not in ("I420", "YUYV"):
            raise ValueError(f"VirtualCamSink fourcc must be 'I420' or 'YUYV', got {fourcc!r}")
        self.name = name
        self.device = device
        self.fourcc: Fourcc = fourcc
        self.frames_written = 0
        self._dropped_before = 0                     # frames dropped by writers already closed
        self._cam: Any = None
        self._size: tuple[int, int] = (0, 0)
        self._writer: WriterThread[VideoFrame] | None = None

    @property
    def frames_dropped(self) -> int:
        """Frames overwritten in the mailbox because the writer fell behind by a whole frame."""
        w = self._writer
        return self._dropped_before + (w.queue.dropped if w is not None else 0)

    @property
    def device_path(self) -> str | None:
        """The node actually opened (after ``start``), else the requested one."""
        return self._cam.device if self._cam is not None else self.device

    async def start(self, width: int, height: int, fps: int) -> None:
        """Open the device (in a thread: opening a FIFO or a busy node may block)."""
        if self._cam is not None:
            raise VirtualCamError(f"{self.name}: start() called twice")
        if width <= 0 or height <= 0 or fps <= 0:
            raise ValueError(f"{self.name}: width/height/fps must be positive, got {width}x{height}@{fps}")
        if width % 2 or height % 2:
            raise ValueError(f"{self.name}: 4:2:0/4:2:2 output needs an even frame size, got {width}x{height}")
        pyvirtualcam = _import_pyvirtualcam()
        fmt = pyvirtualcam.PixelFormat.RGB if self.fourcc == "I420" else pyvirtualcam.PixelFormat.YUYV

        def open_camera() -> Any:
            try:
                return pyvirtualcam.Camera(width, height, fps, fmt=fmt, device=self.device,
                                           backend="v4l2loopback")
            except Exception as e:  # pyvirtualcam raises RuntimeError/ValueError with its reason
                raise VirtualCamError(_no_device_message(self.device, str(e))) from e

        self._cam = await asyncio.to_thread(open_camera)
        self._size = (width, height)
        # The mailbox: one slot, latest frame wins; on close the frame in it is still written.
        self._writer = WriterThread(f"{self.name}-writer", SyncDropOldest[VideoFrame](1),
                                    self._write, on_error=self._failed)
        self._writer.start()
        log.info("%s: writing %dx%d %s to %s", self.name, width, height, self.fourcc, self._cam.device)

    async def send(self, frame: VideoFrame) -> None:
        """Queue a frame for the device (latest wins); raises VirtualCamError if the writer failed."""
        writer = self._writer
        if writer is not None and writer.error is not None:
            raise VirtualCamError(f"{self.name}: device {self.device_path} failed: {writer.error}") from writer.error
        if self._cam is None or writer is None:
            raise VirtualCamError(f"{self.name}: send() before start()")
        w, h = self._size
        if frame.image.shape != (h, w, 3) or frame.image.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: frame {frame.index} is {frame.image.dtype} {frame.image.shape}, "
                f"the device was started for uint8 ({h}, {w}, 3)")
        writer.put(frame)

    async def close(self) -> None:
        """Stop the writer and release the device."""
        w = self._writer
        if w is not None:
            w.stop()
            await asyncio.to_thread(w.join, 5.0)
        cam, self._cam = self._cam, None
        if cam is not None:
            await asyncio.to_thread(cam.close)

    def _write(self, frame: VideoFrame) -> None:
        """Writer thread: one frame to the device."""
        cam = self._cam
        data = frame.image if self.fourcc == "I420" else rgb_to_yuyv(frame.image)
        cam.send(np.ascontiguousarray(data))
        self.frames_written += 1
        # pyvirtualcam only prints write errors to stderr; a vanished node (module unloaded,
        # device removed) is the failure we can see, so check once a second.
        if self.frames_written % max(1, int(round(cam.fps))) == 0 and not os.path.exists(cam.device):
            raise OSError(f"{cam.device} disappeared (v4l2loopback unloaded?)")

    def _failed(self, e: BaseException) -> None:
        log.error("%s: writing to %s failed: %s", self.name, self.device_path, e)
