"""The aiohttp app: routes, offer validation, and the real page played by headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from avatar_agent.server.app import make_app, runner_urls, serve
from avatar_agent.sinks.webrtc import WebRtcSink
from tests.sinks.conftest import live_stream, loopback_ice

pytestmark = pytest.mark.timeout(90)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium never gathers ICE candidates on loopback, so it needs some other interface (any
# address works: the aiortc side offers only 127.0.0.1 and the packets still stay on this host).
ONLY_LOOPBACK = all(name == "lo" for _i, name in socket.if_nameindex())


async def _request(url: str, method: str = "GET", **kw: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, **kw) as r:
            return r.status, await r.text()


async def test_routes_and_offer_errors() -> None:
    sink = WebRtcSink()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="frames_total 7\n")

    runner = await serve(make_app(sink, [web.get("/metrics", metrics)]), port=0)
    url = runner_urls(runner)[0]
    try:
        status, text = await _request(url + "offer", "POST", json={"sdp": "v=0\r\n", "type": "offer"})
        assert status == 503 and "not started" in text  # the stream is not up yet
        await sink.start(160, 120, 25)

        status, page = await _request(url)
        assert status == 200 and "<video" in page and "/static/app.js" in page
        status, js = await _request(url + "static/app.js")
        assert status == 200 and '"/offer"' in js and "recvonly" in js
        status, text = await _request(url + "healthz")
        assert status == 200 and json.loads(text) == {"ok": True, "viewers": 0}
        status, text = await _request(url + "metrics")
        assert (status, text) == (200, "frames_total 7\n")

        status, text = await _request(url + "offer", "POST", data=b"{not json")
        assert status == 400 and "must be JSON" in json.loads(text)["error"]
        status, text = await _request(url + "offer", "POST", json={"sdp": 5})
        assert status == 400 and '"sdp" and "type"' in json.loads(text)["error"]
        status, text = await _request(url + "offer", "POST", json={"sdp": "v=0\r\n", "type": "answer"})
        assert status == 400 and "type 'offer'" in json.loads(text)["error"]
        status, text = await _request(url + "offer", "POST", json={"sdp": "garbage", "type": "offer"})
        assert status == 400 and "v=0" in json.loads(text)["error"]
        status, text = await _request(url + "offer", "GET")
        assert status == 405
        status, text = await _request(url + "offer", "POST", data=b"garbage",
                                      headers={"Content-Type": "application/sdp"})
        assert status == 400 and "v=0" in json.loads(text)["error"]   # WHIP-style body, same checks
        for bad in ("nope", "%C3%A9t%C3%A9"):   # unknown ids, ASCII or not
            status, text = await _request(url + "session/" + bad, "DELETE")
            assert status == 404 and "no such session" in json.loads(text)["error"]
        assert sink.viewers == 0
    finally:
        await runner.cleanup()
        await sink.close()


async def test_make_app_wires_the_uplink_callback() -> None:
    def push(samples: Any, final: bool) -> None: ...

    sink = WebRtcSink()
    make_app(sink)
    assert sink.on_uplink_audio is None
    make_app(sink, on_uplink_audio=push)
    assert sink.on_uplink_audio is push
    make_app(sink)                      # None keeps what the sink has
    assert sink.on_uplink_audio is push


async def test_serve_reports_busy_port() -> None:
    sink = WebRtcSink()
    runner = await serve(make_app(sink), port=0)
    port = int(runner_urls(runner)[0].rsplit(":", 1)[1].strip("/"))
    try:
        with pytest.raises(OSError, match="pick another port"):
            await serve(make_app(sink), port=port)
    finally:
        await runner.cleanup()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),  # CI must have it
                    reason="needs the chromium browser (apt install chromium)")
@pytest.mark.skipif(ONLY_LOOPBACK, reason="Chromium gathers no ICE candidates on a loopback-only host")
@pytest.mark.parametrize("token", ["", "page-test-token-0123456789"], ids=["open", "token"])
async def test_chromium_plays_the_page(token: str) -> None:
    """A real browser opens / , negotiates via /offer, decodes video and receives audio.

    With a bearer token installed (security middlewares), the page opened as /?token=... must
    carry it on every request it makes (script, offer, report).
    """
    if token:
        pytest.importorskip("avatar_agent.server.security")
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def report(request: web.Request) -> web.Response:
        if not got.done():
            got.set_result(await request.json())
        return web.json_response({"ok": True})

    with loopback_ice(), tempfile.TemporaryDirectory() as profile:
        async with live_stream(320, 240, freq=440.0, amp=0.5, token=token,
                               extra_routes=[web.post("/report", report)]) as live:
            if token:  # without the token the page and the offer endpoint are closed
                assert (await _request(live.url))[0] == 401
                assert (await _request(live.url + "offer", "POST", json={}))[0] == 401
            cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", f"--user-data-dir={profile}",
                   "--autoplay-policy=no-user-gesture-required",
                   "--disable-features=WebRtcHideLocalIpsWithMdns",
                   live.url + "?report=1&frames=40&endpoint=/report" + (f"&token={token}" if token else "")]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                result = await asyncio.wait_for(got, 60)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)  # Chromium and the helpers it started
                try:
                    await asyncio.to_thread(proc.wait, 10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    await asyncio.to_thread(proc.wait, 10)
            assert live.player_error is None
    assert result["connectionState"] == "connected", result
    assert result["frames"] >= 40 and result["framesDecoded"] >= 40, result
    assert (result["width"], result["height"]) == (320, 240)
    assert result["audioTracks"] == 1 and result["videoTracks"] == 1
    assert result["muted"] is False  # autoplay with sound was allowed by the flag
    assert result["audioSamples"] > 48_000 * 0.5, result  # > 0.5 s of audio received
    # totalAudioEnergy / duration is the mean square audio level: a tone at amplitude 0.5
    # reads about 0.5² (level is measured as the peak of each block); silence would be ~0.
    level = (result["audioEnergy"] / max(result["audioDuration"], 1e-9)) ** 0.5
    assert 0.25 < level < 0.75, result
