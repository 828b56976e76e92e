"""Rows 6, 7, 12 and 14 of the fault table: reload is all-or-nothing and enforces security at
once, CLI overrides and API swaps survive a reload, SIGHUP in a terminal stops the agent, and a
failed task makes `start` exit non-zero (so systemd's Restart=on-failure fires).

Real `avatar-agent start` processes, real HTTP on loopback, a real pseudo-terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from .helpers import PORTRAIT, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
TOKEN_A = "a" * 24
TOKEN_B = "b" * 24


class Agent:
    """A running `avatar-agent start` (TTS source, WebRTC page) with its log lines."""

    def __init__(self, p: subprocess.Popen, url: str, lines: list[str]) -> None:
        self.p, self.url, self.lines = p, url, lines

    def wait_log(self, pattern: str, timeout: float = 60.0, after: int = 0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for ln in self.lines[after:]:
                if re.search(pattern, ln):
                    return ln
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line {pattern!r}:\n" + "".join(self.lines[-30:]))

    def get(self, path: str, token: str | None = None) -> tuple[int, dict]:
        return self.call("GET", path, None, token)

    def call(self, method: str, path: str, body: dict | None, token: str | None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path.lstrip("/"), method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"}
                                                 if token else {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, {}


@contextlib.contextmanager
def agent(config: Path | None, *args: str, stdin: int | None = subprocess.PIPE,
          ready: str = "agent running") -> Iterator[Agent]:
    cmd = [sys.executable, "-m", "avatar_agent.cli", "start", *args, "--set", "audio.source=tts",
           "--set", "render.size=128", "--set", "server.port=0", "--set",
           'sinks.enabled=["webrtc"]', "--set", "motion.generator=procedural"]
    if config is not None:
        cmd[4:4] = ["--config", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CONFIG_HOME=tempfile.mkdtemp(),
               GLOG_minloglevel="2")
    env.pop("AVATAR_AGENT_CONFIG", None)
    env.pop("NOTIFY_SOCKET", None)
    p = subprocess.Popen(cmd, env=env, stdin=stdin, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=ROOT, bufsize=1)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(x) for x in p.stdout], daemon=True).start()
    a = Agent(p, "", lines)
    try:
        a.url = re.search(r"(http://127\.0\.0\.1:\d+/)", a.wait_log(r"open http://")).group(1)
        a.wait_log(ready)
        yield a
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _write(path: Path, **sections: dict) -> None:
    out = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path.write_text("\n".join(out) + "\n")


def _second_portrait(d: Path) -> Path:
    import cv2

    img = cv2.imread(str(PORTRAIT))
    out = d / "mirrored.png"
    cv2.imwrite(str(out), np.ascontiguousarray(img[:, ::-1]))
    return out


def test_reload_rotates_the_token_and_a_bad_reload_changes_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    _write(cfg, server={"token": TOKEN_A})
    with agent(cfg) as a:
        assert a.get("/api/status", TOKEN_A)[0] == 200
        assert a.get("/api/status", TOKEN_B)[0] == 401
        _write(cfg, server={"token": TOKEN_B}, player={"fps": 50})
        n = len(a.lines)
        a.p.send_signal(signal.SIGHUP)
        line = a.wait_log(r"reloaded config", after=n)
        assert "player.fps" in line and "restart" in line      # named, not silently ignored
        assert a.get("/api/status", TOKEN_B)[0] == 200         # the new token holds at once
        assert a.get("/api/status", TOKEN_A)[0] == 401         # and the old one is refused
        before = a.get("/api/status", TOKEN_B)[1]["emotion"]
        cfg.write_text('[server]\ntoken = "short"\n[avatar]\nemotion = "happiness"\n')  # invalid
        n = len(a.lines)
        a.p.send_signal(signal.SIGHUP)
        a.wait_log(r"reload failed, nothing changed", after=n)
        assert a.get("/api/status", TOKEN_B)[0] == 200
        assert a.get("/api/status", TOKEN_B)[1]["emotion"] == before != 4   # not half-applied
        assert a.p.poll() is None


def test_overrides_and_api_swaps_survive_a_reload(tmp_path: Path) -> None:
    other = _second_portrait(tmp_path)
    cfg = tmp_path / "agent.toml"
    _write(cfg, avatar={"directories": [str(tmp_path)]})
    with agent(cfg, "--avatar", str(other)) as a:
        assert a.get("/api/status")[1]["avatar"] == str(other)
        _write(cfg, avatar={"directories": [str(tmp_path)], "emotion": "happiness"})
        n = len(a.lines)
        a.p.send_signal(signal.SIGHUP)
        a.wait_log(r"reloaded config", after=n)
        st = a.get("/api/status")[1]
        assert st["avatar"] == str(other) and st["emotion"] == 4     # --avatar kept, emotion new
        copy = tmp_path / "copy.png"
        copy.write_bytes(PORTRAIT.read_bytes())
        assert a.call("POST", "/api/avatar", {"path": str(copy), "wait": True}, None)[0] == 200
        n = len(a.lines)
        a.p.send_signal(signal.SIGHUP)
        a.wait_log(r"reloaded config", after=n)
        assert a.get("/api/status")[1]["avatar"] == str(copy)        # the API swap stays


def test_sighup_in_a_terminal_stops_the_agent() -> None:
    master, slave = pty.openpty()
    try:
        with agent(None, stdin=slave) as a:
            a.p.send_signal(signal.SIGHUP)                   # the terminal was closed
            assert a.p.wait(timeout=30) == 0
    finally:
        os.close(master)
        os.close(slave)


def test_a_failed_audio_source_exits_non_zero(tmp_path: Path) -> None:
    bad = tmp_path / "speech.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + os.urandom(4000))   # a corrupt file
    cmd = [sys.executable, "-m", "avatar_agent.cli", "start", "--set", "audio.source=file",
           "--set", f"audio.file={bad}", "--set", "render.size=128", "--set", "server.port=0",
           "--set", 'sinks.enabled=["webrtc"]', "--set", "motion.generator=procedural"]
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CONFIG_HOME=tempfile.mkdtemp())
    env.pop("NOTIFY_SOCKET", None)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr
