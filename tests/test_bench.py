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
                        "--shards", "1", "--seconds", "3", "--json", "--set", "render.size=128",
                        "--set", "motion.generator=procedural"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    for key in ("sessions", "fps_min", "dropped_pct_max", "cpu_cores", "rss_mb",
                "rss_per_session_mb", "first_frame_ms_p50"):
        assert key in out, key
    assert out["sessions"] == 2 and 0 < out["fps_min"] <= 26 and out["cpu_cores"] > 0
    assert 0 <= out["repeated_pct_max"] <= min(100.0, out["dropped_pct_max"])
    # the automatic default reached the engine: one inference thread per core, at most 2
    from avatar_agent.engine import AUTO_WORKERS_MAX, _cores

    assert out["inference_workers"] == min(_cores(), AUTO_WORKERS_MAX)
    assert out["render_batch"] == 4


def test_bench_sessions_over_shards_drives_the_real_sharded_server():
    """`bench --sessions 3 --shards 2`: the sessions are opened, fed and read over HTTP through a
    sharded server's parent, spread over both shard processes; figures from both."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "avatar_agent.cli", "bench", "--sessions", "3",
                        "--shards", "2", "--seconds", "3", "--json", "--set", "render.size=128",
                        "--set", "motion.generator=procedural"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    assert out["sessions"] == 3 and out["shards"] == 2 and sorted(out["shard_sessions"]) == [1, 2]
    assert 0 < out["fps_min"] <= 26 and out["cpu_cores"] > 0 and out["onsets_measured"] >= 1
    assert 0 < out["first_frame_ms_p50"] < 5000
    assert out["inference_workers"] >= 1
    # three processes' memory: more than one engine holds alone
    assert out["rss_engine_mb"] > 300


def test_bench_soak_prints_its_figures_and_the_calls_it_made():
    """`avatar-agent bench --soak` (25 s here, 128² procedural): real time with a WebRTC watcher
    in a child process, says, pushes, an emotion change and viewer churn; one JSON object with
    fps at the sender and at the viewer, dropped %, RSS samples (raw and trimmed) and the calls
    (figures only: the long run is the benchmark's job)."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "avatar_agent.cli", "bench", "--soak", "0.42",
                        "--set", "render.size=128", "--set", "motion.generator=procedural"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    assert 20 < out["fps_sent"] <= 26 and 15 < out["fps_at_viewer"] <= 26
    assert 0 <= out["dropped_pct"] < 100
    assert out["rss_mb"] and out["rss_trimmed_mb"] and all(x > 50 for x in out["rss_mb"])
    if out["heap_in_use_mb"] is not None:               # glibc: malloc's live bytes are within RSS
        assert all(0 < h < r for h, r in zip(out["heap_in_use_mb"], out["rss_trimmed_mb"],
                                              strict=True))
    assert out["calls"]["say"] >= 2 and out["calls"]["push"] >= 1 and out["calls"]["viewers"] >= 1
    assert set(out["dropped_after"]) <= set(out["calls"]) | {"none"}


def test_bench_with_microphone_like_speech_says_whether_phones_are_recognised():
    """`avatar-agent bench --seconds 3 --speech mic` (short): the real-time run's speech comes
    without phonemes, the report says live recognition is on (auto, one agent) and the run ends
    with its figures; `audio.recognizer=off` says off."""
    import subprocess
    import sys

    def run(*extra: str) -> str:
        r = subprocess.run([sys.executable, "-m", "avatar_agent.cli", "bench", "--seconds", "3",
                            "--speech", "mic", "--set", "render.size=128", *extra],
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "fps sustained" in r.stdout and "first mouth-open frame" in r.stdout, r.stdout
        return r.stdout

    assert "live phone recognition on (audio.recognizer = auto)" in run()
    assert "live phone recognition off (audio.recognizer = off)" in run("--set",
                                                                         "audio.recognizer=off")
