"""The local web page, driven like a user in headless Chromium (DevTools protocol): typing text
and clicking Say makes the viewer receive speech, an emotion button changes the face it shows,
Interrupt silences it, the live figures update, and a refusal is shown as a clear message."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import numpy as np
import pytest

from avatar_agent.types import EMOTIONS
from tests.test_live import agent_process

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "avatar_agent" / "server" / "static"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_offers_every_emotion_and_the_controls():
    page = (STATIC / "index.html").read_text()
    assert re.findall(r'data-emotion="(\w+)"', page) == list(EMOTIONS)
    for el in ('id="say-text"', 'id="say"', 'id="interrupt"', 'id="stats"', 'id="message"',
               '<video id="video"'):
        assert el in page
    js = (STATIC / "app.js").read_text()
    for route in ('"/api/say"', '"/api/emotion"', '"/api/interrupt"', '"/api/status"', '"/offer"'):
        assert route in js


def blocks(grey: np.ndarray, k: int = 16) -> np.ndarray:
    """Mean grey level of each k×k block (a local change such as raised brows stands out)."""
    h, w = grey.shape[0] // k * k, grey.shape[1] // k * k
    return grey[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


class Page:
    """One tab of a real Chromium, scripted through the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self._id = ws, 0

    async def js(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate in the page (promises awaited); returns the value (JSON-able)."""
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": "Runtime.evaluate",
                                 "params": {"expression": expression, "awaitPromise": True,
                                            "returnByValue": True}})
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = await self.ws.receive_json(timeout=max(0.1, end - time.monotonic()))
            if msg.get("id") == self._id:
                res = msg["result"]
                if "exceptionDetails" in res:
                    raise AssertionError(f"page error: {res['exceptionDetails']}")
                return res["result"].get("value")
        raise TimeoutError(expression[:80])

    async def until(self, expression: str, timeout: float) -> Any:
        """Poll ``expression`` until it is truthy; returns its value."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = await self.js(expression)
            if v:
                return v
            await asyncio.sleep(0.2)
        raise TimeoutError(f"never true: {expression}")

    async def audio_energy(self) -> float:
        """totalAudioEnergy of the received audio track (grows only while sound plays)."""
        return float(await self.js("stats().then((s) => s.audioEnergy)"))

    async def energy_rate(self, seconds: float) -> float:
        """Received audio energy per second over the next ``seconds``."""
        e0, t0 = await self.audio_energy(), time.monotonic()
        await asyncio.sleep(seconds)
        return (await self.audio_energy() - e0) / (time.monotonic() - t0)

    async def mean_frame(self, seconds: float = 1.0) -> np.ndarray:
        """The received video averaged over ``seconds`` (grey levels [H, W]): idle motion
        (blinks, sway) averages out, a held expression does not."""
        grey = await self.js(f"""(async () => {{
            const c = document.createElement("canvas");
            c.width = video.videoWidth; c.height = video.videoHeight;
            const g = c.getContext("2d", {{ willReadFrequently: true }});
            const acc = new Float64Array(c.width * c.height);
            let n = 0;
            const end = performance.now() + {seconds * 1000};
            while (performance.now() < end) {{
              g.drawImage(video, 0, 0);
              const d = g.getImageData(0, 0, c.width, c.height).data;
              for (let j = 0; j < acc.length; j++) acc[j] += d[4 * j] + d[4 * j + 1] + d[4 * j + 2];
              n += 1;
              await new Promise((r) => setTimeout(r, 40));
            }}
            return {{ w: c.width, h: c.height, px: Array.from(acc, (v) => Math.round(v / n / 3)) }};
        }})()""")
        return np.asarray(grey["px"], np.float32).reshape(grey["h"], grey["w"])


@contextlib.asynccontextmanager
async def chromium(url: str) -> AsyncIterator[Page]:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-port=0",
               "--autoplay-policy=no-user-gesture-required",
               "--disable-features=WebRtcHideLocalIpsWithMdns", url]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            end = time.monotonic() + 30
            while not (port_file.is_file() and port_file.read_text().strip()):
                assert time.monotonic() < end and proc.poll() is None, "Chromium did not start"
                await asyncio.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    targets = await r.json()
                target = next(t for t in targets if t["type"] == "page")
                async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    yield Page(ws)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)      # Chromium and the helpers it started
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),  # CI must have it
                    reason="needs the chromium browser (apt install chromium)")
