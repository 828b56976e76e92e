"""Shards: write/read round trip, statistics, normalised segments with the continuity frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avatar_agent.motion import space
from avatar_agent.motion.moda import rescale_ratio, to_model_space
from avatar_agent.train.shards import (
    ShardDataset, ShardError, ShardWriter, UtteranceRecord, compute_stats, iter_records,
    load_index, load_stats, read_shard, split_utterances,
)

torch.set_num_threads(1)
FEATURE = {"kind": "mel", "n_mels": 6, "fps": 25}


def _record(rng: np.random.Generator, t: int, i: int) -> UtteranceRecord:
    motion = rng.normal(0, 0.02, (t, 70)).astype(np.float32)
    motion[:, space.SCALE] = rng.uniform(0.9, 1.1)
    motion[:, space.POSE] = rng.normal(0, 5, (t, 3))
    rest = motion[0].copy()
    rest[space.SCALE] = motion[0, space.SCALE] * rng.uniform(0.95, 1.05)
    return UtteranceRecord(audio=rng.normal(-5, 2, (t, 1, 6)).astype(np.float16), motion=motion,
                           identity=rng.normal(0, 0.3, 63).astype(np.float32), rest=rest,
                           emotion=int(rng.integers(9)), intensity=float(rng.uniform()),
                           meta={"i": i, "text": f"utterance {i} ✓"})


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    recs = [_record(rng, t, i) for i, t in enumerate((30, 12, 25, 9, 40))]
    with ShardWriter(tmp_path, FEATURE, shard_size=2) as w:
        for r in recs:
            w.add(r)
    return tmp_path, recs


def test_round_trip_and_index(dataset):
    d, recs = dataset
    index = load_index(d)
    assert index["utterances"] == 5 and index["frames"] == 30 + 12 + 25 + 9 + 40
    assert [s["utterances"] for s in index["shards"]] == [2, 2, 1]
    assert index["feature"] == FEATURE
    back = list(iter_records(d))
    assert len(back) == 5
    for a, b in zip(recs, back, strict=False):
        np.testing.assert_array_equal(a.audio, b.audio)
        np.testing.assert_array_equal(a.motion, b.motion)
        np.testing.assert_array_equal(a.identity, b.identity)
        np.testing.assert_array_equal(a.rest, b.rest)
        assert (a.emotion, a.meta) == (b.emotion, b.meta)
        assert b.intensity == pytest.approx(a.intensity, abs=1e-6)
    assert len(read_shard(d / index["shards"][2]["file"])) == 1


def test_stats_match_direct_computation(dataset):
    d, recs = dataset
    st = compute_stats(d)
    assert "stats" in json.loads((d / "index.json").read_text())
    mean_scale = np.concatenate([r.motion[:, space.SCALE] for r in recs]).mean()
    ref = np.zeros(70, np.float32)
    ref[space.SCALE] = mean_scale
    scaled = []
    for r in recs:
        m = r.motion.astype(np.float64).copy()
        m[:, 63:67] /= rescale_ratio(float(r.rest[space.SCALE]), ref)
        scaled.append(m)
    allm = np.concatenate(scaled)
    np.testing.assert_allclose(st.motion_std, allm.std(0), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(st.motion_mean[:63], allm.mean(0)[:63], atol=1e-6)
    assert st.motion_mean[space.SCALE] == pytest.approx(mean_scale, rel=1e-6)
    alla = np.concatenate([r.audio.astype(np.float64) for r in recs])
    np.testing.assert_allclose(st.audio_mean, alla.mean(0), rtol=1e-5)
    np.testing.assert_allclose(st.audio_std, alla.std(0), rtol=1e-4)
    np.testing.assert_array_equal(load_stats(d).motion_std, st.motion_std)


def test_segments_shapes_prev_frame_and_normalisation(dataset):
    d, recs = dataset
    st = compute_stats(d)
    ds = ShardDataset(d, seq_len=10)
    assert len(ds) == 4 and ds.skipped == 1 and ds.ids == [0, 1, 2, 4]   # the 9-frame one is too short
    for pos, gid in enumerate(ds.ids):
        r = recs[gid]
        rr = rescale_ratio(float(r.rest[space.SCALE]), st.motion_mean)
        norm = to_model_space(r.motion, st.motion_mean, st.motion_std, rr)
        last = r.frames - 10
        for start in (0, 1, last):
            seg = ds.segment(pos, start)
            assert seg["motion"].shape == (10, 70)
            assert seg["prev"].shape == (1, 70)
            assert seg["audio"].shape == (10, 1, 1, 6)
            assert seg["identity"].shape == (63,)
            np.testing.assert_allclose(seg["motion"].numpy(), norm[start : start + 10], atol=1e-5)
            want_prev = (norm[start - 1] if start > 0
                         else to_model_space(r.rest, st.motion_mean, st.motion_std, rr))
            np.testing.assert_allclose(seg["prev"][0].numpy(), want_prev, atol=1e-5)
            a = (r.audio[start : start + 10].astype(np.float32) - st.audio_mean) / st.audio_std
            np.testing.assert_allclose(seg["audio"][:, 0].numpy(), a, atol=1e-5)
            assert int(seg["emotion"]) == r.emotion
        with pytest.raises(IndexError):
            ds.segment(pos, last + 1)


def test_relative_stats_and_segments_are_motion_minus_rest(dataset):
    d, recs = dataset
    st = compute_stats(d, relative=True)
    assert st.relative and load_stats(d).relative
    rel = np.concatenate([r.motion.astype(np.float64) - r.rest for r in recs])
    np.testing.assert_allclose(st.motion_mean, rel.mean(0), atol=1e-6)
    np.testing.assert_allclose(st.motion_std, rel.std(0), rtol=1e-3, atol=1e-6)
    ds = ShardDataset(d, seq_len=10)
    r = recs[ds.ids[1]]
    seg = ds.segment(1, 0)
    want = (r.motion[:10] - r.rest - st.motion_mean) / (st.motion_std + 1e-5)
    np.testing.assert_allclose(seg["motion"].numpy(), want, atol=1e-4)
    # At an utterance start prev is the rest pose itself: zero offset.
    np.testing.assert_allclose(seg["prev"][0].numpy(), -st.motion_mean / (st.motion_std + 1e-5), atol=1e-4)


def test_prev_frame_continuity_inside_an_utterance(dataset):
    d, _ = dataset
    compute_stats(d)
    ds = ShardDataset(d, seq_len=8)
    a, b = ds.segment(0, 5), ds.segment(0, 6)
    # The continuity frame of the segment starting at 6 is frame 5 = the first frame at start 5.
    torch.testing.assert_close(b["prev"][0], a["motion"][0])


def test_random_batch_is_reproducible_and_covers_utterances(dataset):
    d, _ = dataset
    compute_stats(d)
    ds = ShardDataset(d, seq_len=10)
    b1 = ds.random_batch(np.random.default_rng(5), 64)
    b2 = ds.random_batch(np.random.default_rng(5), 64)
    for k in b1:
        torch.testing.assert_close(b1[k], b2[k])
    assert b1["motion"].shape == (64, 10, 70) and b1["audio"].shape == (64, 10, 1, 1, 6)
    assert set(b1["utterance"].tolist()) == set(ds.ids)
    assert int(b1["start"].min()) >= 0
    b3 = ds.random_batch(np.random.default_rng(6), 64)
    assert not torch.equal(b1["motion"], b3["motion"])


def test_subset_and_errors(dataset, tmp_path_factory):
    d, _ = dataset
    with pytest.raises(ShardError, match="statistics"):
        ShardDataset(d, seq_len=10)
    compute_stats(d)
    ds = ShardDataset(d, seq_len=10, utterances=[2, 4])
    assert ds.ids == [2, 4]
    with pytest.raises(ShardError, match="min_frames"):
        ShardDataset(d, seq_len=100)
    with pytest.raises(ShardError, match="exists"):
        ShardWriter(d, FEATURE)
    with pytest.raises(ShardError, match="data-prep"):
        load_index(tmp_path_factory.mktemp("empty"))
    rng = np.random.default_rng(1)
    bad = _record(rng, 5, 0)
    with pytest.raises(ShardError, match="motion"):
        UtteranceRecord(bad.audio, bad.motion[:4], bad.identity, bad.rest, 0)
    with pytest.raises(ShardError, match="emotion"):
        UtteranceRecord(bad.audio, bad.motion, bad.identity, bad.rest, 9)


def test_split_is_deterministic_and_disjoint():
    tr, va = split_utterances(100, 0.1, seed=3)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    assert split_utterances(100, 0.1, seed=3) == (tr, va)
    assert split_utterances(100, 0.1, seed=4)[1] != va
