"""Benchmark the output sinks: event-loop cost of send() and the throughput behind it.

Usage: OMP_NUM_THREADS=1 python bench/bench_sinks.py [file] [webrtc] [vcam] [--size 512] [--seconds 4]

Prints, per sink:
  file    offline encode speed (frames/s, H.264 veryfast crf 23 + AAC, 1 x264 thread) and the
          live-mode send() time (how long the player's tick is held).
  webrtc  send() time with 0/1/2 aiortc viewers on 127.0.0.1, and the fps each viewer decodes
          while the player runs at 25 fps.
  vcam    send() time and frames written through pyvirtualcam's native RGB→I420 path to a fake
          v4l2loopback node (LD_PRELOAD shim from tests/sinks/fakev4l2.c, built with gcc).
Numbers depend on the machine and on what else runs; the script prints them, it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avatar_agent.types import VideoFrame  # noqa: E402

FPS = 25
SPF = 16_000 // FPS


def frames(n: int, size: int) -> list[VideoFrame]:
    """Moving-gradient frames with a tone, precomputed so the bench measures only the sinks."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        img = np.stack([(xx + 3 * i) % 256, (yy + 2 * i) % 256, (xx + yy) // 2 % 256], -1).astype(np.uint8)
        t = (np.arange(SPF) + i * SPF) / 16_000
        out.append(VideoFrame(img, i, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)))
    return out


def ms(xs: list[float]) -> str:
    a = np.asarray(xs) * 1e3
    return f"mean {a.mean():.3f} ms, p99 {np.percentile(a, 99):.3f} ms, max {a.max():.3f} ms"


async def bench_file(size: int, seconds: float) -> None:
    from avatar_agent.sinks.file import Mp4Sink

    fr = frames(int(seconds * FPS), size)
    with tempfile.TemporaryDirectory() as d:
        sink = Mp4Sink(Path(d) / "offline.mp4", offline=True)
        await sink.start(size, size, FPS)
        t0 = time.perf_counter()
        for f in fr:
            await sink.send(f)
        await sink.close()
        dt = time.perf_counter() - t0
        mb = (Path(d) / "offline.mp4").stat().st_size / 1e6
        print(f"file   offline {size}x{size}: {len(fr)} frames in {dt:.2f} s = {len(fr) / dt:.1f} fps "
              f"({len(fr) / dt / FPS:.2f}x real time), {mb:.2f} MB")

        sink = Mp4Sink(Path(d) / "live.mp4")
        await sink.start(size, size, FPS)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        costs = []
        for i, f in enumerate(fr):
            await asyncio.sleep(max(0.0, t0 + i / FPS - loop.time()))
            c = time.perf_counter()
            await sink.send(f)
            costs.append(time.perf_counter() - c)
        await sink.close()
        print(f"file   live send() at 25 fps: {ms(costs)}; dropped {sink.frames_dropped}/{len(fr)}")


async def bench_webrtc(size: int, seconds: float) -> None:
    import aiohttp
    import aioice.ice
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    from avatar_agent.server.app import make_app, runner_urls, serve
    from avatar_agent.sinks.webrtc import WebRtcSink

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    fr = frames(FPS * 2, size)
    for n_viewers in (0, 1, 2):
        sink = WebRtcSink()
        await sink.start(size, size, FPS)
        runner = await serve(make_app(sink), port=0)
        url = runner_urls(runner)[0]
        counts = [0] * n_viewers
        pcs, tasks = [], []

        async def consume(track, k: int) -> None:
            try:
                while True:
                    await track.recv()
                    if track.kind == "video":
                        counts[k] += 1
            except MediaStreamError:
                pass

        for k in range(n_viewers):
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            pc.on("track", lambda track, k=k: tasks.append(asyncio.ensure_future(consume(track, k))))
            await pc.setLocalDescription(await pc.createOffer())
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                    ans = await r.json()
            await pc.setRemoteDescription(RTCSessionDescription(**ans))
            pcs.append(pc)
        loop = asyncio.get_running_loop()
        costs = []
        t0 = loop.time()
        n = int(seconds * FPS)
        warm = FPS  # first second: ICE/DTLS setup
        for i in range(n + warm):
            await asyncio.sleep(max(0.0, t0 + i / FPS - loop.time()))
            if i == warm:
                base = list(counts)
            c = time.perf_counter()
            await sink.send(VideoFrame(fr[i % len(fr)].image, i, fr[i % len(fr)].audio))
            costs.append(time.perf_counter() - c)
        got = [(c - b) / seconds for c, b in zip(counts, base, strict=False)] if n_viewers else []
        print(f"webrtc {size}x{size}, {n_viewers} viewer(s): send() {ms(costs)}; "
              f"viewer fps {', '.join(f'{g:.1f}' for g in got) or '-'} (player 25)")
        for pc in pcs:
            await pc.close()
        for t in tasks:
            t.cancel()
        await runner.cleanup()
        await sink.close()


VCAM_CHILD = r"""
import asyncio, sys, time, numpy as np
sys.path.insert(0, sys.argv[3])
from avatar_agent.sinks.virtualcam import VirtualCamSink
from bench.bench_sinks import frames, ms
async def main():
    size, seconds = int(sys.argv[2]), float(sys.argv[4])
    sink = VirtualCamSink(device=sys.argv[1], fourcc=sys.argv[5])
    await sink.start(size, size, 25)
    fr = frames(50, size); loop = asyncio.get_running_loop(); t0 = loop.time(); costs = []
    n = int(seconds * 25)
    for i in range(n):
        await asyncio.sleep(max(0.0, t0 + i / 25 - loop.time()))
        c = time.perf_counter(); await sink.send(fr[i % 50]); costs.append(time.perf_counter() - c)
    await sink.close()
    print(f"vcam   {size}x{size} {sys.argv[5]}: send() {ms(costs)}; written {sink.frames_written}/{n}, "
          f"dropped {sink.frames_dropped}")
asyncio.run(main())
"""


def bench_vcam(size: int, seconds: float) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        print("vcam   skipped: gcc not found (needed for the fake v4l2 shim)")
        return
    with tempfile.TemporaryDirectory() as d:
        so = Path(d) / "fakev4l2.so"
        subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-o", str(so), str(ROOT / "tests/sinks/fakev4l2.c"), "-ldl"],
                       check=True)
        for fourcc in ("I420", "YUYV"):
            dev = Path(d) / "fake-video0"
            dev.write_bytes(b"")
            env = dict(os.environ, LD_PRELOAD=str(so), FAKE_V4L2_PREFIX=str(Path(d) / "fake-"),
                       PYTHONPATH=str(ROOT))
            subprocess.run([sys.executable, "-c", VCAM_CHILD, str(dev), str(size), str(ROOT), str(seconds), fourcc],
                           env=env, check=True)
            dev.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="*", help="any of file, webrtc, vcam (default: all three)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    args.which = args.which or ["file", "webrtc", "vcam"]
    if set(args.which) - {"file", "webrtc", "vcam"}:
        ap.error(f"unknown sink(s) {sorted(set(args.which) - {'file', 'webrtc', 'vcam'})}; use file, webrtc, vcam")
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    if "file" in args.which:
        asyncio.run(bench_file(args.size, args.seconds))
    if "webrtc" in args.which:
        asyncio.run(bench_webrtc(args.size, args.seconds))
    if "vcam" in args.which:
        bench_vcam(args.size, args.seconds)


if __name__ == "__main__":
    from avatar_agent.quiet import native_log_filter

    with native_log_filter():            # mediapipe/TFLite info lines off the terminal
        main()
