"""``avatar-agent bench --sessions N --shards 1``: N concurrent sessions on one engine in this
process, speech pushed into every one; prints one JSON object (figures only, no pass/fail).
(More shards: :mod:`avatar_agent.bench_shards`, the same keys.)

Keys: sessions, seconds, size, inference_workers, render_batch, fps_min, fps_mean,
dropped_pct_max, dropped_pct_mean,
repeated_pct_max, cpu_cores,
rss_mb, rss_per_session_mb, first_frame_ms_p50/p90 (push → first frame carrying that audio, at
the session's frame stream), capacity (what admission control would allow), and with
``--compare-processes`` the same run as one process per session (``processes`` object).

``dropped_pct`` is the player's count (``bench --seconds`` and the issue's baseline use the same):
underruns + late + overflowed images per delivered frame.  An image that misses its tick counts
twice (its tick repeated the previous image; the image itself was thrown away), so in a collapse
it exceeds 100.  ``repeated_pct_max`` is what a viewer sees: the share of frames that repeated
the previous image, at most 100.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from .config import Config
from .memory import freeze_startup_heap
from .metrics import rss_bytes
from .types import SAMPLE_RATE, SegmentStarted, VideoFrame

_TEXT = "Hello there. I am one of many avatars, and I speak whatever you say to me."


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Watch:
    """One session's frame stream: arrival times, and when each segment's first frame came."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.started: dict[int, float] = {}

    async def run(self, frames: Any) -> None:
        async for f in frames:
            self._see(f)

    def _see(self, f: VideoFrame) -> None:
        now = time.monotonic()
        self.times.append(now)
        for m in f.segments:
            if isinstance(m, SegmentStarted):
                self.started[m.utterance] = now


