"""Control API: say/push/interrupt/events flows through a real speech queue, hostile input."""

from __future__ import annotations

import asyncio
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from aiohttp import web
from aiohttp.test_utils import TestServer

from avatar_agent.audio.resample import to_pipeline
from avatar_agent.audio.tts import synthesize
from avatar_agent.client import ApiError, AsyncAvatarClient, Event
from avatar_agent.server.control import ENDPOINTS, ControlSettings, mount, security_settings
from avatar_agent.types import FRAME_SAMPLES

from .controller import QueueController


@dataclass
class Api:
    ctl: QueueController
    url: str
    app: web.Application
    made: list

    def client(self) -> AsyncAvatarClient:
        return AsyncAvatarClient(self.url)


async def serve(ctl: QueueController, tmp_path: Path, **sec: object) -> tuple[TestServer, web.Application]:
    app = web.Application()
    s = ControlSettings(avatar_dirs=(str(tmp_path),), stats_interval_s=0.2)
    sec = {"rate_say_per_min": 1e5, "rate_push_per_min": 1e5, **sec}   # limits: test_security
    mount(app, ctl, s, security_settings(avatar_dirs=s.avatar_dirs, **sec))  # type: ignore[arg-type]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, app


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    made: list = []

    def tts(text: str, voice: str, rate: int):          # real espeak-ng, remembering its output
        made.append(synthesize(text, voice, rate))
        return made[-1]

    ctl = QueueController(synthesize=tts, max_queued_s=20.0)
    await ctl.start()
    server, app = await serve(ctl, tmp_path)
    try:
        yield Api(ctl, str(server.make_url("")).rstrip("/"), app, made)
    finally:
        await server.close()
        await ctl.stop()


async def collect(events: AsyncIterator[Event], until: callable, timeout: float = 20.0
                  ) -> list[Event]:
    out: list[Event] = []

    async def run() -> None:
        async for ev in events:
            out.append(ev)
            if until(ev):
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def wait_for(cond: callable, timeout: float = 20.0) -> None:
    async def run() -> None:
        while not cond():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(run(), timeout)


# ------------------------------------------------------------------------------------------------
# Flows
# ------------------------------------------------------------------------------------------------

async def test_say_speaks_and_sse_reports_start_and_finish(api: Api) -> None:
    async with api.client() as c:
        events = c.events(types=["speech_started", "speech_finished"])
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.2)                         # subscribed before speaking
        uid = await c.say("Hello there.", emotion="happiness")
        got = [await asyncio.wait_for(first, 20)]
        got += await collect(events, lambda e: e.kind == "speech_finished")
        await events.aclose()
    assert [e.kind for e in got] == ["speech_started", "speech_finished"]
    assert all(e.data["utterance"] == uid for e in got)
    assert got[0].id is not None and got[1].id > got[0].id
    start, end = got[0].data["sample"], got[1].data["sample"]
    (utt,) = api.made
    assert end - start == utt.audio.size and not got[1].data["interrupted"]
    played = api.ctl.audio()[start:end]
    assert np.array_equal(played, utt.audio)           # exactly the synthesized speech
    assert api.ctl.emotion == ("happiness", None)


async def test_interrupt_cuts_speech_and_events_over_websocket_say_so(api: Api) -> None:
    async with api.client() as c:
        events = c.events(websocket=True)
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.2)
        uid = await c.say("This is a long sentence that will be interrupted before it ends, "
                          "because the user started talking.")
        second = await c.say("And this one never starts.")
        started = [await asyncio.wait_for(first, 20)]
        started += await collect(events, lambda e: e.kind == "speech_started")
        assert started[-1].data["utterance"] == uid
        await asyncio.sleep(0.3)
        res = await c.interrupt()
        fin = await collect(events, lambda e: e.kind == "speech_finished"
                            and e.data["utterance"] == second)
        await events.aclose()
    assert res["utterance"] == uid
    by_id = {e.data["utterance"]: e.data for e in fin if e.kind == "speech_finished"}
    cut = by_id[uid]["sample"]
    assert res["frame"] == cut // (2 * FRAME_SAMPLES)              # the first frame cut (25 fps)
    assert by_id[uid] == {"utterance": uid, "sample": cut, "interrupted": True, "started": True}
    assert by_id[second]["started"] is False and by_id[second]["interrupted"] is True
    await wait_for(lambda: len(api.ctl.frames) * FRAME_SAMPLES >= cut + 10 * FRAME_SAMPLES)
    audio = api.ctl.audio()
    spoke_from = started[-1].data["sample"]
    assert cut > spoke_from and np.abs(audio[spoke_from:cut]).max() > 0.05   # it was speaking
    assert not audio[cut:cut + 10 * FRAME_SAMPLES].any()        # silence from the cut on


