"""Security middlewares: token, body limits, time limit, rate limits, CORS/origin, Host, paths."""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from avatar_agent.server import security
from avatar_agent.server.control import ControlSettings, control_routes, security_settings
from avatar_agent.server.security import (InsecureBindError, PathNotAllowedError, RateLimit,
                                          SecuritySettings, TokenBuckets, check_avatar_path,
                                          install, is_loopback)

from .controller import QueueController

TOKEN = "s3cret-token-0123456789abcdef"


class Harness:
    def __init__(self, ctl: QueueController, server: TestServer, now: list[float]) -> None:
        self.ctl, self.server, self.now = ctl, server, now
        self.url = str(server.make_url("")).rstrip("/")


async def start(tmp_path: Path, *, now: list[float] | None = None, **sec: object
                ) -> tuple[Harness, QueueController]:
    ctl = QueueController()
    await ctl.start()
    app = web.Application()
    s = ControlSettings(avatar_dirs=(str(tmp_path / "avatars"),), stats_interval_s=0)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({"slow": True})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.add_routes(control_routes(ctl, s) + [web.get("/slow", slow), web.get("/healthz", healthz)])
    clock = now if now is not None else [0.0]
    settings = security_settings(avatar_dirs=s.avatar_dirs, **sec)  # type: ignore[arg-type]
    install(app, settings, now=lambda: clock[0])
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return Harness(ctl, server, clock), ctl


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator:
    (tmp_path / "avatars").mkdir()
    made: list[tuple[Harness, QueueController]] = []

    async def factory(**sec: object) -> Harness:
        h, ctl = await start(tmp_path, **sec)
        made.append((h, ctl))
        return h

    yield factory
    for h, ctl in made:
        await h.server.close()
        await ctl.stop()


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------

def test_non_loopback_bind_needs_a_token() -> None:
    with pytest.raises(InsecureBindError, match="server.token"):
        SecuritySettings(host="0.0.0.0")
    with pytest.raises(InsecureBindError):
        security_settings(host="192.168.1.20")
    with pytest.raises(ValueError, match="at least 16"):
        SecuritySettings(host="0.0.0.0", token="short")
    assert SecuritySettings(host="0.0.0.0", token=TOKEN).token == TOKEN
    for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        assert is_loopback(h) and SecuritySettings(host=h).token == ""
    for h in ("0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.evil.com"):
        assert not is_loopback(h)
    with pytest.raises(ValueError, match="no '\\*'"):
        SecuritySettings(cors_origins=("*",))


# ------------------------------------------------------------------------------------------------
# Token
# ------------------------------------------------------------------------------------------------

