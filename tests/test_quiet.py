"""Native log spam (mediapipe, TensorFlow Lite, absl) stays off stderr unless --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from avatar_agent.quiet import NOISE, _pump, native_log_filter

ROOT = Path(__file__).resolve().parents[1]
SPAM = ("Created TensorFlow Lite XNNPACK delegate", "absl::InitializeLog()",
        "inference_feedback_manager.cc")


def _render(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("GLOG_minloglevel", "TF_CPP_MIN_LOG_LEVEL"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "avatar_agent.cli", "render", str(ROOT / "avatars" / "default.png"),
           "--text", "Hi.", "-o", str(tmp_path / "out.mp4"), "--set", "render.size=128",
           "--set", "motion.generator=procedural", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_a_real_render_prints_no_native_log_lines_unless_verbose(tmp_path):
    quiet = _render(tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert not any(s in quiet.stderr for s in SPAM), quiet.stderr
    loud = _render(tmp_path, "--verbose")                  # the spam is real: --verbose shows it
    assert loud.returncode == 0, loud.stderr
    assert any(s in loud.stderr for s in SPAM), loud.stderr
    # Our own errors still reach stderr through the filter.
    bad = subprocess.run([sys.executable, "-m", "avatar_agent.cli", "render", "nope.png",
                          "missing.wav", "-o", str(tmp_path / "x.mp4")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode != 0 and "missing.wav" in bad.stderr


def test_the_filter_keeps_errors_partial_lines_and_progress_bars():
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    t = threading.Thread(target=_pump, args=(r, out_w))
    t.start()
    os.write(w, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
                b"W0000 00:00:1796413067.561590   21886 inference_feedback_manager.cc:114] x\n"
                b"E0000 00:00:1796413067.561590   21886 some.cc:1] a real error\n"
                b"Traceback (most recent call last):\n 50%|#####     |\r")
    os.write(w, b" 60%|######    |\rtail without newline")
    os.close(w)
    t.join(5)
    os.close(out_w)
    got = b""
    while chunk := os.read(out_r, 4096):
        got += chunk
    os.close(out_r)
    assert got == (b"E0000 00:00:1796413067.561590   21886 some.cc:1] a real error\n"
                   b"Traceback (most recent call last):\n 50%|#####     |\r 60%|######    |\r"
                   b"tail without newline")
    assert NOISE.match(b"I1204 19:37:49.000001  123 gl_context.cc:357] GL version")
    assert not NOISE.match(b"19:37:49 INFO    avatar_agent.agent: running")


def test_the_filter_restores_stderr(capfd):
    before = os.fstat(2).st_ino
    with native_log_filter():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nkept line\n")
    assert os.fstat(2).st_ino == before
    err = capfd.readouterr().err
    assert err == "kept line\n"
