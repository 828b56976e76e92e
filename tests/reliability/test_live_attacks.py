"""Issue 13, rows 3, 4, 5 and 13 against the live agent: a real `avatar-agent start` process is
watched by a real aiortc viewer while a hostile client (its own process) attacks the API.

Each attack is answered as documented (413, an idle stream ended, offers capped and rate limited,
interrupts coalesced and rate limited) and the viewer's frame rate over each attack (≥ 5 s
windows, after 2 s of quiet) is printed.  Measured 2026-12-04 on this 2-core machine with other
work loading it (load average 1.5-2.5, the attacker on the same cores), 4 runs with the two-slot
video mailbox: upload 25.0, idle stream 25.0, offers 24.9-25.1, interrupts 25.0 fps (with a
one-slot mailbox the interrupt flood measured 23.8-24.6: the encoder, starved for one frame
time, skipped frames).  The asserted floors: ≥ 22 fps through the upload and the idle stream (a
0.4 s stall fails; before the fix the upload froze the clock for 18 s), ≥ 24 through the
interrupt flood (the issue's target), ≥ 18 through the offer flood, whose 50 peers are set up
and torn down by the agent itself."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from .helpers import CLI_ENV, ROOT

pytest.importorskip("aiortc")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _attack(name: str, url: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "tests.reliability.attack", name, url],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**CLI_ENV, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


async def test_live_agent_keeps_24_fps_through_api_attacks() -> None:
    from tests.sinks.conftest import loopback_ice
    from tests.sinks.test_webrtc import connect, wait_for
    from tests.test_live import agent_process

    with agent_process('sinks.enabled=["webrtc"]', "render.size=128",
                       "motion.generator=procedural", "server.audio_idle_s=1.0") as (proc, url):
        assert url
        with loopback_ice():
            viewer = await connect(url)
            try:
                await wait_for(lambda: viewer.frames >= 50, timeout=60)
                fps: dict[str, float] = {}
                answers: dict[str, dict] = {}
                for name in ("upload", "idle_stream", "offers", "interrupts"):
                    # Each window measures its own attack, not the previous one's teardown
                    # (50 refused peers closing): let the agent settle first.
                    await asyncio.sleep(2.0)
                    t0 = time.monotonic()
                    answers[name] = await asyncio.to_thread(_attack, name, url)
                    # The window covers the attack and at least 5 s in all (one frame more or
                    # less at its edges is ±0.2 fps).
                    await asyncio.sleep(max(0.0, t0 + 5.0 - time.monotonic()))
                    t1 = time.monotonic()
                    n = sum(t0 <= t < t1 for t in viewer.video_times)
                    fps[name] = n / (t1 - t0)
            finally:
                await viewer.close()
    assert answers["upload"]["status"] == 413                                      # row 3
    msgs = answers["idle_stream"]["messages"]                                      # row 4
    assert answers["idle_stream"]["say"] == 200
    assert msgs[-1]["type"] == "finished" and "server.audio_idle_s" in msgs[-1]["reason"]
    st = {int(k): v for k, v in answers["offers"]["statuses"].items()}             # row 5
    assert st.get(200, 0) <= 15 and set(st) <= {200, 429, 503} and st.get(429, 0) >= 30
    st = {int(k): v for k, v in answers["interrupts"]["statuses"].items()}         # row 13
    assert set(st) <= {200, 429} and st.get(429, 0) >= 900
    assert 1 <= answers["interrupts"]["real"] <= 3        # the rest were coalesced or refused
    print(f"viewer fps through each attack: {fps}")
    assert fps["upload"] >= 22 and fps["idle_stream"] >= 22, fps
    assert fps["offers"] >= 18 and fps["interrupts"] >= 24, fps
