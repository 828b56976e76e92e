"""systemd integration with real parts: systemd-analyze on the unit, a real NOTIFY_SOCKET bound by
the test, and a real `avatar-agent start` process."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avatar_agent.service import Notifier

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "avatar-agent.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies_without_unknown_keys(tmp_path):
    text = UNIT.read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NotifyAccess=main",
                "ExecReload="):
        assert key in text
    # Every [Service] option is commented (the comment block right above it says why).
    service = text.split("[Service]")[1].split("[Install]")[0].strip().splitlines()
    for prev, line in zip(service, service[1:], strict=False):
        if line and not line.startswith("#"):
            assert prev.startswith("#") or prev.startswith("Standard"), f"uncommented: {line}"
    # ExecStart must exist at verify time: point it at this interpreter.
    unit = tmp_path / "avatar-agent.service"
    unit.write_text(text.replace("%h/avatar-agent/.venv/bin/avatar-agent start",
                                 f"{sys.executable} -m avatar_agent.cli start"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Unknown" not in r.stderr and "unknown" not in r.stderr, r.stderr
    # A misspelt key is caught by the same check (the test can fail).
    bad = tmp_path / "bad.service"
    bad.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    r = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
    assert "Unknown key" in r.stderr


def _bind(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    s.settimeout(0.5)
    return s, path


def _recv_until(s: socket.socket, want: str, timeout: float, log: list[str]) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            msg = s.recv(4096).decode()
        except socket.timeout:
            continue
        log.append(msg)
        if want in msg:
            return True
    return False


def test_notifier_sends_to_abstract_and_path_sockets(tmp_path):
    s, path = _bind(tmp_path)
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    n.ready()
    n.watchdog(10.0)
    n.watchdog(10.1)           # within half the period: not sent
    n.watchdog(10.6)
    n.stopping()
    msgs = [s.recv(4096).decode() for _ in range(4)]
    assert msgs[0].startswith("READY=1") and msgs[1] == "WATCHDOG=1" and msgs[2] == "WATCHDOG=1"
    assert msgs[3].startswith("STOPPING=1")
    a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.bind("\0avatar-agent-test-%d" % os.getpid())
    a.settimeout(1)
    Notifier(env={"NOTIFY_SOCKET": "@avatar-agent-test-%d" % os.getpid()}).status("hi")
    assert a.recv(100) == b"STATUS=hi"
    assert Notifier(env={}).enabled is False


@pytest.mark.slow
def test_real_start_process_ready_watchdog_reload_stopping(tmp_path):
    s, path = _bind(tmp_path)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000", OMP_NUM_THREADS="1",
               HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    env.pop("AVATAR_AGENT_CONFIG", None)
    # No audio source and no sinks configured: "auto" (no microphone here → typed text via TTS;
    # no v4l2loopback → the web page only), as a user starting it bare would get.
    env["PULSE_SERVER"] = "unix:/nonexistent"
    cmd = [sys.executable, "-m", "avatar_agent.cli", "start", "--set", "server.port=0",
           "--set", "render.size=256"]
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    log: list[str] = []
    try:
        assert _recv_until(s, "READY=1", 120, log), (log, p.poll())
        # Watchdog pings come from the clock task, every half period (0.5 s).
        t = time.monotonic()
        pings = 0
        while time.monotonic() - t < 3:
            try:
                if s.recv(4096) == b"WATCHDOG=1":
                    pings += 1
            except socket.timeout:
                pass
        assert pings >= 4, pings
        p.send_signal(signal.SIGHUP)
        assert _recv_until(s, "RELOADING=1", 30, log), log
        assert _recv_until(s, "READY=1", 60, log), log
        p.send_signal(signal.SIGTERM)
        assert _recv_until(s, "STOPPING=1", 10, log), log
        rc = p.wait(timeout=15)
        out = p.stdout.read() if p.stdout else ""
        assert rc == 0, out
        assert "open http://127.0.0.1:" in out
        assert "no microphone found" in out and "type text" in out
        assert "no v4l2loopback device" in out and "modprobe v4l2loopback" in out
    finally:
        if p.poll() is None:
            p.kill()
        s.close()
