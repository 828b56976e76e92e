"""The CLI as a user runs it (subprocesses)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avatar_agent.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "HOME": "/nonexistent-home", "XDG_CONFIG_HOME": "/nonexistent"})


def test_config_sample_is_the_repo_config():
    r = run("config", "--sample")
    assert r.returncode == 0 and r.stdout == (ROOT / "config.toml").read_text()


def test_check_reports_ok_and_latency_and_exits_zero():
    r = run("check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "latency implied by the chunk settings" in r.stdout
    assert "ms left for compute" in r.stdout and "no problems found" in r.stdout
    assert "[player]" in r.stdout                          # the effective config


def test_check_says_which_latency_a_speech_queue_source_gets():
    r = run("check", "--set", "audio.source=tts", "--set", "player.speech_latency_ms=70")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "player.speech_latency_ms = 70 ms after it arrives" in r.stdout
    r = run("check", "--set", "audio.source=file", "--set", "audio.file=avatars/default.png")
    assert "speech_latency_ms" not in r.stdout.split("effective config")[0]


def test_check_exits_one_with_a_fix_for_each_problem(tmp_path):
    r = run("check", "--set", "audio.source=file", "--set", f"audio.file={tmp_path}/nope.wav",
            "--set", "player.latency_ms=150", "--set", f"avatar.image={tmp_path}/none.png")
    assert r.returncode == 1
    assert "3 problem(s)" in r.stdout                      # three problems, each with a fix
    assert r.stdout.count("fix:") >= 6
    assert "nope.wav" in r.stdout and "none.png" in r.stdout and "latency_ms" in r.stdout


def test_bad_config_is_exit_two_with_the_key():
    r = run("check", "--set", "player.fsp=25")
    assert r.returncode == 2 and "player.fsp" in r.stderr and "unknown key" in r.stderr


def test_models_verify_fails_without_weights(tmp_path):
    r = run("models", "verify", "--dir", str(tmp_path))
    assert r.returncode == 1
    assert "missing" in r.stdout and "avatar-agent models fetch official" in r.stderr


def test_official_profile_without_weights_names_files_and_fetch(tmp_path):
    r = run("render", str(ROOT / "avatars" / "default.png"), "--text", "hi", "-o",
            str(tmp_path / "x.mp4"), "--profile", "official", "--set",
            f"motion.models_dir={tmp_path}")
    assert r.returncode != 0
    assert "net-200.pth" in r.stderr and "models fetch official" in r.stderr


def test_devices_lists_inputs_and_cameras():
    r = run("devices")
    assert r.returncode == 0
    assert "audio inputs" in r.stdout and "virtual cameras" in r.stdout
