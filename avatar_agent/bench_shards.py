"""``avatar-agent bench --sessions N --shards K`` (K > 1): N sessions on the sharded session
server, driven as a bot drives it; prints one JSON object (figures only, no pass/fail).

The real thing: this process is ``serve``'s parent (the :class:`~avatar_agent.server.shards.ShardPool`
and the public app on a loopback port), the K shard processes are spawned as ``serve`` spawns
them, and every session is opened, fed and read over HTTP through the parent:
``POST /v1/sessions``, speech pushed as raw PCM to ``/audio``, its ``speech_started`` events read
over ``/events/ws``, its player counters read from ``/status`` at the start and end of the window.

Keys as ``bench --sessions`` (see :mod:`avatar_agent.bench_sessions`), plus ``shards``.  Only
what differs:

* ``cpu_cores`` and ``rss_mb`` are the parent's and all shards' together; the parent includes
  this benchmark's own HTTP client (a bot's would run elsewhere), so the figure is pessimistic.
* ``first_frame_ms`` runs from just before the push request to the arrival of the session's
  ``speech_started`` event at the client: the first frame carrying the audio was played, and the
  event came back through the parent.
* The rate limits are lifted: all sessions come from this one client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any

import aiohttp
import numpy as np
import psutil

from .config import Config
from .types import SAMPLE_RATE

_TEXT = "Hello there. I am one of many avatars, and I speak whatever you say to me."


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with _gone():
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def _rss(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with _gone():
            total += psutil.Process(pid).memory_info().rss
    return total


class _gone:
    """Ignore a process that has exited meanwhile."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, *_: Any) -> bool:
        return kind is not None and issubclass(kind, psutil.NoSuchProcess)


async def bench_sharded(cfg: Config, n: int, seconds: float, shards: int) -> dict[str, Any]:
    """Run ``n`` sessions over ``shards`` processes for ``seconds`` after warm-up."""
    from .audio.tts import synthesize
    from .bench_sessions import rss_figures, window_figures
    from .engine import inference_workers
    from .server.app import runner_urls, serve
    from .server.control import settings_from_config
    from .server.shards import ShardPool, make_sharded_app

    cfg = dataclasses.replace(cfg, server=dataclasses.replace(
        cfg.server, max_sessions=n, session_idle_s=0.0, host="127.0.0.1", port=0, token="",
        rate_offer_per_min=1e6, rate_push_per_min=1e6, rate_say_per_min=1e6))
    utt = synthesize(_TEXT, voice=cfg.audio.voice, rate_wpm=cfg.audio.tts_rate)
    pcm = (np.clip(utt.audio, -1, 1) * 32767).astype("<i2").tobytes()
    period = len(pcm) / 2 / SAMPLE_RATE + 2.0
    pool = ShardPool(cfg, shards)
    await pool.start()
    control, security = settings_from_config(cfg)
    runner = await serve(make_sharded_app(pool, control, security), "127.0.0.1", 0, page=False,
                         announce=False)
    url = runner_urls(runner)[0]
    pids = [os.getpid(), *(s.pid for s in pool.shards if s.pid)]
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    tasks: list[asyncio.Task[None]] = []
    try:
        rss_base = _rss(pids)
        ids: list[str] = []
        started: list[dict[int, float]] = []
        rss_one = rss_base
        for i in range(n):
            async with http.post(url + "v1/sessions", json={}) as r:
                if r.status != 201:
                    raise RuntimeError(f"opening session {i + 1} of {n}: {r.status} "
                                       f"{await r.text()}")
                ids.append((await r.json())["id"])
            started.append({})
            tasks.append(asyncio.create_task(_watch(http, url, ids[-1], started[-1])))
            if i == 0:
                await asyncio.sleep(1.0)
                rss_one = _rss(pids)
        pushed: list[tuple[int, int, float]] = []        # (session, utterance, push time)

        async def talker(k: int) -> None:                # staggered, so onsets do not align
            await asyncio.sleep(period * k / n)
            while True:
                t = time.monotonic()
                async with http.post(f"{url}v1/sessions/{ids[k]}/audio",
                                     params={"rate": str(SAMPLE_RATE), "format": "s16le"},
                                     data=pcm) as r:
                    if r.status == 200:
                        pushed.append((k, int((await r.json())["utterance"]), t))
                await asyncio.sleep(period)

        tasks += [asyncio.create_task(talker(k)) for k in range(n)]
        await asyncio.sleep(3.0)                          # settle
        st0 = await _statuses(http, url, ids)
        cpu0, t0 = _cpu_s(pids), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, t1 = _cpu_s(pids), time.monotonic()
        st1 = await _statuses(http, url, ids)
        rss_end = _rss(pids)
        async with http.get(url + "readyz") as r:
            ready = await r.json()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await http.close()
        await runner.cleanup()
        await pool.stop()
    fps = [(b["delivered"] - a["delivered"]) / (t1 - t0) for a, b in zip(st0, st1, strict=True)]
    lat = [1000 * (started[k][u] - t) for k, u, t in pushed
           if u in started[k] and t0 - 3.0 <= t]
    return {"sessions": n, "shards": shards, "seconds": round(t1 - t0, 1),
            "size": cfg.render.size, "inference_workers": inference_workers(cfg, shards),
            "render_batch": cfg.render.batch, **window_figures(fps, st0, st1, lat),
            "cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
            **rss_figures(n, rss_base, rss_one, rss_end),
            "per_session_load": ready["per_session_load"],
            "shard_sessions": [s["sessions"] for s in ready["shards"]]}


async def _watch(http: aiohttp.ClientSession, url: str, sid: str, started: dict[int, float]
                 ) -> None:
    """Record when each utterance's ``speech_started`` event arrives."""
    async with http.ws_connect(f"{url}v1/sessions/{sid}/events/ws?types=speech_started",
                               timeout=aiohttp.ClientWSTimeout(ws_close=5.0)) as ws:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            ev = msg.json()
            if ev.get("type") == "speech_started":
                started[int(ev["data"]["utterance"])] = time.monotonic()


async def _statuses(http: aiohttp.ClientSession, url: str, ids: list[str]) -> list[dict[str, Any]]:
    async def one(sid: str) -> dict[str, Any]:
        async with http.get(f"{url}v1/sessions/{sid}/status") as r:
            body: dict[str, Any] = await r.json()
            return body
    return list(await asyncio.gather(*(one(s) for s in ids)))
