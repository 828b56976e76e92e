"""The live agent with real parts: a real `avatar-agent start` process watched by an aiortc peer,
by headless Chromium and through the pyvirtualcam code path (fake v4l2 device); and an in-process
agent recording a private PulseAudio microphone that espeak-ng speaks into."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from tests.sinks.conftest import FifoCamera, child_env, fakev4l2_so, loopback_ice  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@contextlib.contextmanager
def agent_process(*sets: str, env_extra: dict[str, str] | None = None,
                  cwd: Path | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`avatar-agent start` with a TTS source (text on stdin); yields (process, page URL)."""
    cmd = [sys.executable, "-m", "avatar_agent.cli", "start", "--set", "audio.source=tts",
           "--set", "render.size=256", "--set", "server.port=0"]
    for s in sets:
        cmd += ["--set", s]
    env = child_env(**(env_extra or {}))
    env.pop("AVATAR_AGENT_CONFIG", None)
    env["XDG_CONFIG_HOME"] = tempfile.mkdtemp()
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=cwd or ROOT, bufsize=1)
    lines: list[str] = []
    url = ""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = p.stdout.readline() if p.stdout else ""
            if not line:
                if p.poll() is not None:
                    break
                continue
            lines.append(line)
            m = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
            if m:
                url = m.group(1)
            if "agent running" in line:
                break
        assert p.poll() is None, "".join(lines)
        # Keep draining stdout so the child never blocks on a full pipe.
        threading.Thread(target=lambda: [lines.append(x) for x in p.stdout], daemon=True).start()
        yield p, url
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


async def test_start_serves_webrtc_to_an_aiortc_peer_with_speech_audio():
    from tests.sinks.test_webrtc import connect, wait_for

    with agent_process("sinks.enabled=[\"webrtc\"]") as (proc, url):
        assert url
        with loopback_ice():
            viewer = await connect(url)
            try:
                await wait_for(lambda: viewer.frames >= 25, timeout=60)
                proc.stdin.write("Hello from the test. Can you hear me speaking?\n")
                proc.stdin.flush()
                await asyncio.sleep(4.0)
                metrics, status = await _get(url + "metrics"), await _get(url + "api/status")
            finally:
                await viewer.close()
    # Observability: Prometheus text and the JSON status report the same live counters.
    m = re.search(r'avatar_frames_total\{outcome="delivered"\} (\d+)', metrics)
    assert m and int(m.group(1)) >= 100, metrics[:500]
    assert 'avatar_stage_seconds_count{stage="render"}' in metrics
    assert "avatar_rss_bytes" in metrics and "avatar_av_offset_seconds" in metrics
    import json

    st = json.loads(status)
    assert st["delivered"] >= 100 and st["speech"] > 0
    assert viewer.sizes == {(256, 256)}
    assert viewer.frames >= 50
    audio = np.concatenate(viewer.audio)
    assert len(audio) > 48_000 * 2
    rms = np.sqrt(np.mean(audio.reshape(-1, 960)[:, :] ** 2, axis=1))
    assert rms.max() > 0.02, "no speech reached the viewer"      # the spoken sentence
    assert np.median(rms[:10]) < 0.01                               # silence before it


async def _get(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, url
        return await r.text()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),  # CI must have it
                    reason="needs the chromium browser (apt install chromium)")
