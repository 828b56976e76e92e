"""`avatar-agent serve` spread over shard processes: the real command, its real shard processes,
on loopback.

What is checked: sessions are placed on the least-loaded shard and reached through the parent
(plain requests, an event stream, the audio WebSocket, a WebRTC viewer by WHEP); the parent's
token and capacity hold over all shards; a shard that dies ends only its own sessions and is
restarted; the shards' own ports refuse anyone but the parent; SIGTERM stops everything with
status 0; a killed parent leaves no shard behind.  (Speed: ``bench --sessions N --shards K``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from typing import Any, AsyncIterator

import aiohttp
import psutil
import pytest
from avatar_agent.types import SAMPLE_RATE
from tests.server.test_sessions import _tone, whep
from tests.sinks.test_webrtc import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TOKEN = "shard-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Server:
    """A running ``avatar-agent serve`` process and the lines it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.url = ""
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if m := re.search(r"session server on (http://\S+/) ", line):
                self.url = m.group(1)

    def shard_pids(self) -> list[int]:
        return [c.pid for c in psutil.Process(self.proc.pid).children()]


@contextlib.asynccontextmanager
async def sharded_server(*sets: str) -> AsyncIterator[Server]:
    args = ["--set", "motion.generator=procedural", "--set", "render.size=128",
            "--set", "server.port=0", "--set", "server.shards=2", "--set", "service.drain_s=0",
            "--set", f"server.token={TOKEN}"]
    for s in sets:
        args += ["--set", s]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "avatar_agent.cli", "serve", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "AVATAR_AGENT_CONFIG": os.devnull})
    server = Server(proc)
    try:
        await wait_for(lambda: server.url or proc.returncode is not None, timeout=120)
        assert server.url, "\n".join(server.lines)
        yield server
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.reader.cancel()


async def _json(r: aiohttp.ClientResponse) -> Any:
    return json.loads(await r.text())


async def _events(http: aiohttp.ClientSession, url: str, into: list[str]) -> None:
    """Read an event stream (through the parent, token in the query as EventSource sends it)."""
    async with http.get(url + f"?token={TOKEN}", headers={"Authorization": ""}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("event: "):
                into.append(line[7:])


async def test_sessions_spread_over_shards_and_reach_them_through_the_parent() -> None:
    async with sharded_server("server.max_sessions=2") as srv, \
            aiohttp.ClientSession(headers=AUTH) as http:
        url = srv.url
        async with http.get(url + "healthz") as r:
            health = await _json(r)
            assert r.status == 200 and health["ok"] and len(health["shards"]) == 2
            assert all(s["up"] and s["pid"] for s in health["shards"])
        async with aiohttp.ClientSession() as anon:             # the parent's token holds
            async with anon.post(url + "v1/sessions", json={}) as r:
                assert r.status == 401
        opened = []
        for _ in range(2):
            async with http.post(url + "v1/sessions", json={}) as r:
                assert r.status == 201, await r.text()
                opened.append(await _json(r))
        # the least-loaded shard takes each new session: one on each
        assert sorted(s["id"].split("-", 1)[0] for s in opened) == ["0", "1"]
        async with http.post(url + "v1/sessions", json={}) as r:   # max_sessions counts all
            assert r.status == 503 and int(r.headers["Retry-After"]) > 0
            assert (await _json(r))["capacity"] == 2
        async with http.get(url + "readyz") as r:
            assert r.status == 503 and (await _json(r))["sessions"] == 2
        async with http.get(url + "v1/sessions") as r:
            assert {s["id"] for s in await _json(r)} == {s["id"] for s in opened}

        a, b = opened
        # an event stream through the parent, then say → speech events on A's stream only
        seen_a: list[str] = []
        seen_b: list[str] = []
        streams = [asyncio.create_task(_events(http, url + a["events"].lstrip("/"), seen_a)),
                   asyncio.create_task(_events(http, url + b["events"].lstrip("/"), seen_b))]
        await wait_for(lambda: "frame_stats" in seen_a and "frame_stats" in seen_b, timeout=30)
        async with http.post(url + a["say"].lstrip("/"), json={"text": "Hello there."}) as r:
            assert r.status == 200, await r.text()
        await wait_for(lambda: "speech_finished" in seen_a, timeout=60)
        assert "speech_started" in seen_a and "speech_started" not in seen_b

        # the audio WebSocket through the parent: header, PCM, final → accepted, finished
        ws_url = url.replace("http", "ws", 1) + b["audio_ws"].lstrip("/")
        async with http.ws_connect(ws_url) as ws:
            await ws.send_json({"rate": SAMPLE_RATE, "channels": 1, "format": "s16le"})
            assert (await ws.receive_json(timeout=10))["type"] == "ready"
            await ws.send_bytes(_tone(1.0))
            await ws.send_json({"final": True})
            kinds = [(await ws.receive_json(timeout=10))["type"] for _ in range(2)]
        assert kinds == ["accepted", "finished"]
        await wait_for(lambda: "speech_finished" in seen_b, timeout=60)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url.replace("http", "ws", 1)
                                  + "v1/sessions/1-nosuchsession/audio/ws")
        assert refused.value.status == 404
        for t in streams:
            t.cancel()
        await asyncio.gather(*streams, return_exceptions=True)


