"""CPU per WebRTC viewer: the session server's CPU with 0, 1, 2, … viewers on one session.

Starts ``avatar-agent serve`` (embedded profile, 512² unless ``--set render.size=…``), opens one
session that speaks all along (a pushed voiced burst every 2 s), then connects aiortc WHEP viewers
one step at a time and, for each count, reads the server process's CPU time (utime + stime from
/proc) over ``--seconds``.  The viewers run in this process, so their decoding is not counted.
Prints one JSON object: cores per count, the fps each viewer decoded, and the least-squares cost
of one more viewer (cores).  Figures only; nothing is asserted.

    python bench/bench_viewers.py [--counts 0 1 2 4] [--seconds 15] [--set key=value ...]
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
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _burst(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.4 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return (x * 32767).astype("<i2").tobytes()


class Viewer:
    """One recvonly WHEP viewer that counts decoded video frames."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.frames = 0
        self._tasks: list[asyncio.Future[None]] = []

    async def _consume(self, track: Any) -> None:
        while True:
            await track.recv()
            if track.kind == "video":
                self.frames += 1

    async def connect(self, http: aiohttp.ClientSession, whep: str) -> None:
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.on("track", lambda t: self._tasks.append(asyncio.ensure_future(self._consume(t))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http.post(whep, data=self.pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp"}) as r:
            if r.status != 201 and r.status != 200:
                raise SystemExit(f"WHEP offer refused: {r.status} {await r.text()}")
            answer = await r.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        t0 = time.monotonic()
        while self.frames < 10:
            if time.monotonic() - t0 > 20:
                raise SystemExit("a viewer received no video within 20 s")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.pc.close()


async def run(counts: list[int], seconds: float, sets: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "avatar_agent.cli", "serve", "--set", "server.port=0",
           "--set", "server.rate_push_per_min=100000", "--set", "server.rate_offer_per_min=1000",
           "--set", f"server.max_viewers={max(counts) + 1}"]
    for s in sets:
        cmd += ["--set", s]
    # (blocking start-up on purpose: nothing else runs on the loop yet)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,  # noqa: ASYNC220
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = ""
    while not url:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            raise SystemExit("the server did not start")
        m = re.search(r"session server on (http://\S+/)", line)
        url = m.group(1) if m else ""
    asyncio.get_running_loop().run_in_executor(None, lambda: [*proc.stdout] if proc.stdout else None)
    viewers: list[Viewer] = []
    rows: list[dict[str, float]] = []
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "v1/sessions", json={}) as r:
                sess = await r.json()
            base = url + sess["id"].join(["v1/sessions/", "/"])

            async def speak() -> None:
                while True:
                    async with http.post(base + "audio?rate=16000&format=s16le",
                                         data=_burst(1.2)) as r:
                        await r.read()
                    await asyncio.sleep(2.0)

            talker = asyncio.ensure_future(speak())
            await asyncio.sleep(3.0)                                  # warm-up
            for n in sorted(counts):
                while len(viewers) < n:
                    v = Viewer()
                    await v.connect(http, base + "whep")
                    viewers.append(v)
                await asyncio.sleep(2.0)                              # settle after joining
                c0, t0, f0 = _cpu_s(proc.pid), time.monotonic(), [v.frames for v in viewers]
                await asyncio.sleep(seconds)
                c1, t1 = _cpu_s(proc.pid), time.monotonic()
                fps = [(v.frames - f) / (t1 - t0) for v, f in zip(viewers, f0, strict=True)]
                rows.append({"viewers": n, "server_cores": round((c1 - c0) / (t1 - t0), 3),
                             "viewer_fps_min": round(min(fps), 2) if fps else None})
            talker.cancel()
            for v in viewers:
                await v.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    x = np.array([r["viewers"] for r in rows], float)
    y = np.array([r["server_cores"] for r in rows], float)
    per = float(np.polyfit(x, y, 1)[0]) if len(rows) >= 2 else float("nan")
    return {"rows": rows, "cores_per_viewer": round(per, 4), "seconds": seconds, "set": sets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.counts, args.seconds, args.set))))


if __name__ == "__main__":
    main()
