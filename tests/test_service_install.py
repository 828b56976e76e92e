"""`avatar-agent service install | uninstall`: the user unit for this install, verified by
systemd-analyze, and its ExecStart started for real against a NOTIFY_SOCKET."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avatar_agent import service_install as si
from avatar_agent.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _unit_lines(path: Path) -> dict[str, str]:
    return {line.split("=", 1)[0]: line.split("=", 1)[1] for line in path.read_text().splitlines()
            if "=" in line and not line.startswith("#")}


def test_install_writes_this_installs_unit_where_systemctl_user_looks(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert main(["service", "install"]) == 0
    out = capsys.readouterr().out
    unit = tmp_path / "xdg" / "systemd" / "user" / "avatar-agent.service"
    assert f"wrote {unit}" in out
    assert "systemctl --user daemon-reload" in out and "systemctl --user enable --now avatar-agent" in out
    keys = _unit_lines(unit)
    exe = shlex.split(keys["ExecStart"])
    # This environment's avatar-agent (the venv's script beside this interpreter), started bare.
    assert exe == [str(Path(sys.executable).parent / "avatar-agent"), "start"]
    assert os.access(exe[0], os.X_OK)
    assert keys["Documentation"] == f"file://{ROOT / 'README.md'}"
    assert "Nice" not in keys                       # a user unit cannot raise its priority
    assert keys["Type"] == "notify" and keys["WatchdogSec"] == "10"
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert r.returncode == 0 and "nknown" not in r.stderr, r.stderr
    # --config is made absolute and passed on; a missing one is refused with the fix.
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[player]\nlatency_ms = 300\n")
    assert main(["service", "install", "--config", str(cfg)]) == 0
    assert shlex.split(_unit_lines(unit)["ExecStart"])[1:] == ["start", "--config", str(cfg)]
    assert main(["service", "install", "--config", str(tmp_path / "none.toml")]) == 1
    assert "config --sample" in capsys.readouterr().err
    # uninstall removes the unit and the link `systemctl --user enable` made; twice is fine.
    wants = unit.parent / "default.target.wants"
    wants.mkdir()
    (wants / unit.name).symlink_to(unit)
    assert main(["service", "uninstall"]) == 0
    assert not unit.exists() and not (wants / unit.name).is_symlink()
    assert "daemon-reload" in capsys.readouterr().out
    assert main(["service", "uninstall"]) == 0
    assert "no unit installed" in capsys.readouterr().out


def test_unit_words_are_escaped_for_systemd():
    text = si.unit_text(["/opt/my venv/bin/avatar-agent"], Path("/etc/100%/a.toml"))
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    assert line == 'ExecStart="/opt/my venv/bin/avatar-agent" start --config /etc/100%%/a.toml'
    assert si.user_unit_dir({"HOME": "/home/u"}) == Path("/home/u/.config/systemd/user")
    assert si.user_unit_dir({"HOME": "/home/u", "XDG_CONFIG_HOME": "/x"}) == Path("/x/systemd/user")


@pytest.mark.slow
def test_the_installed_exec_start_runs_and_notifies_systemd(tmp_path):
    """What systemd would run: the installed ExecStart, with a real NOTIFY_SOCKET (Type=notify)."""
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path),
               OMP_NUM_THREADS="1", PULSE_SERVER="unix:/nonexistent")
    env.pop("AVATAR_AGENT_CONFIG", None)
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[server]\nport = 0\n[render]\nsize = 128\n[motion]\ngenerator = \"procedural\"\n")
    r = subprocess.run([str(Path(sys.executable).parent / "avatar-agent"), "service", "install",
                        "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "xdg" / "systemd" / "user" / "avatar-agent.service"
    cmd = shlex.split(_unit_lines(unit)["ExecStart"])
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(0.5)
    env["NOTIFY_SOCKET"] = sock_path
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    got: list[str] = []

    def wait_for(word: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                got.append(s.recv(4096).decode())
            except socket.timeout:
                continue
            if word in got[-1]:
                return True
        return False

    try:
        assert wait_for("READY=1", 120), (got, p.poll())
        p.send_signal(signal.SIGTERM)
        assert wait_for("STOPPING=1", 15), got
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
        s.close()
    out = p.stdout.read() if p.stdout else ""
    assert "open http://127.0.0.1:" in out, out
    assert "TensorFlow Lite" not in out and "absl::InitializeLog" not in out
