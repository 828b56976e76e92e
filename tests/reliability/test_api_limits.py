"""Rows 3, 4, 13 and 15 of issue 13 on the control API: limits are checked before the work, the
work runs off the event loop, and no stream or flood can hold speech or the clock hostage.

A real aiohttp server on 127.0.0.1 drives a real speech queue on the real clock
(tests/server/controller.py); a probe task measures the longest event-loop stall."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from avatar_agent.config import load_config
from avatar_agent.server.control import ControlSettings, settings_from_config

from .helpers import CLI_ENV, ROOT, LoopProbe, post_from_child, start_api, stop_api


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_row3_upload_that_cannot_fit_is_refused_from_its_size_without_decoding(
        tmp_path: Path) -> None:
    api = await start_api(max_queued_s=120.0)
    body = tmp_path / "u8.raw"
    body.write_bytes(bytes(32 * 1024 * 1024 - 1024))   # u8 at 1 kHz: 9.3 hours, < max_upload_mb
    try:
        peak0 = _rss_mb()
        async with LoopProbe() as probe:
            t = time.perf_counter()
            status, got = await post_from_child(api.url + "/api/audio?rate=1000&format=u8", body)
            took = time.perf_counter() - t
        assert status == 413, got
        assert "speech queue holds at most 120 s" in got["error"]
        assert took < 5.0                      # before: decoded + resampled for 18 s, then 503
        assert probe.max_gap < 0.5             # the clock never stalled (before: 18 s)
        assert _rss_mb() - peak0 < 200         # before: 7.4 GB of decoded samples
        assert not api.ctl.calls               # nothing reached the speech queue
    finally:
        await stop_api(api)


async def test_row3_a_large_valid_upload_is_decoded_off_the_event_loop(tmp_path: Path) -> None:
    api = await start_api(max_queued_s=400.0, max_upload_mb=64.0)
    rate, seconds = 48000, 300
    t = np.arange(rate * seconds, dtype=np.float32) / rate
    pcm = (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16)
    body = tmp_path / "s16.raw"
    body.write_bytes(np.repeat(pcm[:, None], 2, axis=1).tobytes())      # 57.6 MB, 300 s
    del t, pcm
    try:
        async with LoopProbe() as probe:
            status, got = await post_from_child(
                api.url + f"/api/audio?rate={rate}&channels=2", body)
        assert status == 200, got
        assert got["duration_s"] == pytest.approx(seconds, abs=0.01)
        # Decoding and resampling 14.4 M stereo samples takes 1-3 s of CPU (all of it on the
        # loop before); in a worker thread the loop keeps ticking.
        assert probe.max_gap < 0.5, probe.max_gap
    finally:
        await stop_api(api)


async def test_row3_ws_message_longer_than_the_queue_is_refused_before_resampling() -> None:
    api = await start_api(max_queued_s=30.0)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(api.url + "/api/audio/ws") as ws:
                await ws.send_str(json.dumps({"rate": 1000, "format": "u8"}))
                assert (await ws.receive_json())["type"] == "ready"
                await ws.send_bytes(bytes(1024 * 1024 - 64))        # 1 MB = 17 min at 1 kHz
                msg = await ws.receive_json(timeout=5)
                assert msg["type"] == "error" and "more than the speech queue holds" in msg["error"]
                assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE,
                                                              aiohttp.WSMsgType.CLOSED)
        assert not api.ctl.source.pending
    finally:
        await stop_api(api)


async def test_row4_an_idle_audio_stream_does_not_block_say() -> None:
    idle = 0.5
    api = await start_api(ControlSettings(ws_idle_s=idle))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(api.url + "/api/audio/ws") as ws:
                await ws.send_str(json.dumps({"rate": 16000}))
                assert (await ws.receive_json())["type"] == "ready"
                tone = (np.sin(np.arange(8000) * 0.2) * 8000).astype(np.int16)   # 0.5 s
                t_sent = time.monotonic()
                await ws.send_bytes(tone.tobytes())
                accepted = await ws.receive_json(timeout=5)
                assert accepted["type"] == "accepted"
                async with s.post(api.url + "/api/say", json={"text": "hello"}) as r:
                    said = (await r.json())["utterance"]
                # ... and the socket stays open, silent.  The stream is ended once its audio has
                # run out for `idle` seconds; the client is told why and the socket closes.
                fin = await ws.receive_json(timeout=5)
                assert fin["type"] == "finished" and "server.audio_idle_s" in fin["reason"]
                assert fin["duration_s"] == pytest.approx(0.5, abs=0.05)
                assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE,
                                                              aiohttp.WSMsgType.CLOSED)
            ended = time.monotonic() - t_sent
            assert ended < 0.5 + idle + 1.0        # before: never, while the socket stayed open
            deadline = time.monotonic() + 10
            while not any(d["utterance"] == said for d in api.of("speech_started")):
                assert time.monotonic() < deadline, "say never started after the idle stream"
                await asyncio.sleep(0.05)
        first = api.of("speech_finished")[0]
        assert first["utterance"] == accepted["utterance"] and not first["interrupted"]
    finally:
        await stop_api(api)


async def test_row4_a_stream_sending_in_real_time_is_not_cut_by_the_idle_timeout() -> None:
    api = await start_api(ControlSettings(ws_idle_s=0.3))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(api.url + "/api/audio/ws") as ws:
                await ws.send_str(json.dumps({"rate": 16000}))
                assert (await ws.receive_json())["type"] == "ready"
                block = (np.sin(np.arange(3200) * 0.2) * 8000).astype(np.int16).tobytes()
                for _ in range(8):                    # 200 ms blocks every 200 ms: 1.6 s
                    await ws.send_bytes(block)
                    await asyncio.sleep(0.2)
                await ws.send_str(json.dumps({"final": True}))
                msgs = [await ws.receive_json(timeout=5) for _ in range(2)]
        assert [m["type"] for m in msgs] == ["accepted", "finished"]
        assert "reason" not in msgs[1] and msgs[1]["duration_s"] == pytest.approx(1.6, abs=0.05)
    finally:
        await stop_api(api)


async def test_row4_a_drip_of_samples_or_text_cannot_keep_a_stream_open() -> None:
    api = await start_api(ControlSettings(ws_idle_s=0.5))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(api.url + "/api/audio/ws") as ws:
                await ws.send_str(json.dumps({"rate": 16000}))
                assert (await ws.receive_json())["type"] == "ready"
                t0 = time.monotonic()
                await ws.send_bytes(np.full(3200, 500, np.int16).tobytes())      # 0.2 s
                finished = None
                while finished is None and time.monotonic() - t0 < 5:
                    await ws.send_bytes(b"\x01\x00")                         # one sample
                    await ws.send_str(json.dumps({"final": False}))
                    try:
                        m = await ws.receive_json(timeout=0.1)
                    except (TimeoutError, asyncio.TimeoutError):
                        continue
                    if m["type"] == "finished":
                        finished = m
                assert finished is not None and "server.audio_idle_s" in finished["reason"]
                # 0.7 s when on time; the drip would keep it open for the loop's whole 5 s.
                assert time.monotonic() - t0 < 3
    finally:
        await stop_api(api)


def test_row4_the_idle_timeout_and_rate_limits_come_from_the_config() -> None:
    cfg = load_config(None, ["server.audio_idle_s=7.5", "server.rate_offer_per_min=3",
                             "server.rate_interrupt_per_min=9", "audio.max_queued_s=50"],
                      use_default_path=False)
    control, security = settings_from_config(cfg)
    assert control.ws_idle_s == 7.5 and control.max_audio_s == 50
    assert security.rate_limits["offer"].per_min == 3
    assert security.rate_limits["interrupt"].per_min == 9
    assert security.rate_limited_paths["/offer"] == "offer"
    assert security.rate_limited_paths["/api/interrupt"] == "interrupt"
    # A session's WHEP offer and interrupt route share those buckets (the session server).
    from avatar_agent.server.security import canonical_path

    assert security.rate_limited_paths[canonical_path("/v1/sessions/s1/whep")] == "offer"
    assert security.rate_limited_paths[canonical_path("/v1/sessions/s1/interrupt")] == "interrupt"


async def test_row13_an_interrupt_flood_costs_one_interrupt_and_is_rate_limited() -> None:
    api = await start_api()
    try:
        # The flood comes from its own process (as an attacker's would): the probe then measures
        # the server's loop, not the 1000 client requests this loop would otherwise also run.
        async with LoopProbe() as probe:
            t = time.monotonic()
            r = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "tests.reliability.attack", "interrupts",
                                 api.url + "/"],
                capture_output=True, text=True, timeout=120, cwd=ROOT,
                env={**CLI_ENV, "PYTHONPATH": str(ROOT)})
            flood_s = time.monotonic() - t
        assert r.returncode == 0, r.stderr[-3000:]
        answer = json.loads(r.stdout.strip().splitlines()[-1])
        assert answer["say"] == 200
        statuses = {int(k): v for k, v in answer["statuses"].items()}
        assert set(statuses) <= {200, 429}
        assert statuses.get(429, 0) >= 900          # the per-client bucket holds 20
        real = answer["real"]                       # the other 200s repeat an answer
        # At most one real interrupt per coalescing window (1 s) of the flood: before, each of
        # the 1000 dropped frames and queued an idle refill on the inference thread.
        assert real == api.ctl.calls.count("interrupt") <= 1 + int(flood_s / 1.0)
        assert real <= 3 and statuses.get(200, 0) > real
        assert probe.max_gap < 0.5
        # Speech accepted after it makes the next interrupt real again.
        await asyncio.sleep(1.1)
        async with aiohttp.ClientSession() as s:
            async with s.post(api.url + "/api/say", json={"text": "again"}) as r:
                assert r.status == 200
            async with s.post(api.url + "/api/interrupt") as r:
                assert r.status == 200 and not (await r.json()).get("coalesced")
        assert api.ctl.calls.count("interrupt") == real + 1
    finally:
        await stop_api(api)


async def test_row15_a_say_that_can_never_fit_is_413_not_queue_full() -> None:
    api = await start_api(max_queued_s=120.0)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(api.url + "/api/say", json={"text": "word " * 2000}) as r:
                body = await r.json()
                assert r.status == 413 and "Retry-After" not in r.headers
        assert "more than the speech queue ever holds" in body["error"]
        assert "audio.max_queued_s" in body["error"] and "queue full" not in body["error"]
    finally:
        await stop_api(api)


async def test_row15_a_request_without_host_logs_one_line_not_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    api = await start_api()
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", api.server.port)
                writer.write(b"GET /api/status HTTP/1.1\r\nConnection: close\r\n\r\n")
                await writer.drain()
                reply = await reader.read()
                writer.close()
                assert reply.startswith(b"HTTP/1.1 400") or reply.startswith(b"HTTP/1.0 400")
        recs = [r for r in caplog.records if r.name == "aiohttp.server"]
        assert len(recs) == 1                      # later ones are counted, not logged each time
        assert recs[0].exc_info is None and "Missing 'Host' header" in recs[0].getMessage()
    finally:
        await stop_api(api)


async def test_event_streams_are_capped_even_when_opened_at_once() -> None:
    api = await start_api(ControlSettings(max_event_streams=3, stats_interval_s=0))
    try:
        async with aiohttp.ClientSession() as s:
            async def open_sse() -> aiohttp.ClientResponse:
                return await s.get(api.url + "/api/events")

            got = await asyncio.gather(*(open_sse() for _ in range(6)),
                                       s.ws_connect(api.url + "/api/events/ws"),
                                       return_exceptions=True)
            sse = [r for r in got[:6] if isinstance(r, aiohttp.ClientResponse)]
            assert sorted(r.status for r in sse) == [200] * 3 + [503] * 3
            assert isinstance(got[6], aiohttp.WSServerHandshakeError) and got[6].status == 503
            for r in sse:
                if r.status == 503:
                    assert "event streams are open already" in (await r.json())["error"]
                    r.release()
            open_ = [r for r in sse if r.status == 200]
            open_[0].close()                          # one leaves: a new one is welcome
            await asyncio.sleep(0.2)
            async with s.ws_connect(api.url + "/api/events/ws") as ws:
                assert not ws.closed
            for r in open_[1:]:
                r.close()
    finally:
        await stop_api(api)
