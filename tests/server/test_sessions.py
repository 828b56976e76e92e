"""The session server: many sessions on one engine, each with its own API and WebRTC viewers.

Real parts: the engine with the embedded renderer and procedural motion, the aiohttp server on
loopback, aiortc WHEP viewers.  (Speed figures: ``avatar-agent bench --sessions N``.)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from aiortc import RTCPeerConnection, RTCSessionDescription

from avatar_agent.config import load_config
from avatar_agent.engine import Engine
from avatar_agent.server.control import settings_from_config
from avatar_agent.server.sessions import make_session_app
from avatar_agent.types import SAMPLE_RATE, VideoFrame
from tests.sinks.conftest import loopback_ice
from tests.sinks.test_webrtc import Viewer, _consume, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _tone(seconds: float, amp: float = 0.4) -> bytes:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    x = amp * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    return (x * 32767).astype("<i2").tobytes()


@contextlib.asynccontextmanager
async def session_server(*sets: str) -> AsyncIterator[tuple[str, Engine, aiohttp.ClientSession]]:
    cfg = load_config(None, ["motion.generator=procedural", "render.size=128",
                             "service.drain_s=0", *sets])
    engine = Engine(cfg)
    await engine.warm_up()
    control, security = settings_from_config(cfg)
    app = make_session_app(engine, control, security)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        yield str(server.make_url("/")), engine, http


class Tap:
    """Collects a session's frames (its own frame iterator)."""

    def __init__(self, frames: AsyncIterator[VideoFrame]) -> None:
        self.frames: list[VideoFrame] = []
        self.task = asyncio.create_task(self._run(frames))

    async def _run(self, frames: AsyncIterator[VideoFrame]) -> None:
        async for f in frames:
            self.frames.append(f)

    def voiced(self) -> int:
        return sum(1 for f in self.frames if np.abs(f.audio).max() > 0.05)


async def whep(url: str, headers: dict[str, str] | None = None) -> Viewer:
    """A recvonly aiortc viewer of the session at ``url`` (WHEP, raw SDP)."""
    pc = RTCPeerConnection()
    viewer = Viewer(pc)
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")

    @pc.on("track")
    def _on_track(track: Any) -> None:
        viewer.tasks.append(asyncio.ensure_future(_consume(viewer, track)))

    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.post(url, data=pc.localDescription.sdp,
                          headers={"Content-Type": "application/sdp"}) as r:
            assert r.status == 201, await r.text()
            viewer.location = r.headers["Location"]
            sdp = await r.text()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
    return viewer


async def test_sessions_are_isolated_admitted_up_to_capacity_and_closed() -> None:
    async with session_server("server.max_sessions=2") as (url, engine, http):
        opened = []
        for _ in range(2):
            async with http.post(url + "v1/sessions", json={"emotion": "happiness"}) as r:
                assert r.status == 201, await r.text()
                opened.append(await r.json())
        a, b = opened
        assert a["id"] != b["id"] and a["whep"].endswith(f"{a['id']}/whep")
        async with http.post(url + "v1/sessions", json={}) as r:       # beyond capacity
            assert r.status == 503 and int(r.headers["Retry-After"]) > 0
        async with http.get(url + "readyz") as r:
            assert r.status == 503 and (await r.json())["sessions"] == 2
        taps = {s["id"]: Tap(engine.get(s["id"]).frames()) for s in opened}
        # one renderer, one inference thread, one batcher for every session of the engine
        agents = [engine.get(s["id"]).agent for s in opened]
        assert all(ag.batcher is engine.batcher and ag.inference is engine.inference
                   and ag.renderer is engine.renderer for ag in agents)
        with loopback_ice():
            viewer_b = await whep(url + b["whep"].lstrip("/"))
            try:
                await wait_for(lambda: viewer_b.frames >= 10, timeout=30)
                async with http.post(url + a["audio"].lstrip("/") + "?rate=16000&format=s16le",
                                     data=_tone(1.5)) as r:
                    assert r.status == 200, await r.text()
                await wait_for(lambda: taps[a["id"]].voiced() >= 30, timeout=30)
                await asyncio.sleep(0.5)
                heard_b = np.concatenate(viewer_b.audio) if viewer_b.audio else np.zeros(1)
            finally:
                await viewer_b.close()
        assert taps[b["id"]].voiced() == 0 and float(np.abs(heard_b).max()) < 0.01   # only A spoke
        assert any(f.speech for f in taps[a["id"]].frames)
        async with http.get(url + a["interrupt"].lstrip("/").replace("interrupt", "status")) as r:
            st = await r.json()
            assert st["session"] == a["id"] and st["delivered"] > 0
        async with http.delete(url + f"v1/sessions/{a['id']}") as r:
            assert r.status == 204
        async with http.get(url + "v1/sessions") as r:
            assert [s["id"] for s in await r.json()] == [b["id"]]
        async with http.post(url + f"v1/sessions/{a['id']}/say", json={"text": "hi"}) as r:
            assert r.status == 404
        async with http.post(url + "v1/sessions", json={}) as r:       # room again
            assert r.status == 201
        async with http.get(url + "healthz") as r:
            assert r.status == 200 and (await r.json())["ok"]


