"""bench/gpu_check.sh proves itself on a CPU: --device cpu --quick exits 0 with one JSON object
holding every figure the GPU run reports (tiny recipe weights; CUDA conformance tests skip)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_gpu_check_cpu_quick() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--quick"],
                       capture_output=True, text=True, timeout=380, env=env, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout[-2000:]                 # the JSON object alone on stdout
    out = json.loads(lines[0])
    assert out["device"] == "cpu" and out["quick"] is True and out["weights"].startswith("recipe-tiny")
    assert out["conformance"]["exit_code"] == 0 and "skipped" in out["conformance"]["summary"]
    st = out["stages_ms"]
    for k in ("hubert_per_audio_s", "dit_window", "warping_per_frame", "generator_per_frame",
              "paste_back_per_frame", "render_per_frame_b1"):
        assert st[k] > 0, k
    assert out["official_rtf"] > 0 and out["first_frame_ms"] > 0
    assert out["sessions_at_25fps"] >= 0 and out["capacity"]["render_ms_per_batch"]
    assert set(out["gpu_memory_mb"]) >= {"shared_mb", "note"}
    live = out["live"]
    assert live["frames_out"] > 0 and live["player_latency_ms"] > 0