async def test_a_viewer_by_whep_and_a_dead_or_hung_shard_ends_only_its_own_sessions() -> None:
    async with sharded_server("service.frozen_s=4") as srv, \
            aiohttp.ClientSession(headers=AUTH) as http:
        url = srv.url
        opened = []
        for _ in range(2):
            async with http.post(url + "v1/sessions", json={}) as r:
                assert r.status == 201, await r.text()
                opened.append(await _json(r))
        by_shard = {s["id"].split("-", 1)[0]: s for s in opened}
        assert set(by_shard) == {"0", "1"}

        # a WebRTC viewer of shard 1's session: SDP through the parent, media from the shard
        viewer = await whep(url + by_shard["1"]["whep"].lstrip("/"), AUTH)
        try:
            await wait_for(lambda: viewer.frames >= 10, timeout=60)
            assert viewer.location.startswith(f"/v1/sessions/{by_shard['1']['id']}/whep/")
        finally:
            await viewer.close()

        # the shards' own ports answer only the parent
        for pid in srv.shard_pids():
            ports = [c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN]
            assert ports
            async with aiohttp.ClientSession() as anon:
                async with anon.get(f"http://127.0.0.1:{ports[0]}/v1/sessions") as r:
                    assert r.status == 401
                async with anon.get(f"http://127.0.0.1:{ports[0]}/v1/sessions",
                                    headers=AUTH) as r:       # the public token is not enough
                    assert r.status == 401

        async with http.get(url + "healthz") as r:
            pid1 = next(s["pid"] for s in (await _json(r))["shards"] if s["index"] == 1)
        os.kill(pid1, signal.SIGKILL)
        status_a = url + by_shard["0"]["say"].lstrip("/").replace("/say", "/status")
        status_b = url + by_shard["1"]["say"].lstrip("/").replace("/say", "/status")
        await wait_for(lambda: not psutil.pid_exists(pid1)
                       or psutil.Process(pid1).status() == psutil.STATUS_ZOMBIE, timeout=10)
        async with http.get(status_b) as r:
            assert r.status == 404                           # its session ended with it
        async with http.get(status_a) as r:
            first = (await _json(r))["delivered"]
        await asyncio.sleep(0.5)
        async with http.get(status_a) as r:                # the other shard's session goes on
            assert r.status == 200 and (await _json(r))["delivered"] > first

        async def restarted(index: int) -> bool:
            async with http.get(url + "healthz") as r:
                h = await _json(r)
                return r.status == 200 and h["shards"][index]["restarts"] == 1

        async def wait_restart(index: int) -> None:
            deadline = time.monotonic() + 90
            while not await restarted(index):
                assert time.monotonic() < deadline, f"shard {index} was not restarted"
                await asyncio.sleep(0.5)
        await wait_restart(1)
        assert any("shard 1" in line and "exited" in line for line in srv.lines)

        # a hung shard (stopped: it cannot answer) is killed after service.frozen_s, restarted
        async with http.get(url + "healthz") as r:
            pid0 = next(s["pid"] for s in (await _json(r))["shards"] if s["index"] == 0)
        os.kill(pid0, signal.SIGSTOP)
        await wait_restart(0)
        assert any("shard 0" in line and "has not answered" in line for line in srv.lines)
        async with http.get(url + "healthz") as r:
            assert next(s["pid"] for s in (await _json(r))["shards"] if s["index"] == 0) != pid0
        async with http.get(status_a) as r:
            assert r.status == 404                           # its session ended with it
        heads = []
        for _ in range(2):                                   # both restarted shards serve
            async with http.post(url + "v1/sessions", json={}) as r:
                assert r.status == 201
                heads.append((await _json(r))["id"].split("-", 1)[0])
        assert sorted(heads) == ["0", "1"]

        shards = srv.shard_pids()
        srv.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(srv.proc.wait(), 30) == 0
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in shards)


async def test_a_killed_parent_leaves_no_shard_behind() -> None:
    async with sharded_server() as srv:
        shards = srv.shard_pids()
        assert len(shards) == 2
        srv.proc.kill()                          # no chance to stop them: their stdin ends
        await srv.proc.wait()
        deadline = time.monotonic() + 20
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                  for p in shards):
            assert time.monotonic() < deadline, "a shard outlived its parent"
            await asyncio.sleep(0.2)


async def test_a_shards_engine_prefixes_its_session_ids_and_counts_its_share_of_the_cores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from avatar_agent import engine as engine_mod
    from avatar_agent.config import load_config
    from avatar_agent.engine import Engine, Shard
    from avatar_agent.server.shards import ShardPool

    monkeypatch.setattr(engine_mod, "_cores", lambda: 2)
    cfg = load_config(None, ["motion.generator=procedural", "render.size=128",
                             "service.drain_s=0"])
    whole, half = Engine(cfg), Engine(cfg, shard=Shard(1, 2))
    try:
        assert (whole.inference.workers, half.inference.workers) == (2, 1)
        whole._cost_estimate = half._cost_estimate = 0.1
        # 0.75 of 2 cores vs 0.75 of the 1 core that is this shard's half
        assert (whole.capacity, half.capacity) == (15, 7)
        session = await half.open_session()
        assert session.id.startswith("1-") and half.get(session.id) is session
        pool = ShardPool(cfg, 3)
        assert pool.of(session.id.replace("1-", "2-", 1)) is pool.shards[2]
        assert [pool.of(i) for i in ("3-abc", "x-1", "abc", "-1-a")] == [None] * 4
    finally:
        await half.aclose()
        await whole.aclose()


def test_a_shard_that_cannot_start_fails_serve_with_one_line_naming_the_input(tmp_path) -> None:
    import subprocess

    bad = tmp_path / "face.png"
    bad.write_bytes(b"\x89PNG not really" * 40)
    r = subprocess.run([sys.executable, "-m", "avatar_agent.cli", "serve", "--set", "server.port=0",
                        "--set", "server.shards=2", "--set", "render.size=128",
                        "--set", f"avatar.image={bad}"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "AVATAR_AGENT_CONFIG": os.devnull})
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("avatar-agent: shard ") and "could not start" in line
    assert str(bad) in line and "re-export it" in line
