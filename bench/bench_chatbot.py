"""Chatbot-over-WebRTC latencies and per-peer CPU, against a real `avatar-agent start` process.

Prints:
  * say() → first mouth-open frame (and first audible audio) at an aiortc viewer;
  * pushed audio → first mouth-open frame / first audible audio, for PCM pushed over the
    WebSocket (/api/audio/ws) and for audio sent as the peer's WebRTC uplink track;
  * interrupt: from the /api/interrupt answer to the last audible packet at the viewer;
  * the agent process's CPU % with 0, 1 and 4 connected viewers (from /proc/<pid>/stat).

All times are wall-clock at the viewer (the client side), so they include the Opus/VP8 encode,
loopback RTP and aiortc's jitter buffer.  "Mouth open" = the dark share of the mouth box (the open
mouth's inside) exceeds twice its idle median.  Run: ``OMP_NUM_THREADS=1 python bench/bench_chatbot.py``.
The machine's other load shows up in the figures; rerun for a spread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from tests.sinks.conftest import loopback_ice  # noqa: E402
from tests.sinks.test_webrtc import PcmTrack, Viewer, connect, wait_for  # noqa: E402
from tests.test_chatbot_webrtc import mouth_darkness, speech48  # noqa: E402
from tests.test_live import agent_process  # noqa: E402

TEXT = "Hello, I am your assistant. How can I help you today?"
LOUD = 0.01   # RMS of a 20 ms packet that counts as audible


class Probe:
    """Timestamps of mouth-open frames and audible packets at one viewer."""

    def __init__(self, viewer: Viewer) -> None:
        self.v = viewer
        self.dark: list[tuple[float, float]] = []
        viewer.on_video = lambda img, pts: self.dark.append((time.monotonic(), mouth_darkness(img)))
        self.closed = 0.0

    def calibrate(self) -> None:
        self.closed = float(np.median([d for _, d in self.dark[-50:]]))

    def first_open(self, after: float) -> float | None:
        for t, d in self.dark:
            if t >= after and d > 2 * self.closed + 0.005:
                return t
        return None

    def first_audible(self, after: float) -> float | None:
        for t, a in zip(self.v.audio_times, self.v.audio, strict=False):
            if t >= after and float(np.sqrt(np.mean(a ** 2))) > LOUD:
                return t
        return None

    def last_audible(self, after: float) -> float | None:
        last = None
        for t, a in zip(self.v.audio_times, self.v.audio, strict=False):
            if t >= after and float(np.sqrt(np.mean(a ** 2))) > LOUD:
                last = t
        return last


def ms(x: float | None) -> str:
    return "  n/a" if x is None else f"{x * 1000:5.0f}"


def summary(name: str, xs: list[float | None]) -> None:
    ok = [x for x in xs if x is not None]
    vals = " ".join(ms(x) for x in xs)
    med = ms(float(np.median(ok))) if ok else "  n/a"
    print(f"  {name:<44} median {med} ms   (runs: {vals})", flush=True)


async def post(url: str, path: str, body: dict | None = None) -> dict:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        data = await r.json()
        if r.status >= 300:
            raise RuntimeError(f"{path}: {r.status} {data}")
        return data


async def quiet(probe: Probe, seconds: float = 1.0) -> None:
    """Wait until the viewer has heard ``seconds`` of silence (the previous speech ended)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while loop.time() < end:
        t = time.monotonic()
        last = probe.last_audible(t - 30)
        if last is None or t - last > seconds:
            return
        await asyncio.sleep(0.1)


async def ws_push(url: str, clip16: np.ndarray) -> float:
    """Stream 16 kHz float32 PCM in real time over /api/audio/ws; returns when the first block left."""
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "api/audio/ws") as ws:
        await ws.send_str(json.dumps({"rate": 16_000, "channels": 1, "format": "f32le"}))
        msg = await ws.receive_json()
        assert msg["type"] == "ready", msg
        t0 = time.monotonic()
        for k, i in enumerate(range(0, clip16.size, 320)):
            await asyncio.sleep(max(0.0, t0 + k * 0.02 - time.monotonic()))
            await ws.send_bytes(clip16[i : i + 320].astype("<f4").tobytes())
        await ws.send_str(json.dumps({"final": True}))
        with_timeout = asyncio.wait_for(ws.receive(), 10)
        await with_timeout
    return t0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


