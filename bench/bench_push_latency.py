"""Pushed audio → first frame carrying it, for a chatbot on the session server.

Starts ``avatar-agent serve`` (embedded profile), opens a session, watches it with an aiortc
WHEP viewer, then pushes a short voiced burst over HTTP ``--n`` times and prints, per figure, the
median and 90th percentile in ms:

* ``at_sink``: push → the session's ``speech_started`` event, which the server emits when the
  frame carrying the burst's first audio is sent to the sinks (no network, no jitter buffer);
* ``at_viewer_rtp``: push → arrival at the aiortc viewer of the RTP packet that carries the
  burst's first loud audio (network and packetisation, before the viewer's jitter buffer);
* ``at_viewer``: push → that audio decoded by the aiortc viewer (after its jitter buffer);
* ``interrupt_to_silence``: POST interrupt (mid-burst) → the first silent packet at the viewer.

    python bench/bench_push_latency.py [--n 20] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription

ROOT = Path(__file__).resolve().parents[1]


def _burst(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.4 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return (x * 32767).astype("<i2").tobytes()


ARRIVALS: list[float] = []
"""When each audio RTP packet reached the viewer (before the jitter buffer), in order; one Opus
packet = one 20 ms decoded frame, and loopback neither loses nor reorders packets."""


def _record_rtp_arrivals() -> None:
    from aiortc.rtcrtpreceiver import RTCRtpReceiver

    original = RTCRtpReceiver._handle_rtp_packet

    async def handle(self: Any, packet: Any, arrival_time_ms: int) -> None:
        if getattr(self, "_RTCRtpReceiver__kind", "") == "audio":
            ARRIVALS.append(time.monotonic())
        await original(self, packet, arrival_time_ms)

    RTCRtpReceiver._handle_rtp_packet = handle


class Viewer:
    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.loud: list[float] = []          # decode time of each audio frame with energy
        self.loud_rtp: list[float] = []      # and its packet's arrival time
        self.quiet: list[float] = []
        self.frames = 0
        self.decoded = 0                     # audio frames decoded so far

    async def consume(self, track: Any) -> None:
        while True:
            frame = await track.recv()
            now = time.monotonic()
            if track.kind == "video":
                self.frames += 1
                continue
            pcm = frame.to_ndarray().astype(np.float32) / 32768
            k, self.decoded = self.decoded, self.decoded + 1
            if np.sqrt(np.mean(pcm ** 2)) > 0.02:
                self.loud_rtp.append(ARRIVALS[k] if k < len(ARRIVALS) else now)
                self.loud.append(now)
            else:
                self.quiet.append(now)


async def run(n: int, sets: list[str]) -> dict[str, Any]:
    _record_rtp_arrivals()
    cmd = [sys.executable, "-m", "avatar_agent.cli", "serve", "--set", "server.port=0",
           "--set", "server.rate_push_per_min=100000", "--set",
           "server.rate_interrupt_per_min=100000"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = ""
    while not url:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("the server did not start")
        m = re.search(r"session server on (http://\S+/)", line)
        url = m.group(1) if m else ""
    log: list[str] = []
    asyncio.get_running_loop().run_in_executor(None, lambda: log.extend(proc.stdout))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "v1/sessions", json={}) as r:
                sess = await r.json()
            base = url + sess["id"].join(["v1/sessions/", "/"])
            v = Viewer()
            v.pc.addTransceiver("video", direction="recvonly")
            v.pc.addTransceiver("audio", direction="recvonly")
            tasks = []
            v.pc.on("track", lambda t: tasks.append(asyncio.ensure_future(v.consume(t))))
            await v.pc.setLocalDescription(await v.pc.createOffer())
            async with http.post(base + "whep", data=v.pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as r:
                answer = await r.text()
            await v.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            while v.frames < 50:
                await asyncio.sleep(0.05)
            events: list[tuple[float, dict]] = []

            async def listen() -> None:
                async with http.get(base + "events", timeout=aiohttp.ClientTimeout()) as r:
                    kind = None
                    async for raw in r.content:
                        line = raw.decode().strip()
                        if line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:") and kind == "speech_started":
                            events.append((time.monotonic(), json.loads(line[5:])))

            listener = asyncio.ensure_future(listen())
            await asyncio.sleep(0.5)
            sink, viewer, viewer_rtp, stop = [], [], [], []
            for k in range(n):
                await asyncio.sleep(1.5 + 0.37 * (k % 3))       # idle in between; vary the phase
                ne, nl = len(events), len(v.loud)
                t0 = time.monotonic()
                async with http.post(base + "audio?rate=16000&format=s16le",
                                     data=_burst(0.8)) as r:
                    assert r.status == 200, (await r.text()) + "".join(log[-40:])
                while len(events) == ne or len(v.loud) == nl:
                    await asyncio.sleep(0.002)
                    if time.monotonic() - t0 > 5:
                        break
                if len(events) > ne:
                    sink.append(events[ne][0] - t0)
                if len(v.loud) > nl:
                    viewer.append(v.loud[nl] - t0)
                    viewer_rtp.append(v.loud_rtp[nl] - t0)
                await asyncio.sleep(0.3)                        # mid-burst
                nq = len(v.quiet)
                t1 = time.monotonic()
                async with http.post(base + "interrupt", data=b"") as r:
                    assert r.status == 200
                while len(v.quiet) == nq and time.monotonic() - t1 < 3:
                    await asyncio.sleep(0.002)
                if len(v.quiet) > nq:
                    stop.append(v.quiet[nq] - t1)
            listener.cancel()
            for t in tasks:
                t.cancel()
            await v.pc.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)

    def stats(x: list[float]) -> dict[str, float]:
        a = 1000 * np.array(x)
        return {"p50_ms": round(float(np.median(a)), 1), "p90_ms": round(float(np.percentile(a, 90)), 1),
                "n": len(a)} if len(a) else {"n": 0}

    return {"at_sink": stats(sink), "at_viewer_rtp": stats(viewer_rtp),
            "at_viewer": stats(viewer), "interrupt_to_silence": stats(stop)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    print(json.dumps(asyncio.run(run(a.n, a.set))))


if __name__ == "__main__":
    main()