async def test_say_emotion_and_interrupt_change_what_the_viewer_receives():
    with agent_process('sinks.enabled=["webrtc"]') as (_p, url):
        async with chromium(url) as page:
            await page.until("typeof pc !== 'undefined' && pc && pc.connectionState === 'connected' "
                             "&& framesShown > 25", 60)
            await page.until("document.getElementById('stats').textContent.includes('frames')", 10)
            frames = lambda s: int(re.search(r"frames (\d+)", s).group(1))  # noqa: E731
            first = frames(await page.js("document.getElementById('stats').textContent"))
            await asyncio.sleep(1.5)
            assert frames(await page.js("document.getElementById('stats').textContent")) > first

            # Silence first; then type a sentence and click Say: speech reaches the viewer.
            silent = await page.energy_rate(1.0)
            await page.js("document.getElementById('say-text').value = "
                          "'Hello, I am speaking to you from the web page.';"
                          "document.getElementById('say').click()")
            await page.until("document.getElementById('message').textContent"
                             ".startsWith('Speaking')", 10)
            speaking = 0.0
            for _ in range(10):                      # latency + TTS: within a few seconds
                speaking = max(speaking, await page.energy_rate(0.5))
                if speaking > 50 * silent + 1e-4:
                    break
            assert speaking > 50 * silent + 1e-4, (silent, speaking)
            assert await page.js("document.getElementById('say-text').value") == ""

            # An emotion button changes the face the viewer shows far more than idle motion
            # does.  Head sway is switched off for the measurement (it moves every pixel); what
            # idle motion remains (blinks, breathing) is measured as the baseline.
            await page.js("api('POST', '/api/scales', {head: 0})")
            await asyncio.sleep(4.0)                          # the sentence and the sway end
            before = [blocks(await page.mean_frame()) for _ in range(3)]
            idle_change = max(float(np.abs(x - y).max()) for x, y in zip(before, before[1:], strict=False))
            await page.js("document.querySelector('[data-emotion=surprise]').click()")
            await page.until("document.querySelector('[data-emotion=surprise]')"
                             ".getAttribute('aria-pressed') === 'true'", 10)
            await asyncio.sleep(1.0)                          # the expression settles
            change = min([float(np.abs(blocks(await page.mean_frame()) - before[-1]).max())
                          for _ in range(2)])
            assert change > 3 * idle_change and change > 10, (idle_change, change)

            # Interrupt in the middle of a long sentence: the viewer's audio goes silent.
            await page.js("document.getElementById('say-text').value = 'This is a long sentence "
                          "that goes on and on, so that there is plenty of speech left to cut "
                          "off when the interrupt button is pressed in the middle of it.';"
                          "document.getElementById('say').click()")
            for _ in range(20):
                if await page.energy_rate(0.5) > 50 * silent + 1e-4:
                    break
            else:
                raise AssertionError("the long sentence never reached the viewer")
            await page.js("document.getElementById('interrupt').click()")
            await page.until("document.getElementById('message').textContent"
                             ".startsWith('Interrupted')", 10)
            await asyncio.sleep(1.0)                 # frames already in flight may still play
            after = await page.energy_rate(2.0)
            assert after < 0.05 * speaking, (after, speaking)

            # A refusal is shown, with the server's reason.
            await page.js("document.getElementById('say-text').value = '   ';"
                          "document.getElementById('say').click()")
            msg = await page.until("document.getElementById('message').className === 'error' && "
                                   "document.getElementById('message').textContent", 10)
            assert msg.startswith("Could not say that:") and "HTTP 4" in msg, msg