async def cpu_percent(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


async def main(runs: int, cpu_window: float) -> None:
    from avatar_agent.audio.tts import synthesize

    clip16 = synthesize(TEXT).audio
    clip48 = speech48(TEXT)
    print(f"bench_chatbot: agent `start` render.size=256, webrtc sink; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    with agent_process('sinks.enabled=["webrtc"]') as (proc, url), loopback_ice():
        # ---- CPU per connected peer (first, while nothing speaks)
        await asyncio.sleep(3.0)
        cpu = {0: await cpu_percent(proc.pid, cpu_window)}
        viewers: list[Viewer] = []
        for n in (1, 4):
            while len(viewers) < n:
                viewers.append(await connect(url))
            await wait_for(lambda: all(v.frames >= 25 for v in viewers), timeout=60)
            cpu[n] = await cpu_percent(proc.pid, cpu_window)
        for v in viewers:
            await v.close()
        print("agent process CPU (100 % = one core), idle avatar, no speech:")
        for n, c in cpu.items():
            print(f"  {n} viewer(s): {c:6.1f} %", flush=True)
        print(f"  ≈ {(cpu[4] - cpu[0]) / 4:.1f} % per connected viewer "
              f"(1 viewer: +{cpu[1] - cpu[0]:.1f} %)", flush=True)

        # ---- latencies, with one chatbot peer that also sends audio
        track = PcmTrack()
        bot = await connect(url, send=track)
        probe = Probe(bot)
        await wait_for(lambda: bot.frames >= 60, timeout=60)
        probe.calibrate()
        say_mouth, say_audio, ws_mouth, ws_audio, up_mouth, up_audio, cut = ([] for _ in range(7))
        for _ in range(runs):
            await quiet(probe)
            t0 = time.monotonic()
            await post(url, "api/say", {"text": TEXT})
            await asyncio.sleep(4.0)
            say_mouth.append(_d(probe.first_open(t0), t0))
            say_audio.append(_d(probe.first_audible(t0), t0))

            await quiet(probe)
            t0 = await ws_push(url, clip16)
            await asyncio.sleep(1.0)
            ws_mouth.append(_d(probe.first_open(t0), t0))
            ws_audio.append(_d(probe.first_audible(t0), t0))

            await quiet(probe)
            n_sent = len(track.sent_at)
            track.play(clip48)
            await wait_for(lambda: len(track.sent_at) > n_sent, timeout=10)
            t0 = track.sent_at[-1]
            await asyncio.sleep(clip48.size / 48_000 + 1.0)
            up_mouth.append(_d(probe.first_open(t0), t0))
            up_audio.append(_d(probe.first_audible(t0), t0))

            # interrupt: long speech, cut once audible
            await quiet(probe)
            t0 = time.monotonic()
            await post(url, "api/say", {"text": TEXT + " " + TEXT + " " + TEXT})
            await wait_for(lambda: probe.first_audible(t0) is not None, timeout=30)
            await asyncio.sleep(1.0)
            await post(url, "api/interrupt")
            t_ans = time.monotonic()
            await asyncio.sleep(1.5)
            last = probe.last_audible(t_ans)
            cut.append(0.0 if last is None else last - t_ans + 0.02)  # + the packet's 20 ms
        await bot.close()
        print(f"latencies at the viewer over {runs} run(s):")
        summary("say() → first mouth-open frame", say_mouth)
        summary("say() → first audible audio", say_audio)
        summary("WebSocket PCM push → first mouth-open frame", ws_mouth)
        summary("WebSocket PCM push → first audible audio", ws_audio)
        summary("WebRTC uplink audio → first mouth-open frame", up_mouth)
        summary("WebRTC uplink audio → first audible audio", up_audio)
        summary("interrupt answered → audio silent", cut)
        st = await _get(url + "status")
        print(f"  player: delivered {st['delivered']}, underruns {st['underruns']}, "
              f"late {st['late_dropped']}", flush=True)


def _d(t: float | None, t0: float) -> float | None:
    return None if t is None else t - t0


async def _get(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each latency measurement")
    ap.add_argument("--cpu-window", type=float, default=8.0, help="seconds per CPU measurement")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    asyncio.run(main(a.runs, a.cpu_window))
