"""PipeSource over real sockets and a real stdin pipe."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avatar_agent.audio.pipe import PipeSource
from avatar_agent.types import FRAME_SAMPLES, SAMPLE_RATE

pytestmark = pytest.mark.timeout(60)


def pcm16(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32767, n, dtype=np.int16)


async def collect(src: PipeSource, limit: int | None = None) -> list:
    out = []
    async for f in src.frames():
        out.append(f)
        if limit is not None and len(out) >= limit:
            break
    return out


def check_frames(frames) -> np.ndarray:
    assert [f.index for f in frames] == [k * FRAME_SAMPLES for k in range(len(frames))]
    return np.concatenate([f.samples for f in frames])


async def test_socketpair_frames_equal_input():
    x = pcm16(16000 + 123)  # 1 s and a partial frame
    a, b = socket.socketpair()
    src = PipeSource(16000, 1, path=a)

    async def produce() -> None:
        data = x.astype("<i2").tobytes()
        loop = asyncio.get_running_loop()
        # Odd-sized writes: samples split across reads must be reassembled.
        for k in range(0, len(data), 777):
            await loop.sock_sendall(b, data[k:k + 777])
            await asyncio.sleep(0)
        b.close()

    b.setblocking(False)
    frames, _ = await asyncio.gather(collect(src), produce())
    y = check_frames(frames)
    assert y.size == 51 * FRAME_SAMPLES  # 16123 samples → 50 frames + one zero-padded
    np.testing.assert_array_equal(y[: x.size], x.astype(np.float32) / 32768.0)
    assert not y[x.size:].any()
    assert src.bytes_in == 2 * x.size
    a.close()


async def test_unix_socket_stereo_48k_consecutive_producers(tmp_path):
    path = tmp_path / "pcm.sock"
    src = PipeSource(48000, 2, path=str(path))
    t = np.arange(48000) / 48000
    left = (0.5 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)
    right = np.zeros_like(left)
    inter = np.stack([left, right], 1).reshape(-1).astype("<i2").tobytes()

    async def produce() -> None:
        while not path.exists():
            await asyncio.sleep(0.01)
        for part in (inter[: len(inter) // 2], inter[len(inter) // 2:]):  # two connections
            _, w = await asyncio.open_unix_connection(str(path))
            w.write(part)
            await w.drain()
            w.close()
            await w.wait_closed()
            await asyncio.sleep(0.05)

    task = asyncio.ensure_future(collect(src, limit=45))
    await produce()
    frames = await asyncio.wait_for(task, 10)
    await src.close()
    assert src.connections == 2
    assert not path.exists()  # the socket file is removed on close
    y = check_frames(frames)
    ref = 0.25 * np.sin(2 * np.pi * 300 * np.arange(y.size) / SAMPLE_RATE)  # (L + R) / 2
    sl = slice(2000, y.size - 2000)
    assert np.abs(y[sl] - ref[sl]).max() < 2e-3


def test_stdin_pipe_in_a_child_process():
    x = pcm16(8000, seed=3)
    code = (
        "import asyncio, sys, numpy as np\n"
        "from avatar_agent.audio.pipe import PipeSource\n"
        "async def main():\n"
        "    fr = [f async for f in PipeSource(16000, 1).frames()]\n"
        "    y = np.concatenate([f.samples for f in fr])\n"
        "    np.save(sys.stdout.buffer, y)\n"
        "asyncio.run(main())\n")
    p = subprocess.run([sys.executable, "-c", code], input=x.astype("<i2").tobytes(),
                       capture_output=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr.decode()
    import io

    y = np.load(io.BytesIO(p.stdout))
    assert y.size == 25 * FRAME_SAMPLES
    np.testing.assert_array_equal(y[: x.size], x.astype(np.float32) / 32768.0)


def test_bad_parameters():
    with pytest.raises(ValueError, match="pipe_rate"):
        PipeSource(0, 1)
    with pytest.raises(ValueError, match="pipe_channels"):
        PipeSource(16000, 0)


async def test_refuses_to_replace_a_regular_file(tmp_path):
    f = tmp_path / "important.txt"
    f.write_text("keep me")
    src = PipeSource(16000, 1, path=str(f))
    with pytest.raises(ValueError, match="not a socket"):
        await collect(src)
    assert f.read_text() == "keep me"