async def test_start_page_plays_in_headless_chromium():
    from aiohttp import web

    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def report(request: web.Request) -> web.Response:
        if not got.done():
            got.set_result(await request.json())
        return web.json_response({"ok": True}, headers={"Access-Control-Allow-Origin": "*"})

    async def preflight(request: web.Request) -> web.Response:
        return web.Response(headers={"Access-Control-Allow-Origin": "*",
                                     "Access-Control-Allow-Headers": "*",
                                     "Access-Control-Allow-Methods": "POST"})

    app = web.Application()
    app.add_routes([web.post("/report", report), web.options("/report", preflight)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    report_url = f"http://127.0.0.1:{runner.addresses[0][1]}/report"
    try:
        with agent_process("sinks.enabled=[\"webrtc\"]") as (proc, url), \
                tempfile.TemporaryDirectory() as profile:
            cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                   "--autoplay-policy=no-user-gesture-required",
                   "--disable-features=WebRtcHideLocalIpsWithMdns",
                   url + f"?report=1&frames=40&endpoint={report_url}"]
            b = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            try:
                result = await asyncio.wait_for(got, 90)
            finally:
                os.killpg(b.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(b.wait, 10)
                if b.poll() is None:
                    os.killpg(b.pid, signal.SIGKILL)
    finally:
        await runner.cleanup()
    assert result["connectionState"] == "connected", result
    assert result["framesDecoded"] >= 40, result
    assert (result["width"], result["height"]) == (256, 256)
    assert result["audioTracks"] == 1 and result["videoTracks"] == 1
    assert result["audioSamples"] > 48_000 * 0.5, result


def test_start_feeds_the_virtual_camera_code_path(fakev4l2_so, tmp_path):
    prefix = str(tmp_path / "fake-")
    dev = prefix + "video0"
    os.mkfifo(dev)
    size = 256
    frame_bytes = size * size * 3 // 2
    cam = FifoCamera(dev, frame_bytes, limit=75)
    frames, stamps, t = cam.frames, cam.stamps, cam.thread
    with agent_process("sinks.enabled=[\"virtualcam\"]", f"sinks.virtualcam_device=\"{dev}\"",
                       env_extra={"LD_PRELOAD": str(fakev4l2_so), "FAKE_V4L2_PREFIX": prefix}):
        t.join(90)
    assert len(frames) == 75, len(frames)
    y = np.frombuffer(frames[-1], np.uint8)[: size * size].reshape(size, size)
    assert 60 < y.mean() < 200 and y.std() > 20          # a face, not a flat or black frame
    intervals = np.diff(stamps[5:])
    assert 0.035 < float(np.mean(intervals)) < 0.045, intervals   # 25 fps from the player clock


async def test_microphone_speech_drives_speech_frames_and_mouth(pulse_server):
    """espeak-ng speaks into a PulseAudio null sink; the agent records it as its microphone, with
    live phone recognition as ``start`` has it."""
    from avatar_agent.agent import Agent
    from avatar_agent.audio.mic import MicSource
    from avatar_agent.bench import _MotionTap
    from avatar_agent.clock import SystemClock
    from avatar_agent.config import load_config
    from avatar_agent.wiring import make_motion, make_phones, make_renderer, make_vad
    from tests.fakes import MemorySink

    class PhoneTap(_MotionTap):
        def __init__(self, inner, fps: int) -> None:  # noqa: ANN001
            super().__init__(inner, fps)
            self.heard: list = []

        def generate(self, chunk, prev, *a):  # noqa: ANN001, ANN201
            self.heard.extend(p for p in chunk.phonemes if p.heard)
            return super().generate(chunk, prev, *a)

    cfg = load_config(None, ["render.size=128", "render.batch=8"], use_default_path=False)
    clock = SystemClock()
    sink = MemorySink()
    motion = PhoneTap(make_motion(cfg), cfg.player.fps)
    agent = Agent(cfg, source=MicSource(device="pulse", clock=clock), vad=make_vad(cfg),
                  motion=motion, renderer=make_renderer(cfg), sinks=[sink], clock=clock,
                  phones=make_phones(cfg, shared=False))
    text = "The quick brown fox jumps over the lazy dog."
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(3.0)                                    # recording runs before playing
    await asyncio.to_thread(pulse_server.speak(text).wait)      # espeak-ng into the "mic"
    await asyncio.sleep(1.5)
    await asyncio.to_thread(pulse_server.speak(text).wait)
    await asyncio.sleep(1.5)
    agent.stop()
    await task
    # An underrun repeats the previous image (flagged idle): it is a timing miss, counted in the
    # player's stats, not a VAD decision, so it carries the flag of the frame it repeats.
    speech = np.array([f.speech for f in sink.frames])
    for i in range(1, len(speech)):
        if sink.frames[i].image is sink.frames[i - 1].image:
            speech[i] = speech[i - 1]
    assert agent.player.stats.underruns <= 0.05 * len(speech), agent.player.stats
    rms = np.array([np.sqrt(np.mean(f.audio ** 2)) for f in sink.frames])
    voiced = rms > 0.1 * rms.max()
    assert rms.max() > 0.02, "nothing was recorded from the microphone"
    # Speech frames sit where the recorded audio is loud, in two utterances.
    assert (speech & voiced).sum() >= 0.8 * voiced.sum()
    starts = np.flatnonzero(np.diff(speech.astype(int)) == 1)
    assert len(starts) == 2, starts
    # The mouth follows the spoken segments: open during speech, closed in the silences.
    idx = np.array([f.index for f in sink.frames])
    lip = np.array([motion.open.get(i, 0.0) for i in idx])
    assert lip[voiced].mean() > 3 * max(lip[~speech].mean(), 1e-3)
    assert np.corrcoef(lip[speech], rms[speech])[0, 1] > 0.3
    # The recogniser heard the sentence's phones as it was spoken ("quick", "fox", "lazy" ...).
    heard = {p.symbol for p in motion.heard}
    assert {"k", "f", "z"} & heard and len(heard) >= 8, heard
