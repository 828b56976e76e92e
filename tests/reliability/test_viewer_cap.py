"""Row 5 of issue 13: the viewer cap holds under concurrent offers (offers still negotiating hold
a slot), and /offer is rate limited per client.  Real aiortc peers offer to the real aiohttp app
(make_app + the control API's security middlewares) on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp
import pytest

from avatar_agent.server.control import ControlSettings, mount, security_settings

from ..server.controller import QueueController

aiortc = pytest.importorskip("aiortc")

from aiohttp.test_utils import TestServer  # noqa: E402
from aiortc import RTCPeerConnection  # noqa: E402

from avatar_agent.server.app import make_app  # noqa: E402
from avatar_agent.sinks.webrtc import WebRtcSink  # noqa: E402


async def _offer_sdp() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def _serve(sink: WebRtcSink, **security: float) -> AsyncIterator[str]:
    ctl = QueueController()
    await ctl.start()
    app = make_app(sink)
    mount(app, ctl, ControlSettings(), security_settings(**security))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
        await sink.close()
        await ctl.stop()


@pytest.fixture
async def capped() -> AsyncIterator[tuple[WebRtcSink, str]]:
    sink = WebRtcSink(max_viewers=3, connect_grace=60.0)
    await sink.start(64, 64, 25)
    async for url in _serve(sink, rate_offer_per_min=1e5):
        yield sink, url


async def test_row5_concurrent_offers_never_exceed_max_viewers(capped: tuple[WebRtcSink, str]
                                                               ) -> None:
    sink, url = capped
    peers = await asyncio.gather(*(_offer_sdp() for _ in range(12)))
    try:
        async with aiohttp.ClientSession() as s:

            async def post(sdp: str) -> int:
                async with s.post(url + "/offer", json={"sdp": sdp, "type": "offer"}) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(post(sdp) for _, sdp in peers))
        # Before: every offer passed the check before any of them was added (all 12 accepted).
        assert sorted(statuses) == [200] * 3 + [503] * 9
        assert sink.viewers == 3 and sink.pending_offers == 0
        # A slot freed by a leaving viewer is offered again.
        await sink.close_session(sink.sessions[0])
        pc, sdp = await _offer_sdp()
        peers.append((pc, sdp))
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/offer", json={"sdp": sdp, "type": "offer"}) as r:
                assert r.status == 200
        assert sink.viewers == 3
    finally:
        await asyncio.gather(*(pc.close() for pc, _ in peers))


async def test_row5_offers_are_rate_limited_per_client() -> None:
    sink = WebRtcSink(max_viewers=64, connect_grace=60.0)
    await sink.start(64, 64, 25)
    async for url in _serve(sink, rate_offer_per_min=30.0):
        peers = await asyncio.gather(*(_offer_sdp() for _ in range(14)))
        try:
            statuses = []
            async with aiohttp.ClientSession() as s:
                for _, sdp in peers:
                    async with s.post(url + "/offer", json={"sdp": sdp, "type": "offer"}) as r:
                        statuses.append(r.status)
                        if r.status == 429:
                            assert int(r.headers["Retry-After"]) >= 1
                            assert "rate limit for offer" in (await r.json())["error"]
            assert statuses[:10] == [200] * 10 and set(statuses[10:]) == {429}   # burst of 10
            assert sink.viewers == 10
        finally:
            await asyncio.gather(*(pc.close() for pc, _ in peers))
