"""Shared pieces of the fault suite: the CLI as a subprocess, a live control API on loopback, and
a probe that measures how long the event loop is ever blocked."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from avatar_agent.server.control import ControlSettings, mount, security_settings

from ..server.controller import QueueController

ROOT = Path(__file__).resolve().parents[2]
PORTRAIT = ROOT / "avatars" / "default.png"
CLI_ENV = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": "/nonexistent-home",
           "XDG_CONFIG_HOME": "/nonexistent", "GLOG_minloglevel": "2"}


def cli(*args: str, timeout: float = 120, stdin: str | None = "") -> subprocess.CompletedProcess:
    """Run ``avatar-agent ARGS`` as a user would; stdin is empty (closed) by default."""
    return subprocess.run([sys.executable, "-m", "avatar_agent.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=CLI_ENV, input=stdin)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The stderr of a refused command; asserts it is one avatar-agent line, no traceback."""
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("avatar-agent:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


_POSTER = """
import asyncio, json, sys, aiohttp
async def main(url, path):
    async with aiohttp.ClientSession() as s:
        with open(path, "rb") as f:
            data = f.read()
        async with s.post(url, data=data, headers={"Content-Type": "application/octet-stream"}) as r:
            print(json.dumps({"status": r.status, "body": await r.json()}))
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def post_from_child(url: str, body: Path) -> tuple[int, dict[str, Any]]:
    """POST the file ``body`` to ``url`` from a child process (the client's own work, e.g.
    writing 57 MB, then never shows up in this process's event-loop measurements)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _POSTER, url, str(body),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    import json

    got = json.loads(out.decode().strip().splitlines()[-1])
    return got["status"], got["body"]


class LoopProbe:
    """Ticks every ``period`` s on the running loop and records the longest gap between ticks
    (a blocked event loop shows up as one long gap)."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.max_gap = 0.0
        self._task: asyncio.Task[None] | None = None
        self._gc_was_enabled = True

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.period)
            now = time.perf_counter()
            self.max_gap = max(self.max_gap, now - last - self.period)
            last = now

    async def __aenter__(self) -> "LoopProbe":
        # The probe measures the code under test.  A full collection of this test process's
        # heap (what hundreds of earlier tests left; the product's processes freeze theirs
        # after the warm-up) holds the GIL long enough to show as a gap of its own: collect
        # first, and none while probing.
        gc.collect()
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self._gc_was_enabled:
            gc.enable()


@dataclass
class LiveApi:
    """The control API over a real speech queue (real clock), served on 127.0.0.1."""

    ctl: QueueController
    server: TestServer
    app: web.Application
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for k, d in self.events if k == kind]


async def start_api(settings: ControlSettings | None = None, max_queued_s: float = 120.0,
                    **security: Any) -> LiveApi:
    """Start a QueueController and the control API with its security middlewares."""
    ctl = QueueController(max_queued_s=max_queued_s)
    await ctl.start()
    app = web.Application()
    s = settings or ControlSettings(max_audio_s=max_queued_s)
    mount(app, ctl, s, security_settings(avatar_dirs=s.avatar_dirs, **security))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    api = LiveApi(ctl, server, app)
    ctl.subscribe(lambda kind, data: api.events.append((kind, dict(data))))
    return api


async def stop_api(api: LiveApi) -> None:
    await api.server.close()
    await api.ctl.stop()
