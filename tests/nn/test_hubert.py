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


# --------------------------------------------------------------------------------------------
# Live streaming with remembered context (StreamingHubert)
# --------------------------------------------------------------------------------------------

def hops(n: int, hop: int, left: int, ahead: int) -> list[tuple[int, int, int]]:
    """(first frame of the chunk's audio, first new frame, end frame) of live chunks."""
    return [(max(0, f - left), f, min(n, f + hop + ahead)) for f in range(0, n, hop)]


def test_streaming_hubert_with_whole_context_equals_offline(extractor: HubertFeatures,
                                                            speech: np.ndarray) -> None:
    from avatar_agent.nn.hubert import StreamingHubert

    n = speech.size // HOP
    speech = speech[: n * HOP]
    offline = extractor(speech)
    live = StreamingHubert(extractor, left_frames=n)
    rows = []
    # chunks with 2 frames of their own left context and lookahead to the end: with the remembered
    # audio in front, each hop's input is the whole signal
    for a0, f, a1 in hops(n, 25, left=2, ahead=n):
        feats = live.at(speech[a0 * HOP : a1 * HOP], a0 * HOP)
        assert feats.shape[0] == a1 - a0                             # rows of the given audio only
        rows.append(feats[f - a0 : f - a0 + 25])
    torch.testing.assert_close(torch.cat(rows), offline, atol=1e-5, rtol=0)


def test_streaming_hubert_bounded_context_and_gaps(extractor: HubertFeatures, speech: np.ndarray) -> None:
    from avatar_agent.nn.hubert import StreamingHubert

    n = speech.size // HOP
    speech = speech[: n * HOP]
    offline = extractor(speech)

    def run(left_frames: int) -> tuple[float, list[int]]:
        live, rows, sizes = StreamingHubert(extractor, left_frames=left_frames), [], []
        for a0, f, a1 in hops(n, 10, left=2, ahead=1):
            before = live.encoded_samples
            feats = live.at(speech[a0 * HOP : a1 * HOP], a0 * HOP)
            sizes.append((live.encoded_samples - before) // HOP)
            rows.append(feats[f - a0 : f - a0 + 10])
        s = torch.cat(rows)
        return float((s - offline).pow(2).mean().sqrt() / offline.pow(2).mean().sqrt()), sizes

    short, no_ctx = run(0)
    long, ctx = run(50)
    print(f"live HuBERT relative RMS deviation: chunk only {short:.3f}, +2 s remembered {long:.3f}")
    assert long < short
    chunk = 2 + 10 + 1                                               # own left + new + lookahead
    assert max(no_ctx) == chunk and max(ctx) == 50 + chunk           # bounded work per hop
    assert ctx[0] == 10 + 1 and ctx[1] == 8 + chunk                  # remembered audio grows ...
    assert ctx[-2] == 50 + chunk                                     # ... to its bound
    # a gap (or a jump back) means no remembered context
    live = StreamingHubert(extractor, left_frames=50)
    live.at(speech[: 20 * HOP], 0)
    before = live.encoded_samples
    live.at(speech[40 * HOP : 50 * HOP], 40 * HOP)
    assert live.encoded_samples - before == 10 * HOP
    live.reset()
    before = live.encoded_samples
    live.at(speech[50 * HOP : 60 * HOP], 50 * HOP)
    assert live.encoded_samples - before == 10 * HOP
    # remembered without encoding: the next hop gets it as context, at most left_frames of it
    live.remember(speech[: 70 * HOP], 0)
    before = live.encoded_samples
    live.at(speech[70 * HOP : 75 * HOP], 70 * HOP)
    assert live.encoded_samples - before == (50 + 5) * HOP
    with pytest.raises(ValueError, match="left_frames"):
        StreamingHubert(extractor, left_frames=-1)


def test_moda_motion_streams_features_per_session() -> None:
    """MoDAMotion tells streaming features where each chunk sits; sessions forked from one
    generator keep their own remembered audio."""
    from avatar_agent.motion.moda import MoDAMotion
    from avatar_agent.nn.hubert import StreamingHubert, hubert_config
    from avatar_agent.nn.moda import MoDADiT, MoDAParams
    from avatar_agent.types import Avatar, SpeechChunk

    torch.manual_seed(0)
    hub = HubertFeatures(build_hubert(hubert_config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)))
    params = MoDAParams(hidden=32, heads=2, audio_dim=16, audio_blocks=1, n_four=1, n_two=1,
                        n_single=1, seq_len=16)
    gen = MoDAMotion(MoDADiT(params).eval(), StreamingHubert(hub, left_frames=20),
                     np.zeros(70, np.float32), np.ones(70, np.float32), steps=2)
    avatar = Avatar("official", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8),
                    np.eye(3), np.zeros((21, 3), np.float32), np.full(70, 0.1, np.float32))
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(40 * HOP)).astype(np.float32)

    def chunk(f: int, left: int = 4, hop: int = 4) -> SpeechChunk:
        a0 = max(0, f - left)
        return SpeechChunk(audio=audio[a0 * HOP : (f + hop) * HOP], start=f * HOP,
                           n_new=hop * HOP, left=(f - a0) * HOP, right=0, speech=True)

    sessions = [gen.fork(1), gen.fork(2)]
    for s in sessions:
        s.prepare(avatar)
    feats = [s.features for s in sessions]
    assert feats[0] is not feats[1] and all(isinstance(f, StreamingHubert) for f in feats)
    prev = avatar.rest_motion
    for f in range(0, 16, 4):
        before = feats[0].encoded_samples
        out = sessions[0].generate(chunk(f), prev)
        assert out.shape == (4, 70) and np.isfinite(out).all()
        # chunk (≤ 4 frames of its own context + 4 new) + remembered audio up to 20 frames back
        assert (feats[0].encoded_samples - before) // HOP == f + 4
        prev = out[-1]
    assert feats[1].encoded_samples == 0                              # the other session: untouched
    sessions[0].reset()                                               # an interruption forgets
    before = feats[0].encoded_samples
    sessions[0].generate(chunk(16), prev)
    assert (feats[0].encoded_samples - before) // HOP == 8
