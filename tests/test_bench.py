"""The long-session simulation behind `avatar-agent bench --simulate-hours` (short here)."""

from avatar_agent.bench import simulate_session
from avatar_agent.config import load_config


async def test_simulated_session_has_exact_frames_and_no_av_drift():
    cfg = load_config(None, [], use_default_path=False)
    r = await simulate_session(cfg, hours=0.05)          # 3 minutes of session on the fake clock
    assert r["frames"] == r["expected_frames"] == 0.05 * 3600 * 25
    assert r["av_offset_drift_ms"] <= 40.0
    assert r["underruns"] == 0


def test_bench_sessions_prints_one_json_object_with_the_figures():
    """`avatar-agent bench --sessions 2 --json` (short): the keys the session benchmark promises,
    with values a run can have (not speed asserts: speed is the bench's job)."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "avatar_agent.cli", "bench", "--sessions", "2",
                        "--seconds", "3", "--json", "--set", "render.size=128",
                        "--set", "motion.generator=procedural"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    for key in ("sessions", "fps_min", "dropped_pct_max", "cpu_cores", "rss_mb",
                "rss_per_session_mb", "first_frame_ms_p50"):
        assert key in out, key
    assert out["sessions"] == 2 and 0 < out["fps_min"] <= 26 and out["cpu_cores"] > 0
