"""Synthetic corpus: real espeak-ng speech + the procedural teacher; determinism and sanity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar_agent.audio.features import mel_frames
from avatar_agent.motion.moda_load import feature_fn
from avatar_agent.motion.space import lip_opening
from avatar_agent.train.corpus import (
    AugmentParams, CorpusParams, MotionExtractorRequired, augment, build_corpus,
    build_corpus_from_texts, colored_noise, make_utterance, prep_video, read_sentences,
    sentence,
)
from avatar_agent.train.shards import iter_records, load_index, load_stats

torch.set_num_threads(1)


def _records(d):
    return list(iter_records(d))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    build_corpus(d, 4, seed=7, shard_size=3, block=2)      # 2 blocks, one fresh process each
    return d


def test_corpus_layout(corpus):
    index = load_index(corpus)
    assert index["utterances"] == 4 and len(index["shards"]) == 2
    assert index["feature"] == {"kind": "mel", "n_mels": 80, "fps": 25}
    for r in _records(corpus):
        assert r.frames >= 80                                 # min_frames padding
        assert r.audio.shape == (r.frames, 1, 80) and r.audio.dtype == np.float16
        assert 0 <= r.emotion <= 8 and 0.0 < r.intensity <= 1.0
        assert r.meta["text"] and r.meta["voice"]
    st = load_stats(corpus)
    assert st.motion_mean.shape == (70,) and st.audio_mean.shape == (1, 80)
    assert st.motion_std[67:70].min() > 0.1                   # head pose varies (degrees)


def test_corpus_is_deterministic_for_a_seed_whatever_the_workers(corpus, tmp_path):
    # Same seed and blocks, but 2 worker processes running the blocks in parallel.
    build_corpus(tmp_path / "again", 4, seed=7, shard_size=2, block=2, workers=2)
    build_corpus(tmp_path / "other", 4, seed=8)
    a, b, c = _records(corpus), _records(tmp_path / "again"), _records(tmp_path / "other")
    for x, y in zip(a, b, strict=False):
        np.testing.assert_array_equal(x.audio, y.audio)
        np.testing.assert_array_equal(x.motion, y.motion)
        np.testing.assert_array_equal(x.identity, y.identity)
        assert x.meta == y.meta and x.emotion == y.emotion
    assert [x.meta["text"] for x in a] != [x.meta["text"] for x in c]


def test_teacher_motion_follows_the_audio_energy():
    # Clean audio: lip opening vs log energy of the mel features the student sees.
    p = CorpusParams(augment=None)
    for i in range(2):
        r = make_utterance(11, i, p)
        opening = lip_opening(r.motion, r.identity.reshape(21, 3))
        log_energy = np.log(np.exp(r.audio[:, 0].astype(np.float64)).sum(1))
        assert np.corrcoef(opening, log_energy)[0, 1] > 0.4
        lead = int(r.meta["lead_s"] * 25)
        if lead >= 2:
            assert np.abs(opening[: lead - 1]).max() < 0.01   # leading silence: mouth closed
        assert opening.max() > 0.03                           # speech opens the mouth


def test_identity_and_emotion_vary_across_utterances(corpus):
    recs = _records(corpus) + [make_utterance(7, i) for i in range(4, 10)]
    ids = np.stack([r.identity for r in recs])
    assert ids.std(0).mean() > 0.005
    assert len({r.emotion for r in recs}) >= 3
    assert len({(r.meta["voice"], r.meta["variant"]) for r in recs}) >= 4


def test_sentences_are_varied_and_deterministic():
    a = [sentence(np.random.default_rng([1, i])) for i in range(60)]
    b = [sentence(np.random.default_rng([1, i])) for i in range(60)]
    assert a == b
    assert len(set(a)) >= 55
    assert all(s[-1] in ".?!" for s in a)


def test_augmentation_snr_and_length():
    rng = np.random.default_rng(0)
    clean = (0.3 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    p = AugmentParams(p_noise=1.0, snr_db=(10.0, 10.0), p_reverb=0.0, gain_db=(0.0, 0.0))
    noisy, info = augment(clean, rng, p)
    assert noisy.shape == clean.shape and info["snr_db"] == 10.0
    snr = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((noisy - clean) ** 2.0))
    assert snr == pytest.approx(10.0, abs=0.5)
    rev, info = augment(clean, rng, AugmentParams(p_noise=0.0, p_reverb=1.0, gain_db=(0.0, 0.0)))
    assert "rt60" in info and not np.allclose(rev, clean)
    for color in ("white", "pink", "brown"):
        n = colored_noise(rng, 4096, color)
        assert np.sqrt(np.mean(n ** 2)) == pytest.approx(1.0, rel=1e-3)
    # Pink/brown noise put more power at low frequencies than white noise.
    low = [np.abs(np.fft.rfft(colored_noise(rng, 8192, c)))[1:50].mean() for c in ("white", "brown")]
    assert low[1] > 3 * low[0]


def test_feature_fn_standardises_with_the_corpus_stats(corpus):
    st = load_stats(corpus)
    f = feature_fn(load_index(corpus)["feature"], st.audio_mean, st.audio_std)
    audio = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    want = (mel_frames(audio)[:, None] - st.audio_mean) / st.audio_std
    np.testing.assert_allclose(f(audio), want, rtol=1e-5, atol=1e-5)
    assert f(audio).shape == (25, 1, 80)


def test_text_file_corpus(tmp_path):
    txt = tmp_path / "lines.txt"
    txt.write_text("# comment\nHello there, how are you?\n\nThe weather is fine today.\n")
    lines = read_sentences(txt)
    assert lines == ["Hello there, how are you?", "The weather is fine today."]
    build_corpus_from_texts(tmp_path / "c", lines, seed=1, repeats=2)
    recs = _records(tmp_path / "c")
    assert [r.meta["text"] for r in recs] == lines * 2
    assert recs[0].meta["voice"] != recs[2].meta["voice"] or recs[0].meta["rate_wpm"] != recs[2].meta["rate_wpm"]


def test_video_input_needs_a_motion_extractor(tmp_path):
    with pytest.raises(MotionExtractorRequired, match="motion extractor"):
        prep_video(tmp_path / "talk.mp4", tmp_path / "out")
    with pytest.raises(Exception, match="not found"):
        read_sentences(tmp_path / "missing.txt")
