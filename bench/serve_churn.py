"""Session churn on a real sharded ``avatar-agent serve``: leaks and errors over minutes.

Starts ``serve`` (``server.shards`` as given, loopback, a token), keeps ``--sessions`` sessions
open, each with an event stream and a ``say`` every few seconds; every ``--every`` seconds one
session is closed and a new one opened, and every other time a raw PCM upload and an audio
WebSocket stream go to a random session.  Prints one JSON object: calls made, unexpected
answers (anything but 2xx, and 503/429 which admission and rate limits may give), the RSS of
the parent and its shards every 10 steps from when every slot has churned once (warm caches
and the allocator's first high-water mark do not count as growth), shard restarts, and the
server's ERROR lines and tracebacks.

    python bench/serve_churn.py [--minutes 5] [--sessions 8] [--shards 2] [--size 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from typing import Any

import aiohttp
import numpy as np
import psutil

TOKEN = "churn-bench-token-0123456789"


def _rss_mb(pid: int) -> float:
    p = psutil.Process(pid)
    procs = [p, *p.children()]
    return round(sum(q.memory_info().rss for q in procs) / 1e6, 1)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--every", type=float, default=3.0, help="seconds between churn steps")
    args = ap.parse_args()

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "avatar_agent.cli", "serve", "--set", "server.port=0",
        "--set", f"server.shards={args.shards}", "--set", f"render.size={args.size}",
        "--set", f"server.token={TOKEN}", "--set", "server.rate_offer_per_min=6000",
        "--set", "server.rate_say_per_min=6000", "--set", "server.rate_push_per_min=6000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    lines: list[str] = []
    url = ""

    async def read() -> None:
        nonlocal url
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            if m := re.search(r"session server on (http://\S+/) ", line):
                url = m.group(1)

    reader = asyncio.create_task(read())
    while not url:
        if proc.returncode is not None:
            raise SystemExit("\n".join(lines[-20:]))
        await asyncio.sleep(0.2)

    calls: dict[str, int] = {}
    odd: list[str] = []
    rng = random.Random(0)
    pcm = (0.3 * np.sin(2 * np.pi * 180 * np.arange(16000) / 16000) * 32767).astype("<i2")

    def count(kind: str, status: int) -> None:
        calls[kind] = calls.get(kind, 0) + 1
        if not (200 <= status < 300 or status in (429, 503)):
            odd.append(f"{kind} {status}")

    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"},
                                 timeout=aiohttp.ClientTimeout(total=30))
    live: dict[str, list[asyncio.Task[None]]] = {}

    async def events(sid: str) -> None:
        async with http.get(f"{url}v1/sessions/{sid}/events",
                            timeout=aiohttp.ClientTimeout(total=None)) as r:
            count("events", r.status)
            async for _ in r.content:
                pass

    async def talk(sid: str) -> None:
        while True:
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            async with http.post(f"{url}v1/sessions/{sid}/say",
                                 json={"text": "Hello again, this is a churn test."}) as r:
                count("say", r.status)

    async def open_one() -> None:
        async with http.post(url + "v1/sessions", json={}) as r:
            count("open", r.status)
            if r.status == 201:
                sid = (await r.json())["id"]
                live[sid] = [asyncio.create_task(events(sid)), asyncio.create_task(talk(sid))]

    async def close_one() -> None:
        sid = rng.choice(list(live))
        for t in live.pop(sid):
            t.cancel()
        async with http.delete(f"{url}v1/sessions/{sid}") as r:
            count("close", r.status)

    async def push_one(ws: bool) -> None:
        sid = rng.choice(list(live))
        if not ws:
            async with http.post(f"{url}v1/sessions/{sid}/audio",
                                 params={"rate": "16000", "format": "s16le"},
                                 data=pcm.tobytes()) as r:
                count("push", r.status)
            return
        async with http.ws_connect(url.replace("http", "ws", 1)
                                   + f"v1/sessions/{sid}/audio/ws") as w:
            await w.send_json({"rate": 16000, "channels": 1, "format": "s16le"})
            await w.receive_json(timeout=10)
            for k in range(0, len(pcm), 320):
                await w.send_bytes(pcm[k: k + 320].tobytes())
            await w.send_json({"final": True})
            kinds = [(await w.receive_json(timeout=10))["type"] for _ in range(2)]
            count("audio_ws", 200 if kinds == ["accepted", "finished"] else 500)

    for _ in range(args.sessions):
        await open_one()
    steps = int(args.minutes * 60 / args.every)
    rss: list[float] = []
    t0 = time.monotonic()
    for step in range(steps):
        await asyncio.sleep(args.every)
        if live:
            await close_one()
        await open_one()
        if live and step % 2 == 0:
            await push_one(ws=step % 4 == 0)
        if step >= args.sessions and (step - args.sessions) % 10 == 0:
            rss.append(_rss_mb(proc.pid))  # from when every slot has churned once
    rss.append(_rss_mb(proc.pid))
    async with http.get(url + "healthz") as r:
        health: dict[str, Any] = await r.json()
    for tasks in live.values():
        for t in tasks:
            t.cancel()
    await http.close()
    proc.terminate()
    code = await proc.wait()
    reader.cancel()
    print(json.dumps({
        "minutes": round((time.monotonic() - t0) / 60, 2), "sessions": args.sessions,
        "shards": args.shards, "size": args.size, "calls": calls, "unexpected": odd[:20],
        "rss_mb_start": rss[0], "rss_mb_end": rss[-1], "rss_mb_every_10_steps": rss,
        "restarts": [s["restarts"] for s in health["shards"]], "exit_status": code,
        "error_lines": _errors(lines),
    }))


def _errors(lines: list[str]) -> list[str]:
    """ERROR lines, and each traceback whole (up to 40 lines)."""
    out: list[str] = []
    for i, ln in enumerate(lines):
        if "Traceback" in ln:
            out += lines[i: i + 40]
        elif "ERROR" in ln:
            out.append(ln)
    return out[:200]


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    asyncio.run(main())
