"""Conversion of any PCM to 16 kHz mono float32, streaming resampling and framing."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from avatar_agent.audio.resample import (AudioFormatError, Framer, StreamResampler, downmix,
                                         to_float, to_pipeline)
from avatar_agent.types import FRAME_SAMPLES, Phoneme


def test_to_float_scales_each_dtype():
    np.testing.assert_array_equal(to_float(np.array([-32768, 0, 16384], np.int16)),
                                  [-1.0, 0.0, 0.5])
    np.testing.assert_array_equal(to_float(np.array([-2**31, 2**30], np.int32)), [-1.0, 0.5])
    np.testing.assert_array_equal(to_float(np.array([0, 128, 192], np.uint8)), [-1.0, 0.0, 0.5])
    assert to_float(np.array([0.25], np.float64)).dtype == np.float32
    with pytest.raises(AudioFormatError, match="int8"):
        to_float(np.array([1], np.int8))


def test_downmix_interleaved_and_2d():
    x = np.array([[1.0, 0.0], [0.5, 0.5]], np.float32)
    np.testing.assert_array_equal(downmix(x, 2), [0.5, 0.5])
    np.testing.assert_array_equal(downmix(x.reshape(-1), 2), [0.5, 0.5])
    with pytest.raises(AudioFormatError, match="3 samples"):
        downmix(np.zeros(3, np.float32), 2)
    with pytest.raises(AudioFormatError, match="does not match 3"):
        downmix(x, 3)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 32000, 44100, 48000, 96000])
@pytest.mark.parametrize("dtype", ["int16", "int32", "float32", "float64", "uint8"])
def test_any_rate_and_dtype_to_16k(rate, dtype):
    t = np.arange(rate) / rate  # 1 s, 2 channels: 500 Hz left, silence right
    left = 0.5 * np.sin(2 * np.pi * 500 * t)
    x = np.stack([left, np.zeros_like(left)], 1)
    if dtype == "int16":
        x = np.round(x * 32767).astype(np.int16)
    elif dtype == "int32":
        x = np.round(x * (2**31 - 1)).astype(np.int32)
    elif dtype == "uint8":
        x = np.round(x * 127 + 128).astype(np.uint8)
    else:
        x = x.astype(dtype)
    y = to_pipeline(x, rate, 2)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size - 16000) <= 1
    ref = 0.25 * np.sin(2 * np.pi * 500 * np.arange(y.size) / 16000)
    tol = 1e-2 if dtype == "uint8" else 2e-3
    assert np.abs(y[400:-400] - ref[400:-400]).max() < tol


def test_streaming_equals_one_shot_and_blocking_does_not_matter():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(44100 * 2) * 0.1).astype(np.float32)
    whole = to_pipeline(x, 44100)
    rs = StreamResampler(44100, 1)
    parts, k = [], 0
    for n in rng.integers(1, 3000, 200):
        parts.append(rs.process(x[k:k + n]))
        k += n
        if k >= x.size:
            break
    parts.append(rs.process(x[k:]))
    parts.append(rs.flush())
    y = np.concatenate(parts)
    assert y.size == whole.size == 32000
    np.testing.assert_allclose(y, whole, atol=1e-5)


def test_nonfinite_scrubbed_counted_logged_once_and_clipped(caplog):
    rs = StreamResampler(16000, 1, name="unit")
    x = np.full(320, 0.1, np.float32)
    x[:3] = [np.nan, np.inf, -np.inf]
    x[10] = 5.0
    with caplog.at_level(logging.WARNING):
        y = rs.process(x)
        y2 = rs.process(np.array([np.nan, 0.0], np.float32))
    assert np.isfinite(y).all() and y[:3].tolist() == [0.0, 0.0, 0.0]
    assert y[10] == 1.0 and rs.clipped == 1
    assert y2.tolist() == [0.0, 0.0]
    assert rs.nonfinite == 4
    assert sum("NaN/inf" in r.message for r in caplog.records) == 1
    # Through soxr a NaN must not smear: it acts as one zero sample, a local dip only.
    rs2 = StreamResampler(48000, 1)
    z = np.concatenate([rs2.process(np.where(np.arange(4800) == 2400, np.nan, 0.1)
                                    .astype(np.float32)), rs2.flush()])
    assert np.isfinite(z).all() and z.size == 1600
    err = np.abs(z - 0.1)
    assert 0.01 < err[790:810].max() < 0.1  # at 2400 / 3 = sample 800
    assert err[100:700].max() < 1e-3 and err[900:1500].max() < 1e-3


def test_bad_rate_and_channels():
    with pytest.raises(AudioFormatError, match="sample rate"):
        StreamResampler(0)
    with pytest.raises(AudioFormatError, match="channel count"):
        StreamResampler(16000, 0)


def test_framer_exact_frames_running_index_and_phonemes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(5000).astype(np.float32)
    fr = Framer(start=640)
    p = Phoneme("a", 0.05, 0.07)  # samples 800..1120 on the timeline
    out = fr.push(x[:100]) + fr.push(x[100:2000], phonemes=[p]) + fr.push(x[2000:])
    assert [f.index for f in out] == [640 + k * FRAME_SAMPLES for k in range(15)]
    assert fr.pending == 5000 - 15 * FRAME_SAMPLES
    np.testing.assert_array_equal(np.concatenate([f.samples for f in out]), x[:4800])
    # Phonemes are attached to the frames they overlap: 800..1120 → frames starting at 640 and
    # 960 (the 640 frame is emitted by the second push, the one that brought the phoneme).
    assert [f.index for f in out if f.phonemes] == [640, 960]
    tail = fr.flush()
    assert len(tail) == 1 and tail[0].index == 640 + 15 * FRAME_SAMPLES
    np.testing.assert_array_equal(tail[0].samples[:200], x[4800:])
    assert not tail[0].samples[200:].any()
    sil = fr.silence(3)
    assert [f.index for f in sil] == [640 + k * FRAME_SAMPLES for k in (16, 17, 18)]
    assert fr.next_index == 640 + 19 * FRAME_SAMPLES and fr.flush() == []