async def test_idle_sessions_time_out_but_watched_ones_stay() -> None:
    async with session_server("server.session_idle_s=1.0") as (url, engine, http):
        async with http.post(url + "v1/sessions", json={}) as r:
            sid = (await r.json())["id"]
        await wait_for(lambda: engine.get(sid) is None, timeout=15)
        async with http.get(url + f"v1/sessions/{sid}/status") as r:
            assert r.status == 404


async def test_an_ended_sessions_memory_is_freed_without_waiting_for_the_collector() -> None:
    """A session closed through the API, and one the engine ends by itself (idle), leave nothing
    reachable, and their reference cycles are collected by the engine soon after — not whenever
    CPython's collector next runs a full pass (rarely, once the startup heap is frozen; here it
    is switched off to stand for that)."""
    import gc
    import weakref

    from avatar_agent.engine import GC_DELAY_S

    async with session_server("server.session_idle_s=1.0") as (url, engine, http):
        refs = []
        for _ in range(2):
            async with http.post(url + "v1/sessions", json={}) as r:
                sid = (await r.json())["id"]
            refs.append(weakref.ref(engine.get(sid).agent))
        gc.collect()
        gc.disable()
        try:
            async with http.delete(url + f"v1/sessions/{sid}") as r:   # closed by the API
                assert r.status == 204
            await wait_for(lambda: not engine.sessions, timeout=15)    # the other: idle
            await wait_for(lambda: all(ref() is None for ref in refs),
                           timeout=GC_DELAY_S + 10)
        finally:
            gc.enable()


async def test_python_client_and_openapi_cover_the_session_routes() -> None:
    from avatar_agent.client import ApiError, AsyncAvatarClient, AvatarClient

    async with session_server("server.max_sessions=1") as (url, engine, http):
        async with AsyncAvatarClient(url) as c:
            s = await c.open_session(emotion="surprise")
            assert s.session["id"] and engine.get(s.session["id"]) is not None
            with pytest.raises(ApiError) as e:
                await c.open_session()
            assert e.value.status == 503 and e.value.retry_after
            uid = await s.say("Hello there.")
            with pytest.raises(ApiError) as e:            # a session's routes: /v1/openapi.json
                await s.request("GET", s.prefix + "/openapi.json")
            assert e.value.status == 404
            assert "/v1/sessions/{id}/say" in (await s.openapi())["paths"]
            st = await s.status()
            assert st["session"] == s.session["id"] and uid >= 1
            await s.close_session()
            assert engine.get(s.session["id"]) is None
            sync = await asyncio.to_thread(lambda: AvatarClient(url).open_session())
            assert sync.prefix == f"/v1/sessions/{sync.session['id']}"
            assert (await asyncio.to_thread(sync.status))["session"] == sync.session["id"]
            await asyncio.to_thread(sync.close_session)
            assert engine.get(sync.session["id"]) is None
            doc = await c.request("GET", "/v1/openapi.json")
            for path in ("/v1/sessions", "/v1/sessions/{id}", "/v1/sessions/{id}/whep",
                         "/v1/sessions/{id}/say", "/v1/sessions/{id}/audio/ws", "/readyz"):
                assert path in doc["paths"], path
            opened = doc["paths"]["/v1/sessions"]["post"]["responses"]["201"]
            assert "whep" in opened["content"]["application/json"]["schema"]["properties"]
            say = doc["paths"]["/v1/sessions/{id}/say"]["post"]
            assert say["parameters"][0] == {"name": "id", "in": "path", "required": True,
                                            "schema": {"type": "string"}}
            assert say["operationId"] == "post_v1_sessions_id_say"