async def test_websocket_pcm_push_ends_up_as_frames_with_the_same_samples(api: Api) -> None:
    rng = np.random.default_rng(1)
    x = (rng.uniform(-0.5, 0.5, 16000 * 1)).astype(np.float32)
    async with api.client() as c:
        events = c.events(types=["speech_started", "speech_finished"])
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.2)
        async with c.audio_stream(rate=16000, format="f32le") as s:
            for k in range(0, x.size, 1234):            # odd block sizes
                await s.send(x[k:k + 1234].tobytes())
        got = [await asyncio.wait_for(first, 20)]
        got += await collect(events, lambda e: e.kind == "speech_finished")
        await events.aclose()
    assert s.utterance == got[0].data["utterance"] and s.errors == []
    assert s.duration_s == pytest.approx(1.0)
    start, end = got[0].data["sample"], got[-1].data["sample"]
    assert end - start == x.size
    assert np.array_equal(api.ctl.audio()[start:end], x)


async def test_websocket_push_at_48k_stereo_is_resampled(api: Api) -> None:
    t = np.arange(48000 // 2) / 48000
    left = 0.4 * np.sin(2 * np.pi * 440 * t)
    pcm = (np.stack([left, left], 1) * 32767).astype("<i2")
    async with api.client() as c:
        uid = await c.stream_audio([pcm[k:k + 960].tobytes() for k in range(0, len(pcm), 960)],
                                   rate=48000, channels=2, format="s16le")
        await wait_for(lambda: api.ctl.source.pending == 0 and api.ctl.source.current is None)
    assert uid is not None
    want = to_pipeline(pcm, 48000, 2)
    audio = api.ctl.audio()
    start = int(np.flatnonzero(np.abs(audio) > 1e-3)[0])
    start -= start % FRAME_SAMPLES
    got = audio[start:start + want.size]
    assert got.size == want.size
    assert np.allclose(got, want, atol=2e-3)             # streaming vs one-shot soxr


async def test_http_upload_of_a_wav_and_of_raw_pcm(api: Api) -> None:
    rng = np.random.default_rng(2)
    stereo = rng.uniform(-0.3, 0.3, (11025, 2)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, stereo, 22050, format="WAV", subtype="PCM_16")
    wav = buf.getvalue()
    decoded, _ = sf.read(io.BytesIO(wav), dtype="float32")
    raw = (rng.uniform(-0.3, 0.3, 8000) * 32767).astype("<i2")
    async with api.client() as c:
        r1 = await c.push_audio(wav)
        r2 = await c.push_audio(raw.tobytes(), rate=16000, channels=1, format="s16le")
        with pytest.raises(ApiError) as e:
            await c.push_audio(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
        assert e.value.status == 400 and "WAV" in e.value.message
        with pytest.raises(ApiError) as e:
            await c.push_audio(b"\x00" * 3, rate=16000, format="s16le")
        assert e.value.status == 400
        with pytest.raises(ApiError) as e:
            await c.request("POST", "/api/audio", data=b"\x00\x00", query={"rate": "7"})
        assert e.value.status == 400 and "rate" in e.value.message
    assert r2["utterance"] == r1["utterance"] + 1
    w1 = to_pipeline(decoded, 22050, 2)
    assert r1["samples"] == w1.size and r1["duration_s"] == pytest.approx(0.5, abs=0.01)
    await wait_for(lambda: api.ctl.source.pending == 0)
    audio = api.ctl.audio()
    start = int(np.flatnonzero(audio)[0])
    assert np.array_equal(audio[start:start + w1.size], w1)
    n1 = -(-w1.size // FRAME_SAMPLES) * FRAME_SAMPLES
    assert np.array_equal(audio[start + n1:start + n1 + raw.size], raw / np.float32(32768))


async def test_face_controls_set_the_controller(api: Api) -> None:
    async with api.client() as c:
        await c.set_emotion("surprise", 0.7)
        await c.set_scales(expression=1.5)
        await c.set_gaze(-0.5, 0.25)
        st = await c.status()
        for bad in ({"name": "joy"}, {"name": "anger", "intensity": 2}, {"intensity": 0.5}):
            with pytest.raises(ApiError) as e:
                await c.request("POST", "/api/emotion", bad)
            assert e.value.status == 400
        with pytest.raises(ApiError):
            await c.request("POST", "/api/scales", {})
        with pytest.raises(ApiError):
            await c.request("POST", "/api/gaze", {"x": 3, "y": 0})
    assert api.ctl.emotion == ("surprise", 0.7)
    assert api.ctl.scales == {"expression": 1.5, "head": 1.0}
    assert api.ctl.gaze == (-0.5, 0.25)
    assert st["emotion"] == "surprise" and st["position"] == st["frames"] * FRAME_SAMPLES


async def test_avatar_swap_in_background_then_event(api: Api, tmp_path: Path) -> None:
    import cv2

    img = tmp_path / "face.png"
    cv2.imwrite(str(img), np.full((32, 32, 3), 128, np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    async with api.client() as c:
        events = c.events(types=["avatar_ready", "avatar_failed"])
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.2)
        r = await c.swap_avatar("face.png")
        ev = await asyncio.wait_for(first, 20)
        await events.aclose()
        assert r == {"path": str(img.resolve()), "ready": False}
        assert ev.kind == "avatar_ready" and ev.data["path"] == str(img.resolve())
        with pytest.raises(ApiError) as e:
            await c.swap_avatar("broken.png", wait=True)
        assert e.value.status == 422
        with pytest.raises(ApiError) as e:
            await c.swap_avatar("missing.png")
        assert e.value.status == 404
        r = await c.swap_avatar(str(img), wait=True)
        assert r["ready"] is True
    assert api.ctl.avatar == str(img.resolve())


async def test_queue_full_is_503_and_one_audio_stream_at_a_time(api: Api) -> None:
    big = np.zeros(16000 * 15, np.int16) + 1000
    async with api.client() as c:
        await c.push_audio(big.tobytes(), rate=16000)
        with pytest.raises(ApiError) as e:
            await c.push_audio(big.tobytes(), rate=16000)
        assert e.value.status == 503 and "queue full" in e.value.message
        assert e.value.retry_after == 1
        await c.interrupt()
        async with c.audio_stream(16000) as s:
            with pytest.raises(ApiError) as e:
                async with c.audio_stream(16000):
                    pass
            assert e.value.status == 409
            with pytest.raises(ApiError) as e:
                await c.push_audio(np.zeros(320, np.int16))   # would end the stream's utterance
            assert e.value.status == 409
            await s.send(np.zeros(320, np.int16))


async def test_openapi_document_lists_every_route(api: Api) -> None:
    async with api.client() as c:
        doc = await c.request("GET", "/api/openapi.json")
    assert doc["openapi"].startswith("3.1")
    served = {(r.method, r.resource.canonical) for r in api.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/api/")
              and r.method != "HEAD"}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented and len(served) == len(ENDPOINTS) == 12
    say = doc["paths"]["/api/say"]["post"]
    assert say["requestBody"]["content"]["application/json"]["schema"]["required"] == ["text"]
    assert "503" in say["responses"] and "429" in say["responses"]


# ------------------------------------------------------------------------------------------------
# Hostile input
# ------------------------------------------------------------------------------------------------

def _fuzz_bodies(seed: int = 7, n: int = 120) -> list[bytes]:
    rng = random.Random(seed)
    atoms = [None, True, False, 0, -1, 1e308, -1e308, 2 ** 70, "", "x" * 300, "\u0000", "é😀",
             [], {}, [1, 2], {"a": 1}]
    keys = ["text", "voice", "emotion", "name", "intensity", "x", "y", "expression", "head",
            "path", "wait", "__proto__", ""]
    bodies = [b"", b"{", b"[]", b"null", b"NaN", b'{"x": NaN, "y": 0}', b'{"x": Infinity, "y": 1}',
              b"\xff\xfe\x00", b'{"text": "a"' + b" " * 100, b"[" * 5000 + b"]" * 5000,
              b'{"text": ' + b"[" * 3000 + b"]" * 3000 + b"}", b'"just a string"',
              b'{"text": "hi", "text": 5}', b'{"voice": "en; rm -rf /", "text": "hi"}',
              b'{"text": "hi", "voice": "../../etc/passwd"}']
    for _ in range(n):
        obj = {rng.choice(keys): rng.choice(atoms) for _ in range(rng.randint(0, 4))}
        raw = json.dumps(obj).encode()
        if rng.random() < 0.3:
            i = rng.randrange(len(raw) + 1)
            raw = raw[:i] + bytes([rng.randrange(256)]) + raw[i:]
        bodies.append(raw)
    return bodies


async def test_fuzzed_json_never_breaks_the_server(api: Api) -> None:
    paths = ["/api/say", "/api/emotion", "/api/scales", "/api/gaze", "/api/avatar"]
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as s:
        for i, body in enumerate(_fuzz_bodies()):
            path = paths[i % len(paths)]
            async with s.post(api.url + path, data=body,
                              headers={"Content-Type": "application/json"}) as r:
                statuses[r.status] = statuses.get(r.status, 0) + 1
                payload = await r.json(content_type=None)
                if r.status >= 400:
                    assert isinstance(payload["error"], str) and payload["error"]
        # A wrong content type is refused before parsing.
        async with s.post(api.url + "/api/say", data=b"text=hi",
                          headers={"Content-Type": "application/x-www-form-urlencoded"}) as r:
            assert r.status == 400
        async with s.get(api.url + "/api/status") as r:
            assert r.status == 200                      # still alive
    assert 500 not in statuses and set(statuses) <= {200, 202, 400, 403, 404, 409, 422, 429, 503}
    assert statuses.get(400, 0) > 60


async def test_wrong_types_name_the_field(api: Api) -> None:
    async with api.client() as c:
        cases = [({"text": 5}, "body.text must be a string"),
                 ({"text": "hi", "voice": 3}, "body.voice must be a string"),
                 ({"text": "hi", "emotion": "joy"}, "body.emotion"),
                 ({"text": "hi", "extra": 1}, "unknown field(s) 'extra'"),
                 ({"text": "   "}, "must not be empty"),
                 ({"text": "x" * 10001}, "longer than 10000"),
                 ({"text": "hi", "voice": "en us"}, "characters outside")]
        for body, msg in cases:
            with pytest.raises(ApiError) as e:
                await c.request("POST", "/api/say", body)
            assert e.value.status == 400 and msg in e.value.message, (body, e.value.message)
        with pytest.raises(ApiError) as e:
            await c.request("POST", "/api/gaze", {"x": True, "y": 0})
        assert "must be a number, got a boolean" in e.value.message


async def test_malformed_websocket_streams_are_refused(api: Api) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(api.url + "/api/audio/ws") as ws:
            await ws.send_bytes(b"\x00\x01")                # binary before the header
            msg = await ws.receive(timeout=10)
            assert json.loads(msg.data)["type"] == "error"
        async with s.ws_connect(api.url + "/api/audio/ws") as ws:
            await ws.send_str('{"rate": 0}')
            msg = await ws.receive(timeout=10)
            assert "rate" in json.loads(msg.data)["error"]
        async with s.ws_connect(api.url + "/api/audio/ws") as ws:
            await ws.send_str('{"rate": 16000, "format": "mp3"}')
            msg = await ws.receive(timeout=10)
            assert "format" in json.loads(msg.data)["error"]
        async with s.ws_connect(api.url + "/api/audio/ws") as ws:
            await ws.send_str('{"rate": 16000}')
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "ready"
            await ws.send_bytes(np.full(3200, 1000, "<i2").tobytes())
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "accepted"
            await ws.send_str("not json")
            msg = await ws.receive(timeout=10)
            assert json.loads(msg.data)["type"] == "error"
        # The broken stream's utterance was ended, so it plays out and the queue drains.
        await wait_for(lambda: api.ctl.source.pending == 0)
        async with s.ws_connect(api.url + "/api/audio/ws", max_msg_size=0) as ws:
            await ws.send_str('{"rate": 16000}')
            await ws.receive(timeout=10)
            await ws.send_bytes(b"\x00" * (2 * 1024 * 1024))   # above max_ws_message_bytes
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING)
        async with s.get(api.url + "/api/status") as r:
            assert r.status == 200


async def test_frame_statistics_are_published_while_someone_listens(api: Api) -> None:
    async with api.client() as c:
        events = c.events(types=["frame_stats"])
        first = await asyncio.wait_for(events.__anext__(), 20)
        second = await asyncio.wait_for(events.__anext__(), 20)
        await events.aclose()
    assert first.kind == "frame_stats" and second.id > first.id
    assert second.data["frames"] > first.data["frames"]       # the timeline is running
    assert second.data["position"] == second.data["frames"] * FRAME_SAMPLES


# ------------------------------------------------------------------------------------------------
# One set of definitions: the table, the validator, the document and the PCM table agree
# ------------------------------------------------------------------------------------------------

async def test_document_publishes_the_schemas_the_server_validates_with(api: Api) -> None:
    from avatar_agent.audio.resample import PCM_CHANNELS, PCM_FORMATS, PCM_RATES
    from avatar_agent.server.control import PCM_HEADER, ControlApi

    async with api.client() as c:
        doc = await c.openapi()
    for ep in ENDPOINTS:
        op = doc["paths"][ep.path][ep.method.lower()]
        assert callable(getattr(ControlApi, op["operationId"]))       # the method serving it
        if ep.body is not None:
            assert op["requestBody"]["content"]["application/json"]["schema"] == ep.body
    audio_ws = doc["paths"]["/api/audio/ws"]["get"]["x-websocket-messages"]["header"]
    assert audio_ws == PCM_HEADER
    assert audio_ws["properties"]["format"]["enum"] == list(PCM_FORMATS) == [
        "s16le", "s32le", "f32le", "u8"]
    query = {p["name"]: p["schema"] for p in doc["paths"]["/api/audio"]["post"]["parameters"]}
    assert (query["rate"]["minimum"], query["rate"]["maximum"]) == PCM_RATES == (1000, 384000)
    assert (query["channels"]["minimum"], query["channels"]["maximum"]) == PCM_CHANNELS == (1, 16)
    avatar = doc["paths"]["/api/avatar"]["post"]["responses"]
    assert "ready" in avatar["200"]["content"]["application/json"]["schema"]["properties"]
    assert "ready" in avatar["202"]["content"]["application/json"]["schema"]["properties"]
    events = doc["paths"]["/api/events"]["get"]["description"]
    for kind in ("speech_started", "speech_finished", "avatar_swapped", "session_ended",
                 "frame_stats", "avatar_ready", "avatar_failed", "events_dropped"):
        assert kind in events


async def test_validation_errors_are_one_line_naming_the_field(api: Api) -> None:
    async with api.client() as c:
        cases = [("/api/say", {"text": "hi", "voice": "en\n"}, "body.voice 'en\\n' has characters"),
                 ("/api/say", {"text": "hi", "voice": None}, "body.voice must be a string, got null"),
                 ("/api/say", {}, "body: missing required field 'text'"),
                 ("/api/scales", {}, "body: give at least one of expression, head"),
                 ("/api/emotion", {"name": "joy"}, "body.name = 'joy' is not one of anger,"),
                 ("/api/gaze", {"x": 0, "y": -2}, "body.y = -2 is below the minimum -1"),
                 ("/api/avatar", {"path": "a.png", "wait": 1}, "body.wait must be true or false")]
        for path, body, msg in cases:
            with pytest.raises(ApiError) as e:
                await c.request("POST", path, body)
            assert e.value.status == 400 and e.value.message.startswith(msg), (body, e.value.message)
            assert "\n" not in e.value.message.replace("\\n", "")
        with pytest.raises(ApiError) as e:
            await c.request("POST", "/api/audio", data=b"\x00\x00",
                            query={"rate": "16000", "format": "mp3"})
        assert e.value.message == "query.format = 'mp3' is not one of s16le, s32le, f32le, u8"
        with pytest.raises(ApiError) as e:
            await c.request("POST", "/api/audio", data=b"\x00\x00", query={"channels": "17"})
        assert e.value.message == "query.channels = 17 is above the maximum 16"
    async with aiohttp.ClientSession() as s:
        async with s.post(api.url + "/api/gaze", data=b'{"x": 1e999, "y": 0}',
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and "finite" in (await r.json())["error"]
        for header, msg in [('{"rate": 48000.0}', "header.rate must be an integer, got a number"),
                            ('{"rate": 16000, "channels": 17}',
                             "header.channels = 17 is above the maximum 16"),
                            ('{"rate": 16000, "bits": 16}', "header: unknown field(s) 'bits'")]:
            async with s.ws_connect(api.url + "/api/audio/ws") as ws:
                await ws.send_str(header)
                got = json.loads((await ws.receive(timeout=10)).data)
                assert got["type"] == "error" and got["error"].startswith(msg), got
    assert api.ctl.calls == []                            # nothing invalid reached the controller


async def test_check_reads_a_running_agent_from_the_one_status_route(api: Api) -> None:
    from avatar_agent.check import _running_agent
    from avatar_agent.config import load_config

    port = int(api.url.rsplit(":", 1)[1])
    cfg = load_config(None, [f"server.port={port}"])
    found = await asyncio.to_thread(_running_agent, cfg)
    assert found is not None
    url, stats = found
    assert url.endswith("/api/status") and stats["frames"] >= 0 and "emotion" in stats
