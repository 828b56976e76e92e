"""WebRtcVad on real espeak-ng speech."""

from __future__ import annotations

import numpy as np
import pytest

from avatar_agent.audio.resample import to_pipeline
from avatar_agent.audio.vad import VadConfigError, WebRtcVad
from avatar_agent.types import FRAME_SAMPLES, SAMPLE_RATE, Vad


def frames_of(x: np.ndarray) -> list[np.ndarray]:
    n = x.size // FRAME_SAMPLES
    return [x[k * FRAME_SAMPLES:(k + 1) * FRAME_SAMPLES] for k in range(n)]


@pytest.mark.parametrize("bad", [-1, 4, True, "2", 1.5])
def test_bad_aggressiveness(bad):
    with pytest.raises(VadConfigError, match="aggressiveness"):
        WebRtcVad(bad)


def test_bad_frame_and_rate():
    with pytest.raises(VadConfigError, match="10, 20 or 30"):
        WebRtcVad(2, 25)
    with pytest.raises(VadConfigError, match="sample_rate"):
        WebRtcVad(2, 20, 44100)
    v = WebRtcVad()
    with pytest.raises(ValueError, match="1-D"):
        v.is_speech(np.zeros((320, 2), np.float32))
    with pytest.raises(ValueError, match="float"):
        v.is_speech(np.zeros(320, np.int16))


def test_is_a_vad_and_reports_delay():
    assert isinstance(WebRtcVad(), Vad)
    assert [WebRtcVad(2, ms).decision_delay_ms for ms in (10, 20, 30)] == [0, 0, 10]


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
@pytest.mark.parametrize("mode", [0, 3])
def test_speech_between_silences(speech_wav, frame_ms, mode):
    s = speech_wav("Hello there, how are you today?", lead_s=1.0, tail_s=1.0)
    x = to_pipeline(s.samples, s.rate)
    vad = WebRtcVad(mode, frame_ms)
    d = np.array([vad.is_speech(f) for f in frames_of(x)])
    t = np.arange(d.size) * FRAME_SAMPLES / SAMPLE_RATE
    inside = (t >= s.speech_start + 0.05) & (t < s.speech_end - 0.05)
    outside = (t < s.speech_start - 0.1) | (t >= s.speech_end + 0.1)
    assert d[inside].mean() > 0.8
    assert not d[outside].any()
    first, last = np.flatnonzero(d)[[0, -1]]
    assert abs(t[first] - s.speech_start) <= 0.06
    assert abs(t[last] + 0.02 - s.speech_end) <= 0.06


def test_energy_gate_removes_webrtc_overhang():
    x = np.zeros(SAMPLE_RATE, np.float32)
    x[8000:8320] = 0.5 * np.random.default_rng(0).standard_normal(320)  # one 20 ms click
    raw = WebRtcVad(2, 20, min_dbfs=None)
    gated = WebRtcVad(2, 20)
    d_raw = [raw.is_speech(f) for f in frames_of(x)]
    d_gated = [gated.is_speech(f) for f in frames_of(x)]
    assert sum(d_raw) >= 3  # webrtcvad alone holds "voiced" over the digital silence after it
    assert sum(d_gated) <= 1


def test_thirty_ms_frames_buffer_across_calls():
    v = WebRtcVad(0, 30, min_dbfs=None)
    # 20 ms calls with 30 ms VAD frames: the 1st call completes none (repeats the initial False)
    assert v.is_speech(np.zeros(FRAME_SAMPLES, np.float32)) is False
    v.reset()
    assert v.is_speech(np.zeros(10, np.float32)) is False


def test_non_finite_and_overdriven_samples_read_as_silence_and_full_scale(speech_wav):
    """NaN/inf samples count as silence and samples past ±1 as full scale: the decisions are
    those of the cleaned-up audio, and the caller's array is left as it was."""
    s = speech_wav("Hello there, how are you today?", lead_s=0.3, tail_s=0.3)
    x = to_pipeline(s.samples, s.rate)
    rng = np.random.default_rng(1)
    dirty = x * 3.0                                              # overdriven
    spots = rng.choice(x.size, 200, replace=False)
    dirty[spots] = rng.choice([np.nan, np.inf, -np.inf], spots.size)
    clean = np.clip(np.nan_to_num(dirty, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)
    before = dirty.copy()
    a, b = WebRtcVad(), WebRtcVad()
    got = [a.is_speech(f) for f in frames_of(dirty)]
    want = [b.is_speech(f) for f in frames_of(clean)]
    assert got == want and any(got)
    np.testing.assert_array_equal(dirty, before)
