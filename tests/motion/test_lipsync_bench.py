"""bench/lipsync_real.py's measurements: lag sign, NaN handling, timestamp resampling, envelope."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ls():
    spec = importlib.util.spec_from_file_location("lipsync_real", ROOT / "bench" / "lipsync_real.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lipsync_real"] = mod                  # its dataclass needs the module registered
    spec.loader.exec_module(mod)
    return mod


def test_lag_is_positive_when_the_avatar_is_late(ls):
    rng = np.random.default_rng(0)
    real = np.convolve(rng.normal(size=600), np.ones(3) / 3, "same")
    late = np.concatenate([np.zeros(2), real[:-2]])           # avatar 2 frames (80 ms) behind
    r0, best, lag, used = ls.lag_corr(late, real)
    assert lag == 2 and best > 0.99 and r0 < best and used == 600
    r0, best, lag, _ = ls.lag_corr(real, real)
    assert lag == 0 and r0 == pytest.approx(1.0)


def test_frames_without_a_face_are_left_out(ls):
    rng = np.random.default_rng(1)
    real = rng.normal(size=300)
    avatar = real + 0.5 * rng.normal(size=300)
    r_full = ls.lag_corr(avatar, real)[0]
    real_nan = real.copy()
    real_nan[::7] = np.nan
    r0, _, _, used = ls.lag_corr(avatar, real_nan)
    assert used == 300 - len(real[::7]) and abs(r0 - r_full) < 0.05


def test_resampling_picks_the_frame_on_screen(ls):
    # A 30 fps clip whose video starts 80 ms after its audio.
    times = 0.08 + np.arange(60) / 30
    values = np.arange(60, dtype=float)
    out = ls.resample_to_grid(times, values, 50)
    assert np.isnan(out[0]) and np.isnan(out[1])             # mid-frame 20, 60 ms: no video yet
    assert out[2] == 0                                        # 100 ms: first frame (80 ms)
    assert out[10] == np.floor((0.42 - 0.08) * 30)            # 420 ms: the frame shown since 413 ms


def test_envelope_and_mouth_ratio(ls):
    audio = np.zeros(16000, np.float32)
    audio[8000:] = 0.5 * np.sin(np.arange(8000) * 0.3)
    env = ls.envelope(audio)
    assert env.shape == (25,) and env[:12].max() == pytest.approx(env.max() - 60)
    pts = np.zeros((478, 2))
    pts[33], pts[263], pts[13], pts[14] = (100, 100), (200, 100), (150, 200), (150, 230)
    assert ls.mouth_ratio(pts) == pytest.approx(0.3)
