"""Shared fixtures for the sink tests: the fake v4l2 shim and synthetic frames/audio."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="session")
def fakev4l2_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build tests/sinks/fakev4l2.c into a shared object (LD_PRELOAD shim) once per session."""
    gcc = shutil.which("gcc")
    if gcc is None:
        from tests.conftest import missing

        missing("gcc is needed to build the fake v4l2 shim")
    out = tmp_path_factory.mktemp("fakev4l2") / "fakev4l2.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(out), str(HERE / "fakev4l2.c"), "-ldl"],
                   check=True, capture_output=True)
    return out


class FifoCamera:
    """The webcam consumer of a fake v4l2 FIFO: a thread reading whole frames as they arrive,
    with their arrival times (up to ``limit`` frames, or until the writer closes)."""

    def __init__(self, path: str, frame_bytes: int, limit: int | None = None) -> None:
        import threading
        import time

        self.frames: list[bytes] = []
        self.stamps: list[float] = []

        def run() -> None:
            with open(path, "rb", buffering=0) as f:
                buf = b""
                while limit is None or len(self.frames) < limit:
                    chunk = f.read(frame_bytes - len(buf))
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) == frame_bytes:
                        self.frames.append(buf)
                        self.stamps.append(time.monotonic())
                        buf = b""

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a Python child that imports avatar_agent from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


PY = sys.executable


def tone(n: int, freq: float, start: int = 0, amp: float = 0.5, rate: int = 16_000) -> np.ndarray:
    """float32 sine samples [n], phase-continuous from sample ``start``."""
    t = (np.arange(n) + start) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def pattern_frame(index: int, w: int, h: int) -> np.ndarray:
    """uint8 RGB [h, w, 3]: a bar whose x position moves with the frame index."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 2] = 60
    x = (index * 4) % max(1, w - 8)
    img[:, x : x + 8, 0] = 255
    img[: h // 4, :, 1] = (index * 9) % 256
    return img


# ---- a live stream for the WebRTC tests (also imported by tests/server/test_app.py) ----------

@dataclass
class LiveStream:
    """A started WebRtcSink behind the real aiohttp app, fed by a 25 fps test player."""

    url: str
    sink: object
    frames_sent: int = 0
    player_error: BaseException | None = None
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def loopback_ice() -> Iterator[None]:
    """Hermetic ICE: aioice offers only 127.0.0.1 (it normally skips loopback addresses)."""
    import aioice.ice

    saved = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = saved


@contextlib.asynccontextmanager
async def live_stream(w: int = 160, h: int = 120, fps: int = 25, freq: float = 440.0,
                      amp: float = 0.5, extra_routes: list | None = None,
                      connect_timeout: float = 30.0, token: str = "",
                      **sink_kw: Any) -> AsyncIterator[LiveStream]:
    """Start sink + app + server on 127.0.0.1:<free port> + a player task; tear all down after.

    ``token``: also install the server's security middlewares with this bearer token.
    """
    from avatar_agent.server.app import make_app, runner_urls, serve
    from avatar_agent.sinks.webrtc import WebRtcSink
    from avatar_agent.types import VideoFrame

    sink = WebRtcSink(connect_timeout=connect_timeout, **sink_kw)
    await sink.start(w, h, fps)
    app = make_app(sink, extra_routes)
    if token:
        from avatar_agent.server.security import SecuritySettings, install

        install(app, SecuritySettings(token=token))
    runner = await serve(app, host="127.0.0.1", port=0)
    live = LiveStream(url=runner_urls(runner)[0], sink=sink)
    spf = 16_000 // fps

    async def player() -> None:  # the clock: one frame + its audio slice every 1/fps
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        i = 0
        try:
            while True:
                await asyncio.sleep(max(0.0, t0 + i / fps - loop.time()))
                await sink.send(VideoFrame(pattern_frame(i, w, h), i, tone(spf, freq, i * spf, amp)))
                live.frames_sent = i = i + 1
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # surfaced by the tests
            live.player_error = e

    task = asyncio.create_task(player())
    try:
        yield live
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
        await sink.close()
