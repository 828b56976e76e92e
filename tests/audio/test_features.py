"""Mel and per-frame speech cues: values checked against signals with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar_agent.audio.features import (AudioInputError, frame_features, hz_to_mel_slaney,
                                         mel_frames, mel_to_hz_slaney, slaney_mel_filterbank)
from avatar_agent.audio.tts import synthesize

torch.set_num_threads(1)
SR = 16_000


def tone(hz: float, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_slaney_mel_scale():
    # Linear part: 200/3 Hz per mel; 1 kHz = 15 mel; log part: 27 mels per factor 6.4.
    assert hz_to_mel_slaney(1000.0) == pytest.approx(15.0)
    assert hz_to_mel_slaney(200.0) == pytest.approx(3.0)
    assert hz_to_mel_slaney(6400.0) == pytest.approx(42.0)
    f = np.array([0.0, 100.0, 999.0, 1000.0, 3000.0, 8000.0])
    np.testing.assert_allclose(mel_to_hz_slaney(hz_to_mel_slaney(f)), f, atol=1e-6)


def test_filterbank_shape_peaks_and_area():
    fb = slaney_mel_filterbank(80)
    assert fb.shape == (80, 257) and fb.dtype == np.float32 and fb.min() >= 0
    hz = np.linspace(0, 8000, 257)
    peaks = hz[fb.argmax(1)]
    assert np.all(np.diff(peaks) >= 0)                         # ordered low → high
    # Area normalisation: every filter integrates to about 1 over frequency (Hz).
    area = fb.sum(1) * (hz[1] - hz[0])
    np.testing.assert_allclose(area[10:], 1.0, rtol=0.2)
    # Every bin from 100 Hz to 7.9 kHz belongs to some filter.
    assert np.all(fb[:, (hz > 100) & (hz < 7900)].sum(0) > 0)


def test_mel_frames_shape_and_tone_band():
    audio = tone(1000.0, 1.0)
    mel = mel_frames(audio)
    assert mel.shape == (25, 80) and mel.dtype == np.float32
    fb = slaney_mel_filterbank(80)
    hz = np.linspace(0, 8000, 257)
    want = int(np.argmax(fb[:, np.argmin(np.abs(hz - 1000.0))]))
    assert np.all(mel[2:-2].argmax(1) == want)
    assert mel_frames(audio[:639]).shape == (0, 80)
    assert mel_frames(tone(440, 0.5), fps=50, n_mels=40).shape == (25, 40)


def test_streaming_matches_offline():
    u = synthesize("Streaming features must equal the offline ones.")
    audio = np.concatenate([np.zeros(3200, np.float32), u.audio, np.zeros(3200, np.float32)])
    off = mel_frames(audio)
    feats_off = frame_features(audio)
    spf, left, right = 640, 640, 640
    hop = 5 * spf
    n_total = len(off)
    for start in range(0, (n_total - 1) * spf - hop, hop):
        a = max(start - left, 0)
        chunk = audio[a : start + hop + right]
        on = mel_frames(chunk, left=start - a)[:5]
        np.testing.assert_allclose(on, off[start // spf : start // spf + 5], atol=1e-4)
        f = frame_features(chunk, left=start - a)
        np.testing.assert_allclose(f.energy_db[:5], feats_off.energy_db[start // spf:][:5],
                                   atol=1e-3)
        np.testing.assert_allclose(f.f1[:5], feats_off.f1[start // spf:][:5], atol=1e-3)


def test_energy_envelope_is_calibrated_and_band_limited():
    f = frame_features(tone(1000.0, 1.0, amp=0.5))
    # RMS of a 0.5-amplitude sine is 0.354 (−9.0 dBFS); Hann leakage stays inside the band.
    np.testing.assert_allclose(f.energy[2:-2], 0.5 / np.sqrt(2), rtol=0.03)
    np.testing.assert_allclose(f.energy_db[2:-2], -9.03, atol=0.3)
    assert frame_features(tone(100.0)).energy_db[5] < -40     # below the speech band
    assert frame_features(tone(6000.0)).energy_db[5] < -40    # above it
    np.testing.assert_allclose(frame_features(np.zeros(6400, np.float32)).energy_db, -100.0,
                               atol=1e-3)


def test_frames_are_aligned_to_video_frames():
    audio = np.zeros(SR, np.float32)
    audio[7 * 640 + 100 : 7 * 640 + 540] = tone(1500.0, 440 / SR)   # a burst inside frame 7
    e = frame_features(audio).energy_db
    assert int(np.argmax(e)) == 7
    assert e[7] > e[5] + 40 and e[7] > e[9] + 40


def test_spectral_cues_separate_low_and_high_energy():
    low = frame_features(tone(500.0))
    high = frame_features(tone(2500.0))
    assert low.low_high_db[5] > 30 and high.low_high_db[5] < -30
    assert low.centroid[5] == pytest.approx(500.0, rel=0.1)
    assert high.centroid[5] == pytest.approx(2500.0, rel=0.05)
    noise = np.random.default_rng(0).normal(0, 0.1, SR).astype(np.float32)
    hiss = np.diff(noise, prepend=0).astype(np.float32)   # high-pass: fricative-like
    assert frame_features(hiss).fricative_db[5] > frame_features(tone(500.0)).fricative_db[5] + 30


def test_bad_audio_is_rejected_with_a_clear_message():
    bad = tone(440.0)
    bad[100] = np.nan
    with pytest.raises(AudioInputError, match="NaN"):
        mel_frames(bad)
    with pytest.raises(AudioInputError, match="mono"):
        frame_features(np.zeros((2, 1600), np.float32))
    with pytest.raises(AudioInputError, match="int16"):
        mel_frames(np.zeros(1600, np.int16))
    with pytest.raises(AudioInputError, match="fps"):
        mel_frames(tone(440.0), fps=30)
    with pytest.raises(AudioInputError, match="left"):
        mel_frames(tone(440.0), left=-1)


def vowel(f1: float, f2: float, f0: float = 120.0, seconds: float = 1.0) -> np.ndarray:
    """A pulse train through four formant resonators (and a glottal tilt): a synthetic vowel."""
    from scipy.signal import lfilter

    n = int(SR * seconds)
    x = np.zeros(n)
    x[:: int(SR / f0)] = 1.0
    for f, bw in ((f1, 80.0), (f2, 100.0), (2800.0, 150.0), (3500.0, 200.0)):
        r, th = np.exp(-np.pi * bw / SR), 2 * np.pi * f / SR
        x = lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], x)
    x = lfilter([1.0], [1.0, -0.9], x)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.mark.parametrize("f1,f2", [(300, 2300), (320, 800), (500, 1700), (700, 1100), (750, 1250)])
def test_first_formant_of_synthetic_vowels(f1, f2):
    # Close (i, u), mid (e) and open back vowels (a, ɔ: F2 close above F1): within 15 %.
    est = frame_features(vowel(f1, f2)).f1[3:-3]
    assert np.all(np.abs(est - f1) < 0.15 * f1), (f1, est)


def test_first_formant_absent_in_noise_and_silence():
    noise = np.random.default_rng(0).normal(0, 0.1, SR).astype(np.float32)
    assert np.all(frame_features(noise).f1 == 0)
    assert np.all(frame_features(np.zeros(SR, np.float32)).f1 == 0)


def test_first_formant_follows_open_and_close_vowels_in_speech():
    # espeak-ng's "a" (father) has a higher F1 than its "i" (see) and "u" (food).
    f = {w: frame_features(synthesize(w).audio).f1 for w in ("aah", "ee", "oo")}
    med = {w: float(np.median(v[v > 0])) for w, v in f.items()}
    assert med["aah"] > 550 and med["ee"] < 450 and med["oo"] < 450, med
