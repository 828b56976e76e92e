"""Official audio features: HuBERT-base with the release's preprocessing (recipe weights)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from avatar_agent.nn.hubert import (
    HOP, HubertFeatures, build_hubert, normalise_waveform, preemphasis, release_driving_audio,
    requantize_pcm16, streaming_features,
)
from tests.reference.recipe import load_manifest, recipe_state_dict

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "moda"


def assert_conform(y: np.ndarray, ref: np.ndarray, atol: float, rtol: float = 1e-4) -> None:
    assert y.shape == ref.shape
    err = np.abs(y - ref) - (atol + rtol * np.abs(ref))
    assert err.max() <= 0, f"max excess {err.max():.3g}, max |diff| {np.abs(y - ref).max():.3g}"


@pytest.fixture(scope="module")
def extractor() -> HubertFeatures:
    torch.set_num_threads(1)
    model = build_hubert()
    model.load_state_dict(recipe_state_dict(load_manifest(FIX / "hubert_state_dict_manifest.json")),
                          strict=True)
    return HubertFeatures(model)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """About 3 s of espeak-ng speech at 16 kHz."""
    wav = tmp_path_factory.mktemp("tts") / "s.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "Hello there, the quick brown fox jumps over the lazy dog."],
                   check=True, capture_output=True)
    x, sr = sf.read(wav, dtype="float32")
    return soxr.resample(x, sr, 16000).astype(np.float32)


def test_features_match_official(extractor: HubertFeatures) -> None:
    ref = np.load(FIX / "hubert_audio.npz")
    assert_conform(extractor.input_values(ref["waveform"]), ref["input_values"], 1e-5)
    feats = extractor(ref["waveform"]).numpy()
    assert feats.shape == (40, 12, 768)
    assert_conform(feats, ref["audio_emb"], 2e-4)


def test_streaming_deviation_is_measured_and_exact_with_full_context(extractor: HubertFeatures,
                                                                     speech: np.ndarray) -> None:
    n = speech.size // HOP
    speech = speech[: n * HOP]          # whole frames: the normalisation then sees the same samples
    offline = extractor(speech)
    assert offline.shape == (n, 12, 768)
    # A window covering the whole signal reproduces the offline numbers exactly.
    full = streaming_features(extractor, speech, hop_frames=25, left_frames=n, lookahead_frames=n)
    torch.testing.assert_close(full, offline, atol=1e-6, rtol=0)

    def rel_dev(left: int, ahead: int) -> float:
        s = streaming_features(extractor, speech, hop_frames=25, left_frames=left, lookahead_frames=ahead)
        assert s.shape == offline.shape
        return float((s - offline).pow(2).mean().sqrt() / offline.pow(2).mean().sqrt())

    short, long = rel_dev(0, 0), rel_dev(50, 5)
    print(f"streaming relative RMS deviation: no context {short:.3f}, 2 s left + 200 ms ahead {long:.3f}")
    assert 0 < long < short


def test_preemphasis_matches_librosa_definition() -> None:
    x = np.array([0.5, 0.25, -0.5, 1.0], np.float32)
    y = preemphasis(x)
    # librosa: initial state 2·x0 − x1, so y0 = x0 + (2·x0 − x1).
    np.testing.assert_allclose(y, [0.5 + 0.75, 0.25 - 0.97 * 0.5, -0.5 - 0.97 * 0.25, 1.0 + 0.97 * 0.5],
                               rtol=1e-6)
    with pytest.raises(ValueError):
        preemphasis(np.zeros(1, np.float32))


def test_release_driving_audio_appends_quantised_silence() -> None:
    x = (0.3 * np.sin(np.arange(16000) / 7.0)).astype(np.float32)
    y, frames = release_driving_audio(x)
    assert frames == 50 and y.size == 16000 + 32000
    assert np.all(y[16000:] == 0)
    np.testing.assert_allclose(y[:16000], preemphasis(x), atol=1 / 32768 + 1e-7)
    assert np.all(np.round(y * 32768) == y * 32768)                              # on the 16-bit grid
    q = requantize_pcm16(np.array([0.5, -1.0], np.float32))
    assert q[1] == -1.0


def test_normalisation_and_short_audio(extractor: HubertFeatures) -> None:
    z = normalise_waveform(np.arange(1000, dtype=np.float32))
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    with pytest.raises(ValueError, match="shorter than one video frame"):
        extractor(np.zeros(HOP - 1, np.float32))
    with pytest.raises(ValueError, match="mono"):
        extractor(np.zeros((2, 16000), np.float32))
