"""The long-session simulation behind `avatar-agent bench --simulate-hours` (short here)."""

from avatar_agent.bench import simulate_session
from avatar_agent.config import load_config


async def test_simulated_session_has_exact_frames_and_no_av_drift():
    cfg = load_config(None, [], use_default_path=False)
    r = await simulate_session(cfg, hours=0.05)          # 3 minutes of session on the fake clock
    assert r["frames"] == r["expected_frames"] == 0.05 * 3600 * 25
    assert r["av_offset_drift_ms"] <= 40.0
    assert r["underruns"] == 0
