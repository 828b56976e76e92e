"""The hostile client of the live fault test, run as its own process (so the measuring viewer's
event loop never does the attacker's work): ``python -m tests.reliability.attack NAME URL``.

Prints one JSON line: what the server answered."""

from __future__ import annotations

import asyncio
import collections
import json
import sys
from typing import Any

import aiohttp


async def upload(url: str) -> dict[str, Any]:
    """Row 3: 32 MB of u8 PCM at 1 kHz (9 hours of audio) in one POST."""
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "api/audio?rate=1000&format=u8", data=bytes(32 * 1024 * 1024 - 1024),
                          headers={"Content-Type": "application/octet-stream"}) as r:
            return {"status": r.status, "error": (await r.json()).get("error", "")}


async def idle_stream(url: str) -> dict[str, Any]:
    """Row 4: a WebSocket stream sends 0.5 s and stays open; a say() follows it."""
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url + "api/audio/ws") as ws:
            await ws.send_str(json.dumps({"rate": 16000}))
            await ws.receive_json(timeout=10)
            await ws.send_bytes(b"\x10\x20" * 8000)
            msgs = []
            async with s.post(url + "api/say", json={"text": "Still here."}) as r:
                said = r.status
            while True:
                msg = await ws.receive(timeout=15)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                msgs.append(json.loads(msg.data))
    return {"say": said, "messages": msgs}


async def offers(url: str) -> dict[str, Any]:
    """Row 5: 50 concurrent valid offers from one client."""
    from aiortc import RTCPeerConnection

    pcs = []
    for _ in range(50):
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        pcs.append(pc)
    async with aiohttp.ClientSession() as s:

        async def post(pc: Any) -> int:
            async with s.post(url + "offer", json={"sdp": pc.localDescription.sdp,
                                                   "type": "offer"}) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(post(pc) for pc in pcs))
    await asyncio.gather(*(pc.close() for pc in pcs))
    return {"statuses": dict(collections.Counter(statuses))}


async def interrupts(url: str) -> dict[str, Any]:
    """Row 13: a say, then 1000 concurrent interrupts."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as s:
        async with s.post(url + "api/say", json={"text": "Interrupt me if you can."}) as r:
            said = r.status

        async def hit() -> tuple[int, bool]:
            async with s.post(url + "api/interrupt") as r:
                body = await r.json()
                return r.status, r.status == 200 and not body.get("coalesced")

        got = await asyncio.gather(*(hit() for _ in range(1000)))
    return {"say": said, "statuses": dict(collections.Counter(st for st, _ in got)),
            "real": sum(real for _, real in got)}


ATTACKS = {"upload": upload, "idle_stream": idle_stream, "offers": offers,
           "interrupts": interrupts}


if __name__ == "__main__":
    name, url = sys.argv[1], sys.argv[2]
    print(json.dumps(asyncio.run(ATTACKS[name](url))))
