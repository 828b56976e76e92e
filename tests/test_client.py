"""avatar_agent.client against a real control server (running on its own thread and loop)."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile as sf
from aiohttp import web

from avatar_agent.audio.resample import to_pipeline
from avatar_agent.client import ApiError, AsyncAvatarClient, AvatarClient, audio_payload
from avatar_agent.server.control import ControlSettings, mount, security_settings
from avatar_agent.types import FRAME_SAMPLES

from .server.controller import QueueController

TOKEN = "client-test-token-0123456789"


class ServerThread:
    """The control API on a background event loop, so blocking clients can call it."""

    def __init__(self, avatar_dir: Path, **sec: object) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.ctl: QueueController | None = None
        self.url = ""
        self._sec = sec
        self._dir = avatar_dir
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(20), "server did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self.ctl = QueueController()
        await self.ctl.start()
        app = web.Application()
        s = ControlSettings(avatar_dirs=(str(self._dir),), stats_interval_s=0.2)
        mount(app, self.ctl, s, security_settings(avatar_dirs=s.avatar_dirs, **self._sec))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._stop = asyncio.Event()
        self.ready.set()
        await self._stop.wait()
        await runner.cleanup()
        await self.ctl.stop()

    def close(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=20)

    def call(self, fn):  # run fn() on the server loop and wait for it
        fut = asyncio.run_coroutine_threadsafe(_as_coro(fn), self.loop)
        return fut.result(20)


async def _as_coro(fn):
    return fn()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    s = ServerThread(tmp_path, token=TOKEN, rate_say_per_min=600)
    try:
        yield s
    finally:
        s.close()


def wait_idle(server: ServerThread) -> None:
    import time

    for _ in range(2000):
        if server.call(lambda: server.ctl.source.pending) == 0:
            return
        time.sleep(0.01)
    raise AssertionError("speech never finished")


def test_sync_client_say_and_events(server: ServerThread) -> None:
    c = AvatarClient(server.url, token=TOKEN, timeout=20)
    events = c.events(types=["speech_started", "speech_finished"])
    got = []
    box: dict[str, int] = {}

    def listen() -> None:
        for ev in events:
            got.append(ev)
            if ev.kind == "speech_finished":
                return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    import time

    time.sleep(0.3)                                      # the SSE stream is connected
    box["uid"] = c.say("Good morning.", voice="en-gb")
    t.join(20)
    events.close()                                       # disconnects the SSE stream
    assert [e.kind for e in got] == ["speech_started", "speech_finished"]
    assert {e.data["utterance"] for e in got} == {box["uid"]}
    assert got[1].data["sample"] > got[0].data["sample"]
    st = c.status()
    assert st["position"] >= got[1].data["sample"] and st["pending"] == 0


def test_sync_client_controls_and_uploads(server: ServerThread, tmp_path: Path) -> None:
    c = AvatarClient(server.url, token=TOKEN)
    c.set_emotion("anger", 0.25)
    c.set_scales(head=0.5)
    c.set_gaze(0.5, -0.5)
    ctl = server.ctl
    assert ctl is not None
    assert ctl.emotion == ("anger", 0.25) and ctl.scales["head"] == 0.5 and ctl.gaze == (0.5, -0.5)

    tone = (0.3 * np.sin(np.arange(8000) * 0.05)).astype(np.float32)
    stereo16 = (np.stack([tone, tone], 1) * 32767).astype(np.int16)
    wav = tmp_path / "clip.wav"
    sf.write(wav, tone, 24000, subtype="FLOAT")
    r1 = c.push_audio(tone)                                # float32 → f32le at 16 kHz
    r2 = c.push_audio(stereo16, rate=32000)                # int16 [n, 2] → s16le, 2 channels
    r3 = c.push_audio(wav)                                 # a WAV file by path
    assert [r1["utterance"] + 1, r1["utterance"] + 2] == [r2["utterance"], r3["utterance"]]
    assert r1["samples"] == 8000
    assert r2["samples"] == to_pipeline(stereo16, 32000, 2).size
    assert r3["duration_s"] == pytest.approx(8000 / 24000, abs=2e-3)
    wait_idle(server)
    audio = server.call(ctl.audio)
    start = int(np.flatnonzero(audio)[0]) // FRAME_SAMPLES * FRAME_SAMPLES  # frame-aligned
    assert np.array_equal(audio[start:start + 8000], tone)
    n1 = -(-8000 // FRAME_SAMPLES) * FRAME_SAMPLES
    want2 = to_pipeline(stereo16, 32000, 2)
    assert np.array_equal(audio[start + n1:start + n1 + want2.size], want2)

    res = c.interrupt()
    assert res["utterance"] is None and res["frame"] > 0 and res["dropped_frames"] == 0
    doc = c.openapi()
    assert "/api/say" in doc["paths"]


def test_sync_client_errors(server: ServerThread, tmp_path: Path) -> None:
    with pytest.raises(ApiError) as e:
        AvatarClient(server.url).status()                  # no token
    assert e.value.status == 401 and "token" in e.value.message
    c = AvatarClient(server.url, token=TOKEN)
    with pytest.raises(ApiError) as e:
        c.set_emotion("bliss")
    assert e.value.status == 400 and "bliss" in e.value.message
    with pytest.raises(ApiError) as e:
        c.swap_avatar("../../etc/passwd")
    assert e.value.status == 403
    (tmp_path / "face.png").write_bytes(b"not really")
    with pytest.raises(ApiError) as e:
        c.swap_avatar("face.png", wait=True)
    assert e.value.status == 422
    with pytest.raises(ApiError) as e:
        AvatarClient(server.url, token=TOKEN + "x").events().__next__()
    assert e.value.status == 401


def test_sync_client_is_the_async_one_on_a_private_loop(server: ServerThread) -> None:
    import time

    # The client's own timeout is 300 s, so a TimeoutError well before that can only come from
    # the 0.5 s read timeout given to events(); the upper bound is loose on purpose (a loaded CI
    # machine once took 10.5 s to connect and time out).
    with AvatarClient(server.url, token=TOKEN, timeout=300) as c:
        it = c.events(types=["never_sent"], timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):                # read timeout: nothing came for 0.5 s
            next(it)
        assert 0.4 < time.monotonic() - t0 < 120
        assert c.status()["pending"] == 0                # the client goes on after it
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(c.say("Hi.")))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert sorted(results) == list(range(min(results), min(results) + 4))
        assert c.aio._session is not None
    assert c.aio._session is None                        # closed by the with block


def test_rate_limit_error_carries_retry_after(tmp_path: Path) -> None:
    s = ServerThread(tmp_path, rate_say_per_min=6)
    try:
        c = AvatarClient(s.url)
        c.say("one")
        with pytest.raises(ApiError) as e:
            c.say("two")
        assert e.value.status == 429 and e.value.retry_after == 10
    finally:
        s.close()


async def test_async_client_with_token_over_websockets(tmp_path: Path) -> None:
    s = await asyncio.to_thread(ServerThread, tmp_path, token=TOKEN)
    try:
        async with AsyncAvatarClient(s.url, token=TOKEN) as c:
            events = c.events(types=["speech_started", "speech_finished"], websocket=True)
            first = asyncio.ensure_future(events.__anext__())
            await asyncio.sleep(0.3)
            pcm = (np.linspace(-0.5, 0.5, 4000) * 32767).astype(np.int16)
            uid = await c.stream_audio([pcm[:1000], pcm[1000:]], rate=16000, format="s16le")
            started = await asyncio.wait_for(first, 20)
            finished = await asyncio.wait_for(events.__anext__(), 20)
            await events.aclose()
            assert started.data["utterance"] == finished.data["utterance"] == uid
            assert finished.data["sample"] - started.data["sample"] == 4000
            await c.set_gaze(0.0, 1.0)
            assert (await c.status())["pending"] == 0
        async with AsyncAvatarClient(s.url) as c:
            with pytest.raises(ApiError) as e:
                async with c.audio_stream(16000):
                    pass
            assert e.value.status == 401
    finally:
        await asyncio.to_thread(s.close)


def test_audio_payload() -> None:
    body, q, ctype = audio_payload(np.zeros(4, np.int16), rate=8000)
    assert (len(body), q, ctype) == (8, {"rate": "8000", "channels": "1", "format": "s16le"},
                                     "application/octet-stream")
    body, q, _ = audio_payload(np.zeros((4, 2), np.float64), rate=44100)
    assert len(body) == 32 and q["format"] == "f32le" and q["channels"] == "2"
    body, q, _ = audio_payload(np.array([1, 255], np.uint8))
    assert body == b"\x01\xff" and q["format"] == "u8"
    body, q, _ = audio_payload(np.array([-2], np.int32))
    assert body == (-2).to_bytes(4, "little", signed=True) and q["format"] == "s32le"
    buf = io.BytesIO()
    sf.write(buf, np.zeros(10, np.float32), 8000, format="WAV")
    body, q, ctype = audio_payload(buf.getvalue())
    assert q == {} and ctype == "audio/wav"
    with pytest.raises(ValueError):
        audio_payload(np.zeros((2, 2, 2), np.int16))


async def test_sse_stream_is_parsed_comments_multiline_data_and_ids() -> None:
    """The client's SSE reading on a hand-written stream: comments and retry hints skipped,
    multi-line data joined, ids kept; a stream the server ends (and cannot reopen) ends."""
    sent = [b": comment\n", b"retry: 100\nid: 7\nevent: speech_started\n",
            b'data: {"utterance": 3,\ndata:  "sample": 640}\n\n',
            b"event: speech_finished\r\ndata: [1, 2]\r\n\r\n"]
    runner: web.AppRunner | None = None

    async def stream(request: web.Request) -> web.StreamResponse:
        assert request.query["types"] == "a,b"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in sent:
            await resp.write(part)
        return resp                                # closes the stream

    app = web.Application()
    app.router.add_get("/api/events", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    got = []
    async with AsyncAvatarClient(f"http://{host}:{port}") as c:
        it = c.events(types=["a", "b"])
        got.append(await asyncio.wait_for(it.__anext__(), 10))
        got.append(await asyncio.wait_for(it.__anext__(), 10))
        await runner.cleanup()                     # the server goes: reconnecting fails
        rest = [ev async for ev in it]
    assert [(e.kind, e.data, e.id) for e in got] == [
        ("speech_started", {"utterance": 3, "sample": 640}, 7),
        ("speech_finished", {"value": [1, 2]}, 7)]        # the last id carries over (SSE rule)
    assert rest == []


def test_example_chatbot_speaks_each_reply(server: ServerThread,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "chatbot.py"
    spec = importlib.util.spec_from_file_location("chatbot_example", path)
    assert spec is not None and spec.loader is not None
    bot = importlib.util.module_from_spec(spec)
    import sys

    monkeypatch.setitem(sys.modules, spec.name, bot)      # dataclasses look their module up
    spec.loader.exec_module(bot)
    out = io.StringIO()
    said: list[str] = []
    c = AvatarClient(server.url, token=TOKEN, timeout=20)
    server.call(lambda: server.ctl.source.subscribe(
        lambda kind, data: said.append(kind) if kind == "speech_finished" else None))
    n = bot.chat(c, ["hello", "/mood surprise 0.5", "tell me a joke", "/quit", "never read"],
                 out)
    assert n == 2 and said == ["speech_finished", "speech_finished"]
    text = out.getvalue()
    assert "bot: " in text and "[mood: surprise]" in text and "never read" not in text
    assert server.ctl.emotion[0] == "happiness"           # the joke's emotion, set by say()
    assert bot.reply("I had a bad day", __import__("random").Random(0))[1] == "sadness"