async def bench_sessions(cfg: Config, n: int, seconds: float) -> dict[str, Any]:
    """Run ``n`` sessions for ``seconds`` after warm-up; speech is pushed into each in turn."""
    from .audio.tts import synthesize
    from .engine import Engine

    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, max_sessions=n,
                                                              session_idle_s=0.0))
    utt = synthesize(_TEXT, voice=cfg.audio.voice, rate_wpm=cfg.audio.tts_rate)
    pcm = (np.clip(utt.audio, -1, 1) * 32767).astype(np.int16)
    period = len(pcm) / SAMPLE_RATE + 2.0
    engine = Engine(cfg)
    await engine.warm_up()
    freeze_startup_heap()                              # as `serve` and `livekit-worker` do
    rss_base = rss_bytes()
    sessions, watches, tasks = [], [], []
    rss_one = 0.0
    for i in range(n):
        s = await engine.open_session()
        w = _Watch()
        tasks.append(asyncio.create_task(w.run(s.frames())))
        sessions.append(s)
        watches.append(w)
        if i == 0:
            await asyncio.sleep(1.0)
            rss_one = rss_bytes()
    pushed: list[tuple[int, int, float]] = []          # (session, utterance, push time)

    async def talker(k: int) -> None:                  # staggered, so onsets do not align
        await asyncio.sleep(period * k / n)
        while True:
            uid = sessions[k].push_audio(pcm, SAMPLE_RATE, final=True)
            pushed.append((k, uid, time.monotonic()))
            await asyncio.sleep(period)

    talkers = [asyncio.create_task(talker(k)) for k in range(n)]
    await asyncio.sleep(3.0)                           # settle
    st0 = [dataclasses.replace(s.agent.player.stats) for s in sessions]
    cpu0, t0 = _cpu_s(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, t1 = _cpu_s(), time.monotonic()
    st1 = [dataclasses.replace(s.agent.player.stats) for s in sessions]
    rss_end = rss_bytes()
    measured_capacity = _capacity(engine)
    workers = engine.inference.workers
    per_session_load = engine.per_session_load      # while the sessions still run
    for t in talkers:
        t.cancel()
    await engine.aclose()
    for t in tasks:
        t.cancel()
    fps = [sum(1 for x in w.times if t0 <= x < t1) / (t1 - t0) for w in watches]
    lat = [1000 * (watches[k].started[u] - t) for k, u, t in pushed
           if u in watches[k].started and t0 - 3.0 <= t]
    return {"sessions": n, "seconds": round(t1 - t0, 1), "size": cfg.render.size,
            "inference_workers": workers, "render_batch": cfg.render.batch,
            **window_figures(fps, [dataclasses.asdict(a) for a in st0],
                             [dataclasses.asdict(b) for b in st1], lat),
            "cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
            **rss_figures(n, rss_base, rss_one, rss_end),
            "per_session_load": round(per_session_load, 4),
            "measured_capacity": measured_capacity}


def window_figures(fps: list[float], before: list[dict[str, Any]], after: list[dict[str, Any]],
                   lat_ms: list[float]) -> dict[str, Any]:
    """fps, dropped/repeated % and first-frame latency over the measured window, from each
    session's fps, its player counters at the window's start and end, and the latencies."""
    dropped, repeated = [], []
    for a, b in zip(before, after, strict=True):
        delivered = max(1, b["delivered"] - a["delivered"])
        d = sum(b[k] - a[k] for k in ("underruns", "late_dropped", "overflow_dropped"))
        dropped.append(100.0 * d / delivered)
        repeated.append(100.0 * (b["underruns"] - a["underruns"]) / delivered)
    return {
        "fps_min": round(min(fps), 2), "fps_mean": round(float(np.mean(fps)), 2),
        "dropped_pct_max": round(max(dropped), 3),
        "dropped_pct_mean": round(float(np.mean(dropped)), 3),
        "repeated_pct_max": round(max(repeated), 3),
        "first_frame_ms_p50": round(float(np.percentile(lat_ms, 50)), 1) if lat_ms else None,
        "first_frame_ms_p90": round(float(np.percentile(lat_ms, 90)), 1) if lat_ms else None,
        "onsets_measured": len(lat_ms)}


def rss_figures(n: int, base: float, one: float, end: float) -> dict[str, Any]:
    """RSS at the end, before any session, and per extra session (bytes in, MB out)."""
    per = (end - one) / max(1, n - 1) if n > 1 else end - base
    return {"rss_mb": round(end / 1e6, 1), "rss_engine_mb": round(base / 1e6, 1),
            "rss_per_session_mb": round(per / 1e6, 2)}


def _capacity(engine: Any) -> int:
    """What admission control would allow with no ``server.max_sessions`` set."""
    from .engine import TARGET_LOAD, _cores

    cores = min(_cores(), engine.inference.workers + 1)
    load = engine.per_session_load
    return max(1, int(TARGET_LOAD * cores / load)) if load else 0


def compare_processes(n: int, seconds: float, sets: list[str]) -> dict[str, Any]:
    """The baseline: ``n`` processes with one session each, started at once."""
    cmd = [sys.executable, "-m", "avatar_agent.cli", "bench", "--sessions", "1", "--shards", "1", "--json",
           "--seconds", str(seconds)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=env) for _ in range(n)]
    outs = []
    for p in procs:
        out, _ = p.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if lines:
            outs.append(json.loads(lines[-1]))
    if not outs:
        return {"processes": n, "error": "no process reported"}
    return {"processes": n, "reported": len(outs),
            "fps_min": min(o["fps_min"] for o in outs),
            "dropped_pct_max": max(o["dropped_pct_max"] for o in outs),
            "rss_mb_total": round(sum(o["rss_mb"] for o in outs), 1),
            "cpu_cores_total": round(sum(o["cpu_cores"] for o in outs), 3)}


def run(cfg: Config, n: int, seconds: float, as_json: bool, compare: bool,
        sets: list[str], shards: int | None = None) -> int:
    """CLI entry: print the figures (one JSON object with ``--json``).  ``shards``: as ``serve``
    runs them (None: ``server.shards``); more than one runs :mod:`avatar_agent.bench_shards`."""
    from .engine import shard_count

    k = shard_count(cfg) if shards is None else shards
    if k < 1:
        raise SystemExit("avatar-agent: --shards must be at least 1")
    if k > 1:
        from .bench_shards import bench_sharded

        out = asyncio.run(bench_sharded(cfg, n, seconds, k))
    else:
        out = asyncio.run(bench_sessions(cfg, n, seconds))
    if compare:
        out["one_process_per_session"] = compare_processes(n, seconds, sets)
    print(json.dumps(out) if as_json else json.dumps(out, indent=2))
    return 0