async def test_bearer_token_required_when_configured(make) -> None:
    h = await make(token=TOKEN)
    async with aiohttp.ClientSession() as s:
        async with s.get(h.url + "/api/status") as r:
            assert r.status == 401 and "Bearer" in r.headers["WWW-Authenticate"]
        async with s.get(h.url + "/api/status", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with s.get(h.url + "/api/status",
                         headers={"Authorization": f"Bearer {TOKEN}x"}) as r:
            assert r.status == 401
        async with s.get(h.url + "/api/status", headers={"Authorization": TOKEN}) as r:
            assert r.status == 401                          # scheme missing
        async with s.post(h.url + "/api/say", json={"text": "hi"}) as r:
            assert r.status == 401
        async with s.get(h.url + "/api/status",
                         headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
        async with s.get(h.url + "/api/status", params={"token": TOKEN}) as r:
            assert r.status == 200                          # EventSource-style clients
        async with s.get(h.url + "/healthz") as r:
            assert r.status == 200                          # public path
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await s.ws_connect(h.url + "/api/events/ws")
        assert e.value.status == 401
    assert h.ctl.calls == []                                # nothing reached the controller


async def test_token_compare_is_constant_time_on_fixed_length_digests(
        make, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    h = await make(token=TOKEN)
    async with aiohttp.ClientSession() as s:
        for given in ("x", TOKEN[:-1], TOKEN + "y" * 1000, TOKEN):
            async with s.get(h.url + "/api/status",
                             headers={"Authorization": f"Bearer {given}"}) as r:
                assert r.status == (200 if given == TOKEN else 401)
    # Every comparison, whatever the guess's length, is hmac.compare_digest of two SHA-256s.
    assert seen == [(32, 32)] * 4


# ------------------------------------------------------------------------------------------------
# Size and time limits
# ------------------------------------------------------------------------------------------------

async def test_huge_payloads_get_413_before_being_read(make) -> None:
    h = await make(max_body_kb=1, max_upload_mb=0.1)
    async with aiohttp.ClientSession() as s:
        async with s.post(h.url + "/api/say", json={"text": "a" * 2000}) as r:
            assert r.status == 413 and "limit" in (await r.json())["error"]

        async def chunked(n: int):
            for _ in range(n):
                yield b"0" * 1024

        # No Content-Length (chunked): stopped while reading.
        async with s.post(h.url + "/api/say", data=chunked(8),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413
        async with s.post(h.url + "/api/audio", data=b"\x00\x01" * 25_000,
                          params={"rate": "16000"}) as r:
            assert r.status == 200                          # uploads have their own limit
        async with s.post(h.url + "/api/audio", data=chunked(200), params={"rate": "16000"}) as r:
            assert r.status == 413
        # 50 MB announced: refused from the header alone (the client gets its answer early).
        try:
            async with s.post(h.url + "/api/audio", data=b"\x00" * (50 << 20)) as r:
                assert r.status == 413
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            pass                                            # server closed while we still sent
        async with s.get(h.url + "/api/status") as r:
            assert r.status == 200
    assert h.ctl.calls == ["push_audio"]


async def test_slow_requests_time_out_but_event_streams_do_not(make) -> None:
    h = await make(request_timeout_s=0.3)
    async with aiohttp.ClientSession() as s:
        async with s.get(h.url + "/slow") as r:
            assert r.status == 408
        async with s.get(h.url + "/api/events") as r:
            assert r.status == 200
            await asyncio.sleep(0.6)                       # longer than the request limit
            h.ctl.source.push(__import__("numpy").zeros(320, "float32"))
            line = b""
            while b"speech_started" not in line:
                line = await asyncio.wait_for(r.content.readline(), 10)


# ------------------------------------------------------------------------------------------------
# Rate limits
# ------------------------------------------------------------------------------------------------

async def test_rate_limits_on_say_and_push(make) -> None:
    h = await make(rate_say_per_min=6, rate_push_per_min=12)   # bursts: 1 say, 2 pushes
    async with aiohttp.ClientSession() as s:
        async with s.post(h.url + "/api/say", json={"text": "one"}) as r:
            assert r.status == 200
        async with s.post(h.url + "/api/say", json={"text": "two"}) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "10" and "retry in 10.0 s" in (await r.json())["error"]
        async with s.post(h.url + "/api/emotion", json={"name": "fear"}) as r:
            assert r.status == 200                          # other routes are not limited
        for expect in (200, 200, 429):
            async with s.post(h.url + "/api/audio", data=b"\x00\x00" * 320) as r:
                assert r.status == expect
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await s.ws_connect(h.url + "/api/audio/ws")     # stream openings count as pushes
        assert e.value.status == 429
        h.now[0] += 10.0                                    # one say token refilled
        async with s.post(h.url + "/api/say", json={"text": "three"}) as r:
            assert r.status == 200
    assert h.ctl.calls.count("say") == 2 and h.ctl.calls.count("push_audio") == 2


def test_token_buckets_are_per_client_and_bounded() -> None:
    t = [0.0]
    b = TokenBuckets(RateLimit(60, burst=2), now=lambda: t[0], max_keys=3)
    assert [b.take("a"), b.take("a")] == [0.0, 0.0]
    assert b.take("a") == pytest.approx(1.0)
    assert b.take("b") == 0.0                               # another IP has its own bucket
    t[0] += 0.5
    assert b.take("a") == pytest.approx(0.5)
    t[0] += 0.5
    assert b.take("a") == 0.0
    for k in "cdefg":
        b.take(k)
    assert len(b._state) <= 3                              # noqa: SLF001 (bounded table)


# ------------------------------------------------------------------------------------------------
# Browser origins and Host
# ------------------------------------------------------------------------------------------------

async def test_cors_only_for_configured_origins(make) -> None:
    ok_origin = "https://chat.example.com"
    h = await make(cors_origins=[ok_origin])
    pre = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type, authorization"}
    async with aiohttp.ClientSession() as s:
        async with s.options(h.url + "/api/say", headers={"Origin": ok_origin, **pre}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == ok_origin
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        async with s.post(h.url + "/api/emotion", json={"name": "sadness"},
                          headers={"Origin": ok_origin}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == ok_origin
        async with s.get(h.url + "/api/events", headers={"Origin": ok_origin}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == ok_origin   # streaming too
        evil = "https://evil.example.net"
        async with s.options(h.url + "/api/say", headers={"Origin": evil, **pre}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        async with s.post(h.url + "/api/say", json={"text": "pwned"},
                          headers={"Origin": evil}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        async with s.post(h.url + "/api/say", data='{"text": "pwned"}',
                          headers={"Origin": "null", "Content-Type": "text/plain"}) as r:
            assert r.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await s.ws_connect(h.url + "/api/audio/ws", origin=evil)
        assert e.value.status == 403
        host = h.url.split("//", 1)[1]
        async with s.post(h.url + "/api/gaze", json={"x": 0.1, "y": 0.2},
                          headers={"Origin": f"http://{host}"}) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    assert "say" not in h.ctl.calls and h.ctl.gaze == (0.1, 0.2)


async def test_dns_rebinding_host_is_refused_on_loopback(make) -> None:
    h = await make()
    async with aiohttp.ClientSession() as s:
        async with s.get(h.url + "/api/status", headers={"Host": "attacker.example:80"}) as r:
            assert r.status == 421
        for host in ("localhost:8080", "127.0.0.1", "[::1]:9"):
            async with s.get(h.url + "/api/status", headers={"Host": host}) as r:
                assert r.status == 200, host


# ------------------------------------------------------------------------------------------------
# Avatar paths
# ------------------------------------------------------------------------------------------------

def test_check_avatar_path_refuses_traversal_and_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "avatars"
    (root / "sub").mkdir(parents=True)
    face = root / "face.png"
    face.write_bytes(b"x")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"s")
    os.symlink(secret, root / "link.png")
    os.symlink(tmp_path, root / "sub" / "up")
    assert check_avatar_path("face.png", [root]) == face.resolve()
    assert check_avatar_path("sub/../face.png", [root]) == face.resolve()
    assert check_avatar_path(str(face), [root]) == face.resolve()
    for bad in ("../secret.png", str(secret), "link.png", "sub/up/secret.png", "/etc/passwd",
                "sub/../../secret.png", "face.png\x00.jpg", "", 5, None, ["face.png"]):
        with pytest.raises(PathNotAllowedError):
            check_avatar_path(bad, [root])
    with pytest.raises(FileNotFoundError):
        check_avatar_path("missing.png", [root])
    with pytest.raises(PathNotAllowedError, match="no avatar directories"):
        check_avatar_path("face.png", [])


async def test_avatar_route_returns_403_for_traversal(make, tmp_path: Path) -> None:
    h = await make()
    (tmp_path / "outside.png").write_bytes(b"x")
    async with aiohttp.ClientSession() as s:
        for p in ("../outside.png", str(tmp_path / "outside.png"), "a\u0000b"):
            async with s.post(h.url + "/api/avatar", json={"path": p}) as r:
                assert r.status == 403, p
        async with s.post(h.url + "/api/avatar", json={"path": "%2e%2e/outside.png"}) as r:
            assert r.status == 404                          # a literal name inside the folder
    assert h.ctl.avatar is None


# ------------------------------------------------------------------------------------------------
# Together with the viewer app (make_app) and its /offer endpoint
# ------------------------------------------------------------------------------------------------

async def test_security_covers_the_viewer_app_and_malformed_sdp(tmp_path: Path) -> None:
    pytest.importorskip("aiortc")
    from avatar_agent.server.app import make_app
    from avatar_agent.sinks.webrtc import WebRtcSink

    sink = WebRtcSink()
    await sink.start(64, 64, 25)
    ctl = QueueController()
    await ctl.start()
    app = make_app(sink, extra_routes=control_routes(ctl, ControlSettings()))
    install(app, security_settings(token=TOKEN))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/offer", json={"sdp": "v=0", "type": "offer"}) as r:
                assert r.status == 401
            for body in ({"sdp": "v=0\r\n", "type": "offer"}, {"sdp": "garbage", "type": "offer"},
                         {"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "type": "answer"},
                         {"sdp": 5, "type": "offer"}, {"sdp": "\x00" * 1000, "type": "offer"}):
                async with s.post(url + "/offer", json=body, headers=auth) as r:
                    assert r.status == 400, body
            async with s.post(url + "/offer", data=b"{" * 5000, headers=auth) as r:
                assert r.status == 400
            async with s.post(url + "/api/say", json={"text": "hi"}, headers=auth) as r:
                assert r.status == 200
            async with s.get(url + "/healthz") as r:
                assert r.status == 200
    finally:
        await server.close()
        await ctl.stop()
        await sink.close()
