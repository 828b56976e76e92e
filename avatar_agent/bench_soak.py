"""``avatar-agent bench --soak MINUTES``: the live agent under a chatbot's everyday load, in real
time: speech (say and pushed PCM), emotion changes, interrupts, WebRTC viewers coming and going,
and avatar swaps, while one viewer stays connected all along.  The viewers run in a child
process, as they would on other machines (their decoding is not the agent's work).

Prints one JSON object: fps and dropped % over the whole run, RSS (sampled every 15 s at the same
point of the viewer churn; printed every minute), its slope after the warm-up (linear fit, MB
per hour), and which calls the dropped frames followed.  Figures only; no pass/fail.

RSS is sampled twice each time: as it is, and right after a ``malloc_trim`` (what the agent's
own trimming thread does every minute).  The first swings with whichever burst the allocator
last served (±10 MB); the second is the memory in use, so a leak shows in its slope far sooner.

With each trimmed sample goes malloc's own count of the bytes still allocated
(``memory.heap_in_use``, glibc's mallinfo2; null elsewhere): if RSS grows while that stays flat,
the growth is freed memory the heaps could not hand back (fragmentation), not a leak.

The harness runs in the agent's process, so its own bookkeeping is bounded too: the watcher's
frame reports and the recent calls live in short deques and drops are attributed as they happen
(kept as lists they grew ≈ 0.6 MB/h, a third of the 2 MB/h the soak is meant to bound).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .memory import heap_in_use, trim_now
from .metrics import rss_bytes

_LINES = ("Hello, how can I help you today?", "Let me check that for you.",
          "Here is what I found: the weather will be sunny with a light breeze.",
          "Is there anything else you would like to know?")


async def _viewer(url: str, seconds: float | None, counter: list[int]) -> None:
    """A WHEP-less WebRTC viewer of ``start``'s /offer: counts video frames; leaves after
    ``seconds`` (None: when cancelled)."""
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    tasks: list[asyncio.Task[None]] = []

    async def consume(track: Any) -> None:
        while True:
            await track.recv()
            if track.kind == "video":
                counter[0] += 1

    pc.on("track", lambda t: tasks.append(asyncio.ensure_future(consume(t))))
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "offer", json={"sdp": pc.localDescription.sdp,
                                                   "type": "offer"}) as r:
                body = await r.json()
        await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], body["type"]))
        await asyncio.sleep(seconds if seconds is not None else 1e9)
    finally:
        for t in tasks:
            t.cancel()
        await pc.close()


async def soak(cfg: Config, minutes: float) -> dict[str, Any]:
    """Run the soak and return its figures."""
    import aiohttp

    from .agent import Agent
    from .audio.tts import synthesize
    from .clock import SystemClock
    from .server.app import runner_urls, serve
    from .server.local import make_local_app
    from .session import Session
    from .wiring import (make_motion, make_phones, make_renderer, make_sinks, make_source,
                         make_vad)

    tmp = Path(tempfile.mkdtemp())
    portrait = cfg.avatar_path()
    swap = tmp / "portrait.png"
    swap.write_bytes(portrait.read_bytes())
    cfg = dataclasses.replace(
        cfg, audio=dataclasses.replace(cfg.audio, source="tts"),
        sinks=dataclasses.replace(cfg.sinks, enabled=["webrtc"]),
        avatar=dataclasses.replace(cfg.avatar, directories=[str(tmp), str(portrait.parent)]),
        server=dataclasses.replace(cfg.server, port=0, rate_offer_per_min=10_000,
                                   rate_say_per_min=10_000, rate_push_per_min=10_000))
    clock = SystemClock()
    sinks, webrtc = make_sinks(cfg)
    agent = Agent(cfg, source=make_source(cfg, clock), vad=make_vad(cfg), motion=make_motion(cfg),
                  renderer=make_renderer(cfg), sinks=sinks, clock=clock,
                  phones=make_phones(cfg, shared=False))
    session = Session(agent)
    runner = await serve(make_local_app(cfg, session, webrtc), "127.0.0.1", 0)
    url = runner_urls(runner)[0]
    pcm = synthesize(_LINES[2]).audio
    run = asyncio.create_task(session.run())
    counts: collections.deque[tuple[float, int]] = collections.deque(maxlen=16)
    #   (monotonic time, watcher's frames): its once-a-second reports, the last 16 s of them
    streaming = asyncio.Event()
    rss: list[tuple[float, float]] = []               # (minutes since t0, MB) every 15 s
    rss_trimmed: list[tuple[float, float]] = []       # the same, right after malloc_trim
    heap: list[tuple[float, float]] = []              # (minutes, MB malloc has handed out)
    t_start: float | None = None
    calls = {"say": 0, "push": 0, "emotion": 0, "interrupt": 0, "viewers": 0, "swaps": 0}
    marks: collections.deque[tuple[float, str]] = collections.deque(maxlen=64)
    #   (monotonic time, call kind) of the recent calls, for attributing drops
    window: list[float] = []                          # [t0, t1] once measuring
    dropped_after: dict[str, int] = {}                # call kind → frames dropped after it

    def mark(kind: str) -> None:
        calls[kind] += 1
        marks.append((time.monotonic(), kind))

    def n_dropped() -> int:
        st = agent.player.stats
        return st.underruns + st.late_dropped

    async def monitor() -> None:
        last = n_dropped()
        while True:
            await asyncio.sleep(0.1)
            now = n_dropped()
            if now > last and len(window) == 1:         # between t0 and t1
                kind = _attribute(time.monotonic(), marks)
                dropped_after[kind] = dropped_after.get(kind, 0) + now - last
            last = now

    async def driver() -> None:
        k = 0
        async with aiohttp.ClientSession() as http:
            while True:
                k += 1
                if k % 3 == 0:
                    wav = (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()
                    await http.post(url + "api/audio?rate=16000&format=s16le", data=wav)
                    mark("push")
                else:
                    await http.post(url + "api/say", json={"text": _LINES[k % len(_LINES)]})
                    mark("say")
                if k % 4 == 0:
                    await http.post(url + "api/emotion", json={"name": ["happiness", "surprise",
                                    "neutral", "sadness"][k // 4 % 4], "intensity": 0.8})
                    mark("emotion")
                await asyncio.sleep(4.0)
                if k % 5 == 0:
                    await http.post(url + "api/interrupt", data=b"")
                    mark("interrupt")
                if k % 15 == 0:
                    path = swap if k // 15 % 2 else portrait
                    await http.post(url + "api/avatar", json={"path": str(path)})
                    mark("swaps")

    async def viewers() -> None:
        """The viewers run in a child process, as they would on other machines: their decoding
        and peer set-up must not count against the agent's loop.  It reports on stdout."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "avatar_agent.bench_soak", url,
            stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                kind, t, *rest = line.decode().split()
                if kind == "frames":
                    counts.append((float(t), int(rest[0])))
                    if int(rest[0]) >= 50:
                        streaming.set()
                elif kind == "join":
                    # RSS at the same point of every churn cycle (only the watcher connected):
                    # samples taken at random phases swing with the churn viewer.
                    if t_start is not None:
                        m = (time.monotonic() - t_start) / 60
                        rss.append((m, rss_bytes() / 1e6))
                        await asyncio.to_thread(trim_now)
                        rss_trimmed.append((m, rss_bytes() / 1e6))
                        if (used := heap_in_use()) is not None:
                            heap.append((m, used / 1e6))
                    mark("viewers")
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()

    while agent.player.stats.delivered < 25:          # warmed up and streaming
        await asyncio.sleep(0.1)
        if run.done():
            await run                                 # its error
    tasks = [asyncio.create_task(viewers()), asyncio.create_task(driver()),
             asyncio.create_task(monitor())]
    await asyncio.wait_for(streaming.wait(), 60)      # the watcher receives video
    st0, t0 = dataclasses.replace(agent.player.stats), time.monotonic()
    t_start = t0
    window.append(t0)
    await asyncio.sleep(1.5)                          # the watcher's count at t0 has arrived
    f0 = _count_at(counts, t0)
    await asyncio.sleep(minutes * 60 - 1.5)
    st1, t1 = dataclasses.replace(agent.player.stats), time.monotonic()
    window.append(t1)
    await asyncio.sleep(1.5)                          # the watcher's count at t1 has arrived
    f1 = _count_at(counts, t1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    agent.stop()
    await run
    await runner.cleanup()
    delivered = st1.delivered - st0.delivered
    dropped = (st1.underruns - st0.underruns) + (st1.late_dropped - st0.late_dropped)
    warm_up = min(2.0, minutes / 3)
    return {"minutes": round((t1 - t0) / 60, 2), "fps_sent": round(delivered / (t1 - t0), 2),
            "fps_at_viewer": round((f1 - f0) / (t1 - t0), 2),
            "dropped_pct": round(100 * dropped / max(1, delivered), 3),
            "rss_mb": [round(r, 1) for _, r in rss[::4]],
            "rss_slope_mb_per_h": _slope(rss, warm_up),
            "rss_trimmed_mb": [round(r, 1) for _, r in rss_trimmed[::4]],
            "rss_trimmed_slope_mb_per_h": _slope(rss_trimmed, warm_up),
            "heap_in_use_mb": [round(r, 1) for _, r in heap[::4]] if heap else None,
            "heap_in_use_slope_mb_per_h": _slope(heap, warm_up),
            "calls": calls, "dropped_after": dropped_after}


def _slope(samples: list[tuple[float, float]], warm_up_min: float) -> float | None:
    """MB per hour of a least-squares line through the samples after the warm-up (None, JSON
    null, when the run was too short for two samples after it)."""
    warm = [(m, r) for m, r in samples if m >= warm_up_min]
    if len(warm) < 2:
        return None
    return round(float(np.polyfit([m for m, _ in warm], [r for _, r in warm], 1)[0]) * 60, 2)


def _attribute(t: float, marks: "collections.deque[tuple[float, str]]",
               window_s: float = 2.0) -> str:
    """The kind of the latest call within ``window_s`` before a drop at ``t`` ("none" if there
    was none): where the drops come from."""
    before = [k for tm, k in marks if t - window_s <= tm <= t]
    return before[-1] if before else "none"


def _count_at(counts: "collections.deque[tuple[float, int]]", t: float) -> float:
    """The watcher's frame count at ``t``, interpolated between its once-a-second reports."""
    ts = np.array([tm for tm, _ in counts])
    return float(np.interp(t, ts, np.array([n for _, n in counts], float))) if counts else 0.0


async def _viewers_child(url: str) -> None:
    """Child process: one watcher all along, one more viewer for 5 s every 15 s; reports
    ``frames <t> <count>`` every second and ``join <t>`` before each churn viewer joins."""
    frames = [0]

    def say(*words: object) -> None:
        print(*words, flush=True)

    async def report() -> None:
        while True:
            say("frames", time.monotonic(), frames[0])
            await asyncio.sleep(1.0)

    async def churn() -> None:
        while True:
            await asyncio.sleep(10.0)
            say("join", time.monotonic())
            await _viewer(url, 5.0, [0])

    tasks = [asyncio.create_task(report()), asyncio.create_task(churn())]
    try:
        await _viewer(url, None, frames)
    finally:
        for t in tasks:
            t.cancel()


def run(cfg: Config, minutes: float) -> int:
    """CLI entry: print the soak figures as one JSON object."""
    print(json.dumps(asyncio.run(soak(cfg, minutes))))
    return 0


if __name__ == "__main__":
    asyncio.run(_viewers_child(sys.argv[1]))
