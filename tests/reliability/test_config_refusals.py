"""Rows 8, 10, 11 and 15 of issue 13: configs that cannot work are refused by `start` and `check`
alike, with one line naming the key (or file) and the fix.  Real CLI subprocesses."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from .helpers import cli, one_line_error

REFUSED = [
    # (override, the words the one-line error must contain)
    ("render.size=16384", ["render.size = 16384", "64..2048"]),                     # row 8
    ("server.port=99999", ["server.port = 99999", "0..65535"]),                     # row 10
    ("player.latency_ms=0", ["player.latency_ms = 0", "> 0"]),                     # row 11
    ("player.latency_ms=-40", ["player.latency_ms = -40"]),                         # row 11
    ("player.latency_ms=60", ["player.latency_ms = 60", "chunker.hop_ms"]),         # row 11
    ("player.queue_frames=0", ["player.queue_frames = 0", "≥ 1"]),                 # row 11
    ("player.fps=24", ["player.fps = 24", "25"]),                                   # row 15
    ("server.max_body_kb=-1", ["server.max_body_kb = -1", "≥ 1"]),                 # row 15
    ("server.audio_idle_s=0", ["server.audio_idle_s = 0"]),
    ("server.rate_offer_per_min=0", ["server.rate_offer_per_min = 0"]),
]


@pytest.mark.parametrize("override, words", REFUSED, ids=[o for o, _ in REFUSED])
def test_start_and_check_refuse_the_same_config_with_the_same_line(override: str,
                                                                   words: list[str]) -> None:
    lines = []
    for cmd in ("check", "start"):
        r = cli(cmd, "--set", override, timeout=60)
        assert r.returncode == 2, (cmd, r.stdout[-2000:], r.stderr)
        line = one_line_error(r)
        assert line.startswith("avatar-agent: config error:")
        for w in words:
            assert w in line, line
        lines.append(line)
    assert lines[0] == lines[1]
    if override == "player.fps=24":
        assert "chunker.hop_ms" not in lines[0]        # the fps is at fault, not the hop


def test_row15_non_utf8_config_names_the_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_bytes(b"[player]\nfps = 25\n# caf\xe9 in Latin-1\n")
    r = cli("check", "--config", str(cfg))
    assert r.returncode == 2
    line = one_line_error(r)
    assert f"{cfg}:3" in line and "UTF-8" in line


def test_row15_a_config_file_name_that_is_not_utf8_is_named_not_a_traceback(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/conf\xff.toml"
    with open(raw, "wb") as f:
        f.write(b"[player]\nfsp = 25\n")
    r = cli("check", "--config", os.fsdecode(raw))
    assert r.returncode == 2
    line = one_line_error(r)
    assert "conf" in line and ".toml:2" in line and "player.fsp" in line


def test_row10_port_in_use_is_one_line_from_start_and_a_problem_for_check(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        over = ["--set", f"server.port={port}", "--set", 'sinks.enabled=["webrtc"]',
                "--set", "audio.source=tts", "--set", "render.size=128",
                "--set", "motion.generator=procedural"]
        r = cli("check", *over)
        assert r.returncode == 1
        assert f"server.port {port} on 127.0.0.1 is in use by another program" in r.stdout
        r = cli("start", *over, timeout=120)
        assert r.returncode != 0
        line = one_line_error(r)
        assert f"127.0.0.1:{port}" in line and "pick another port" in line


def test_row1_row11_check_reports_a_file_sink_over_the_portrait_and_no_usable_sink(
        tmp_path: Path) -> None:
    portrait = tmp_path / "me.png"
    portrait.write_bytes((Path(__file__).parents[2] / "avatars" / "default.png").read_bytes())
    r = cli("check", "--set", f"avatar.image={portrait}", "--set", f"sinks.file={portrait}",
            "--set", 'sinks.enabled=["file"]')
    assert r.returncode == 1
    assert f"sinks.file = {portrait} is the input {portrait}" in r.stdout          # row 1
    assert "can start: the avatar would be shown nowhere" in r.stdout              # row 11
    assert portrait.read_bytes() == (Path(__file__).parents[2] / "avatars" / "default.png"
                                     ).read_bytes()


def test_row1_start_names_the_file_sink_key_not_render_option(tmp_path: Path) -> None:
    portrait = tmp_path / "me.png"
    portrait.write_bytes((Path(__file__).parents[2] / "avatars" / "default.png").read_bytes())
    r = cli("start", "--set", f"avatar.image={portrait}", "--set", f"sinks.file={portrait}",
            "--set", 'sinks.enabled=["file"]', "--set", "audio.source=tts")
    assert r.returncode != 0
    assert f"sinks.file = {portrait} is the input {portrait}" in r.stderr, r.stderr
    assert "-o " not in r.stderr and "Traceback" not in r.stderr
