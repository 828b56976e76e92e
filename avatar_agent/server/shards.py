"""The session server spread over processes: one parent, ``server.shards`` shard processes.

Why: the threads of one process share one interpreter lock, and a CPU engine's per-frame Python
(renderer between its OpenCV calls, motion, the event loop) keeps it held about 60 % of the time
with 11 sessions on 2 cores — one engine tops out near one core's worth of Python.  Separate
processes do not share it (measured 2026-12-06, 2 cores, slowed VM: one engine, 10 sessions
0.27 % dropped at 1.48 cores; two processes of 6 sessions 0.00 % at 1.60 cores).

How:

* Each shard (:mod:`avatar_agent.server.shard_worker`) is an :class:`~avatar_agent.engine.Engine`
  with the session API on a loopback port of its own that only the parent can call (a random
  token).  Its session ids start with its index (``"1-…"``), so the parent routes by id alone.
* The parent serves the public API (``/v1/sessions…``, ``/healthz``, ``/readyz``, OpenAPI) with the
  security middlewares: token, origins, rate limits, body and time limits.  It places a new
  session on the least-loaded shard that has room (503 + Retry-After when none has), and
  forwards a session's requests to its shard: plain requests, event streams (SSE) and
  WebSockets (audio push, events).  WebRTC media flows from the shard to the viewer directly
  (the parent only carries the SDP).
* Shards are spawned, not forked (torch, ONNX Runtime and OpenCV have threads by then).  A shard
  that dies ends its own sessions (their event streams close; their ids answer 404) and is
  restarted; the other shards' sessions go on.  So is a shard that stops answering (its event
  loop hung or the process stopped) for ``service.frozen_s``: it is killed first.  A shard that
  cannot start
  :data:`START_FAILURES_MAX` times in a row ends the server (non-zero exit: systemd restarts it).
  A shard whose parent is gone closes its sessions and exits (its stdin reaches end of file).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
from typing import Any

import aiohttp
from aiohttp import web

from ..clock import Clock, SystemClock
from ..config import Config, to_toml
from .control import ControlSettings
from .security import RateLimit, SecuritySettings, TokenBuckets, install, json_error, read_body
from .sessions import opens_refused, session_document
from .shard_worker import Hello

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0
"""Longest a shard may take to load and warm its models (spawned shards start together)."""
START_FAILURES_MAX = 3
"""A shard that fails to start this many times in a row ends the server."""
STATUS_TIMEOUT_S = 2.0
"""A shard that does not answer its status within this long counts as having no room."""
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0)

_FORWARD_REQUEST = ("Content-Type", "Accept", "Last-Event-ID", "Cache-Control")
_FORWARD_RESPONSE = ("Content-Type", "Location", "Retry-After", "Cache-Control",
                     "X-Accel-Buffering")


class ShardError(RuntimeError):
    """A shard could not be started (its log says why)."""


class ShardProcess:
    """One shard: its process, its loopback URL and an HTTP client carrying its token."""

    def __init__(self, index: int, count: int, cfg: Config, journal: bool) -> None:
        self.index, self.count, self.cfg, self.journal = index, count, cfg, journal
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.http: aiohttp.ClientSession | None = None
        self.restarts = 0
        self.up = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """The shard's process id while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    async def start(self) -> None:
        """Spawn the shard and wait until it serves.

        Raises:
            ShardError: it exited or did not become ready within :data:`START_TIMEOUT_S`.
        """
        token = secrets.token_urlsafe(32)
        hello = Hello(config=to_toml(self.cfg), source_path=self.cfg.source_path,
                      index=self.index, count=self.count, token=token,
                      log_format="journal" if self.journal else "plain")
        read_fd, write_fd = os.pipe()
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}  # parent's only
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "avatar_agent.server.shard_worker",
                "--ready-fd", str(write_fd), stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,), env=env,
                start_new_session=True)   # a terminal's Ctrl-C reaches the parent, which stops it
        finally:
            os.close(write_fd)
        assert self.proc.stdin is not None
        self.proc.stdin.write(hello.line())      # stdin stays open: its end means "parent gone"
        await self.proc.stdin.drain()
        try:
            line = await asyncio.wait_for(asyncio.to_thread(_read_line, read_fd),
                                          START_TIMEOUT_S)
        except TimeoutError:
            await self.stop(0.0)
            raise ShardError(f"shard {self.index} did not start within {START_TIMEOUT_S:.0f} s"
                             ) from None
        finally:
            os.close(read_fd)
        if not line:
            code = await self.proc.wait()
            raise ShardError(f"shard {self.index} exited with status {code} while starting "
                             "(its log lines above say why)")
        msg = json.loads(line)
        if "error" in msg:
            await self.proc.wait()
            raise ShardError(f"shard {self.index} could not start: {msg['error']}")
        port = int(msg["port"])
        self.url = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession(
            self.url, headers={"Authorization": f"Bearer {token}"},
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0))
        self.up.set()

    async def wait(self) -> int:
        """Wait for the process to exit; its status."""
        assert self.proc is not None
        return await self.proc.wait()

    async def status(self, path: str = "/readyz") -> dict[str, Any] | None:
        """The shard's load figures (``/readyz`` or ``/healthz`` body), None when it does not
        answer."""
        if not self.up.is_set() or self.http is None:
            return None
        try:
            async with self.http.get(path, timeout=aiohttp.ClientTimeout(
                    total=STATUS_TIMEOUT_S)) as r:
                body: dict[str, Any] = await r.json()
                return body
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def stop(self, grace_s: float) -> None:
        """End the shard: SIGTERM (it drains its sessions), SIGKILL after ``grace_s``."""
        self.up.clear()
        if self.http is not None:
            await self.http.close()
            self.http = None
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            log.warning("shard %d did not stop within %.1f s: killing it", self.index, grace_s)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _read_line(fd: int) -> bytes:
    """Read one line from a pipe (b"" when the writer closed it first)."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            return b""
        buf += chunk
    return buf


class ShardPool:
    """The shard processes, started together and restarted when one dies."""

    def __init__(self, cfg: Config, count: int, *, journal: bool = False,
                 clock: Clock | None = None) -> None:
        self.cfg, self.clock = cfg, clock or SystemClock()
        total = cfg.server.max_sessions
        # Each shard may take a full share of server.max_sessions; the parent bounds the sum.
        each = dataclasses.replace(cfg, server=dataclasses.replace(
            cfg.server, max_sessions=-(-total // count) if total else 0))
        self.shards = [ShardProcess(i, count, each, journal) for i in range(count)]
        self.grace_s = cfg.service.drain_s + 5.0
        self.stopping = asyncio.Event()
        """Set when the server stops: shards exiting now are not restarted."""

    async def start(self) -> None:
        """Start every shard (concurrently).

        Raises:
            ShardError: one could not start (the others are stopped again).
        """
        results = await asyncio.gather(*(s.start() for s in self.shards), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.stop()
            raise failed[0] if isinstance(failed[0], ShardError) else ShardError(str(failed[0]))

    async def supervise(self) -> None:
        """Restart shards that die, until cancelled.

        Raises:
            ShardError: a shard failed to start :data:`START_FAILURES_MAX` times in a row.
        """
        async with asyncio.TaskGroup() as tg:
            for s in self.shards:
                tg.create_task(self._keep(s), name=f"shard-{s.index}")
                tg.create_task(self._watch(s), name=f"shard-{s.index}-watch")

    async def _watch(self, shard: ShardProcess) -> None:
        """Kill a shard that has not answered its health check for ``service.frozen_s`` (then
        :meth:`_keep` restarts it): a hung shard would otherwise keep its sessions frozen."""
        limit = self.cfg.service.frozen_s
        every = min(1.0, limit / 4)
        last_ok, pid = self.clock.now(), shard.pid
        while True:
            await self.clock.sleep_until(self.clock.now() + every)
            if shard.pid != pid or not shard.up.is_set():       # (re)starting: a fresh start
                last_ok, pid = self.clock.now(), shard.pid
                continue
            if await shard.status("/healthz") is not None:
                last_ok = self.clock.now()
            elif self.clock.now() - last_ok > limit and shard.proc is not None:
                log.error("shard %d (pid %s) has not answered for %.0f s (service.frozen_s): "
                          "killing it", shard.index, pid, self.clock.now() - last_ok)
                with contextlib.suppress(ProcessLookupError):
                    shard.proc.kill()
                shard.up.clear()

    async def _keep(self, shard: ShardProcess) -> None:
        while True:
            code = await shard.wait()
            shard.up.clear()
            if shard.http is not None:
                await shard.http.close()
                shard.http = None
            if self.stopping.is_set():
                return
            # 0: stopped by a signal of its own (the server's stop signal may be on its way)
            log.log(logging.WARNING if code == 0 else logging.ERROR,
                    "shard %d (pid %s) exited with status %s: its sessions ended; restarting it",
                    shard.index, shard.proc.pid if shard.proc else "?", code)
            for attempt in range(START_FAILURES_MAX):
                await asyncio.sleep(_RESTART_BACKOFF_S[min(attempt, len(_RESTART_BACKOFF_S) - 1)])
                if self.stopping.is_set():
                    return
                try:
                    await shard.start()
                    break
                except ShardError as e:
                    log.error("%s", e)
            else:
                raise ShardError(f"shard {shard.index} failed to start {START_FAILURES_MAX} "
                                 "times in a row: stopping the server")
            shard.restarts += 1
            log.info("shard %d restarted (pid %s)", shard.index, shard.pid)

    async def stop(self) -> None:
        """Stop every shard (each drains its sessions first)."""
        await asyncio.gather(*(s.stop(self.grace_s) for s in self.shards))

    def of(self, session_id: str) -> ShardProcess | None:
        """The shard holding this session id (by its prefix), None for a malformed id."""
        head, sep, _ = session_id.partition("-")
        if not sep or not head.isdigit() or int(head) >= len(self.shards):
            return None
        return self.shards[int(head)]


class ShardedApi:
    """The public ``/v1`` routes over a :class:`ShardPool` (the same API as one engine's)."""

    def __init__(self, pool: ShardPool, control: ControlSettings) -> None:
        self.pool, self.control = pool, control
        sv = pool.cfg.server
        self._opens = TokenBuckets(RateLimit(sv.rate_offer_per_min, burst=10))
        self._opening = 0                       # opens being forwarded right now

    def route_table(self) -> list[web.RouteDef]:
        """The aiohttp routes."""
        return [web.post("/v1/sessions", self.open), web.get("/v1/sessions", self.list_sessions),
                web.route("*", "/v1/sessions/{id}", self.forward),
                web.route("*", "/v1/sessions/{id}/{op:.+}", self.forward),
                web.get("/healthz", self.healthz), web.get("/readyz", self.readyz),
                web.get("/v1/openapi.json", self.openapi)]

    async def open(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/sessions: on the least-loaded shard with room."""
        if refused := opens_refused(self._opens, request):
            return refused
        body = await read_body(request)
        statuses = await asyncio.gather(*(s.status() for s in self.pool.shards))
        agg = _aggregate(statuses, self.pool.cfg.server.max_sessions)
        total = self.pool.cfg.server.max_sessions
        room = sorted((st["load"], s.index) for s, st in zip(self.pool.shards, statuses, strict=True)
                      if st is not None and st["sessions"] < st["capacity"])
        if total and agg["sessions"] + self._opening >= total:
            room = []                               # server.max_sessions counts all shards
        self._opening += 1
        try:
            for _, i in room:
                resp = await _relay(request, self.pool.shards[i], body=body)
                if resp is None or resp.status == 503:      # filled up meanwhile, or just died
                    continue
                return resp
        finally:
            self._opening -= 1
        return web.json_response({"error": f"at capacity ({agg['capacity']} sessions on "
                                           f"{len(self.pool.shards)} shards): retry later or add "
                                           "a machine", **agg},
                                 status=503, headers={"Retry-After": "5"})

    async def list_sessions(self, request: web.Request) -> web.Response:
        """GET /v1/sessions: every shard's sessions."""
        async def one(s: ShardProcess) -> list[Any]:
            if s.http is None:
                return []
            try:
                async with s.http.get("/v1/sessions") as r:
                    got: list[Any] = await r.json() if r.status == 200 else []
                    return got
            except (aiohttp.ClientError, ValueError):
                return []
        lists = await asyncio.gather(*(one(s) for s in self.pool.shards))
        return web.json_response([x for xs in lists for x in xs])

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Any /v1/sessions/{id}[/…] request: to the session's shard, answered from there."""
        shard = self.pool.of(request.match_info["id"])
        if shard is None or not shard.up.is_set():
            return json_error(404, "no such session (it ended already, or the id is wrong)")
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._forward_ws(request, shard)
        resp = await _relay(request, shard, body=await read_body(request))
        if resp is None:
            return json_error(404, "no such session (its process ended; open a new one)")
        return resp

    async def _forward_ws(self, request: web.Request, shard: ShardProcess) -> web.StreamResponse:
        assert shard.http is not None
        limit = self.control.max_ws_message_bytes
        try:
            upstream = await shard.http.ws_connect(_upstream_path(request), max_msg_size=limit,
                                                   headers=_request_headers(request))
        except aiohttp.WSServerHandshakeError as e:
            return json_error(e.status, "no such session" if e.status == 404 else
                              f"the session refused the stream ({e.status} {e.message})")
        except aiohttp.ClientError:
            return json_error(404, "no such session (its process ended; open a new one)")
        # (pings of its own: a client that vanished is noticed here, not only at the shard)
        ws = web.WebSocketResponse(max_msg_size=limit, heartbeat=self.control.heartbeat_s)
        await ws.prepare(request)

        async def down() -> None:                # shard → client
            while True:
                msg = await upstream.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
                else:                            # closed, closing or failed
                    await ws.close(code=upstream.close_code or aiohttp.WSCloseCode.GOING_AWAY,
                                   message=(msg.extra or "").encode()[:120]
                                   if isinstance(msg.extra, str) else b"")
                    return

        async def up() -> None:                  # client → shard
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await upstream.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await upstream.send_bytes(msg.data)
            await upstream.close()

        try:
            tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[1] in done:                  # the client closed: let the shard finish
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(tasks[0]), 5.0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await upstream.close()
            await ws.close()
        return ws

    async def healthz(self, request: web.Request) -> web.Response:
        """Alive: every shard up and no session's face frozen."""
        statuses = await asyncio.gather(*(s.status("/healthz") for s in self.pool.shards))
        agg = _aggregate(statuses, self.pool.cfg.server.max_sessions)
        down = [s.index for s, st in zip(self.pool.shards, statuses, strict=True) if st is None]
        frozen = [sid for st in statuses if st is not None for sid in st.get("frozen", [])]
        ok = not down and not frozen
        return web.json_response({"ok": ok, "frozen": frozen, "shards_down": down, **agg,
                                  "shards": self._shards(statuses)}, status=200 if ok else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        """200 while a shard has room for another session."""
        statuses = await asyncio.gather(*(s.status() for s in self.pool.shards))
        agg = _aggregate(statuses, self.pool.cfg.server.max_sessions)
        ready = agg["sessions"] < agg["capacity"] and any(
            st is not None and st["sessions"] < st["capacity"] for st in statuses)
        return web.json_response({"ready": ready, **agg,
                                  "shards": self._shards(statuses)}, status=200 if ready else 503)

    async def openapi(self, request: web.Request) -> web.Response:
        """GET /v1/openapi.json (the same API as one engine's)."""
        return web.json_response(session_document())

    def _shards(self, statuses: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
        return [{"index": s.index, "pid": s.pid, "up": st is not None, "restarts": s.restarts,
                 "sessions": st["sessions"] if st else 0,
                 "capacity": st["capacity"] if st else 0}
                for s, st in zip(self.pool.shards, statuses, strict=True)]


def _aggregate(statuses: list[dict[str, Any] | None], max_sessions: int = 0) -> dict[str, Any]:
    """Load figures over the shards that answered (the keys of ``Engine.status``); capacity is
    at most ``max_sessions`` where set."""
    up = [st for st in statuses if st is not None]
    sessions = sum(st["sessions"] for st in up)
    capacity = sum(st["capacity"] for st in up)
    if max_sessions:
        capacity = min(capacity, max_sessions)
    return {"sessions": sessions, "capacity": capacity,
            "load": round(sessions / capacity, 3) if capacity else 1.0,
            "per_session_load": round(max((st["per_session_load"] for st in up), default=0.0), 4),
            "inference_waiting": sum(st["inference_waiting"] for st in up)}


def _upstream_path(request: web.Request) -> str:
    """The path and query for the shard (the client's ``token`` is the parent's business)."""
    query = [(k, v) for k, v in request.query.items() if k != "token"]
    return str(request.rel_url.with_query(query)) if query else request.path


def _request_headers(request: web.Request) -> dict[str, str]:
    headers = {k: request.headers[k] for k in _FORWARD_REQUEST if k in request.headers}
    headers["X-Forwarded-For"] = request.remote or "?"
    return headers


async def _relay(request: web.Request, shard: ShardProcess, body: bytes
                 ) -> web.StreamResponse | None:
    """Send the request to ``shard`` and answer with its response (an event stream is copied
    as it comes); None when the shard cannot be reached."""
    if shard.http is None:
        return None
    try:
        upstream = await shard.http.request(request.method, _upstream_path(request), data=body,
                                            headers=_request_headers(request))
    except aiohttp.ClientError:
        return None
    async with upstream:
        headers = {k: upstream.headers[k] for k in _FORWARD_RESPONSE if k in upstream.headers}
        if upstream.content_type != "text/event-stream":
            return web.Response(status=upstream.status, body=await upstream.read(),
                                headers=headers)
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        # The client may be gone before the first byte (a tab closed): nothing to answer then.
        with contextlib.suppress(aiohttp.ClientError, ConnectionResetError):
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
        return resp


def make_sharded_app(pool: ShardPool, control: ControlSettings,
                     security: SecuritySettings) -> web.Application:
    """The public application of a sharded ``serve`` (the pool must be started)."""
    app = web.Application(client_max_size=1024 * 1024)
    api = ShardedApi(pool, control)
    app.add_routes(api.route_table())
    install(app, security)
    return app
