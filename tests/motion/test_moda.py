"""MoDA generation: the release's long-audio path (conformance) and the streaming generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_agent.motion import moda as mm
from avatar_agent.nn.moda import RELEASE_PREFIX, MoDADiT, MoDAParams, build_dit
from avatar_agent.nn.sampling import Guidance
from avatar_agent.types import Avatar, MotionGenerator, SpeechChunk
from tests.reference import moda_release as ref
from tests.reference.recipe import load_manifest, recipe_state_dict

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "moda"


def assert_conform(y: np.ndarray, ref: np.ndarray, atol: float, rtol: float = 1e-4) -> None:
    y = np.asarray(y)
    assert y.shape == ref.shape
    err = np.abs(y - ref) - (atol + rtol * np.abs(ref))
    assert err.max() <= 0, f"max excess {err.max():.3g}, max |diff| {np.abs(y - ref).max():.3g}"


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    return dict(np.load(FIX / "pipeline_long.npz"))


@pytest.fixture(scope="module")
def stats(fx: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """mean.pt is not shipped: recover mean and std + 1e-5 per dim by a 2-parameter least-squares fit
    of the fixture's denormalised output against its normalised input (100 frames).  prev_motion and
    rescale_ratio, computed from the source info, are then independent checks."""
    n = fx["motion_lip_trimmed"].astype(np.float64)
    rr = float(fx["rescale_ratio"][0, 0])
    raw = np.concatenate([fx["kp_exp"], fx["kp_scale"].reshape(-1, 1) / rr, fx["kp_t"].reshape(-1, 3) / rr,
                          fx["kp_pitch"], fx["kp_yaw"], fx["kp_roll"]], 1).astype(np.float64)
    mean, std = np.zeros(70), np.zeros(70)
    for d in range(70):
        (a, b), *_ = np.linalg.lstsq(np.stack([n[:, d], np.ones(len(n))], 1), raw[:, d], rcond=None)
        mean[d], std[d] = b, max(a - 1e-5, 0.0)
    # The release's mean.pt values come out of the fit.
    assert abs(mean[63] - 1.28646) < 1e-5 and abs(std[63] - 0.069130) < 1e-5
    assert abs(std[68] - 23.855) < 1e-3 and abs(std[66]) < 1e-9
    return mean.astype(np.float32), std.astype(np.float32)


def test_prev_motion_from_source(fx: dict[str, np.ndarray], stats: tuple[np.ndarray, np.ndarray]) -> None:
    mean, std = stats
    pose = [float(ref.headpose_degrees(fx[f"xs_{k}"])[0]) for k in ("pitch", "yaw", "roll")]
    src = ref.source_motion(fx["xs_exp"], fx["xs_scale"][0, 0], fx["xs_t"], *pose)
    rr = mm.rescale_ratio(src[63], mean)
    assert_conform(np.float32(rr), fx["rescale_ratio"][0, 0], 5e-4)
    assert_conform(mm.to_model_space(src, mean, std, rr), fx["prev_motion"][0, 0], 5e-4)
    assert np.allclose(mm.from_model_space(mm.to_model_space(src, mean, std, rr), mean, std, rr), src,
                       atol=1e-5)


def test_headpose_bins() -> None:
    logits = np.full(66, -1e4, np.float32)
    logits[40] = 0
    assert ref.headpose_degrees(logits) == pytest.approx(40 * 3 - 97.5)
    assert ref.headpose_degrees(np.zeros(66)) == pytest.approx(0.0, abs=1e-4)     # uniform → centre


def test_segment_plan() -> None:
    assert ref.segment_plan(150) == (3, 58)
    assert ref.segment_plan(80) == (1, 0) and ref.segment_plan(1) == (1, 79)
    assert ref.segment_plan(144) == (2, 0) and ref.segment_plan(145) == (3, 63)
    with pytest.raises(ValueError):
        ref.segment_plan(0)


def test_long_pipeline_stitching_and_postprocessing(fx: dict[str, np.ndarray],
                                                    stats: tuple[np.ndarray, np.ndarray]) -> None:
    """Chunk/stitch/smooth/lip/denorm with the official per-segment sampler outputs fed in (the
    sampler itself is proven against the release in test_segment_sampling_matches_official and
    tests/nn/test_sampling.py)."""
    mean, std = stats
    raws = torch.from_numpy(fx["segment_raw"])
    inp = np.load(FIX / "inputs.npz")
    long_audio = torch.from_numpy(np.concatenate([inp["audio"][0, :, 0], inp["audio"][1, :, 0]])[:150])
    audio_seen: list[torch.Tensor] = []

    def official_segment(i: int, prev: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        audio_seen.append(audio)
        return raws[i : i + 1].clone()

    trace: dict[str, list[torch.Tensor]] = {}
    out = ref.generate_long(long_audio[:, None], torch.from_numpy(fx["prev_motion"]), official_segment,
                           trace=trace)
    assert_conform(torch.cat(trace["prev"]).numpy(), fx["segment_prev_motion"], 5e-4)
    assert_conform(out.numpy(), fx["motion"], 5e-4)
    # Segment 2 covers frames 128..207: 22 real frames then 58 zero frames.
    assert torch.equal(audio_seen[2][0, :22, 0], long_audio[128:150]) and not audio_seen[2][0, 22:].any()
    lip = ref.modulate_lip(fx["motion"], fx["motion"][-37])[:-50]
    assert_conform(lip, fx["motion_lip_trimmed"], 5e-4)
    raw = ref.release_postprocess(fx["motion"], 50, mean, std, float(fx["rescale_ratio"][0, 0]))
    assert_conform(raw[:, :63], fx["kp_exp"], 2e-5)
    assert_conform(raw[:, 63], fx["kp_scale"].ravel(), 1e-4)
    assert_conform(raw[:, 64:67], fx["kp_t"].reshape(-1, 3), 1e-4)
    for i, k in enumerate(("kp_pitch", "kp_yaw", "kp_roll")):
        assert_conform(raw[:, 67 + i], fx[k].ravel(), 1e-2)


@pytest.mark.slow
def test_segment_sampling_matches_official(fx: dict[str, np.ndarray]) -> None:
    """The zero-padded last segment, sampled by the release DiT (recipe weights) from its noise."""
    torch.set_num_threads(1)
    model = build_dit("release", device="meta").to_empty(device="cpu")
    sd = recipe_state_dict(load_manifest(FIX / "dit_state_dict_manifest.json"))
    model.load_state_dict({k[len(RELEASE_PREFIX):]: v for k, v in sd.items()}, strict=True)
    inp = np.load(FIX / "inputs.npz")
    long_audio = torch.from_numpy(np.concatenate([inp["audio"][0, :, 0], inp["audio"][1, :, 0]])[:150])
    seg_audio = torch.cat([long_audio[128:], torch.zeros(58, 12, 768)])[None, :, None]
    sampler = ref.make_segment_sampler(model.eval(), torch.from_numpy(fx["ref_kp"]), 8,
                                      torch.from_numpy(inp["null_audio_feat"]), Guidance.release(1.2),
                                      noise=lambda i: torch.from_numpy(fx["segment_noise"][i]))
    x = sampler(2, torch.from_numpy(fx["segment_prev_motion"][2:3]), seg_audio)
    assert_conform(x[0].numpy(), fx["segment_raw"][2], 5e-4)


# --------------------------------------------------------------------------------------------
# Streaming generator (tiny preset, deterministic stand-in features)
# --------------------------------------------------------------------------------------------

TINY = MoDAParams(hidden=32, heads=2, audio_dim=16, audio_blocks=1, n_four=1, n_two=1, n_single=1,
                  seq_len=16)


def band_energy(audio: np.ndarray) -> np.ndarray:
    """A stand-in feature extractor: per 40 ms frame, log energy of 16 sample-strided bands."""
    n = audio.size // 640
    frames = audio[: n * 640].reshape(n, 16, 40)
    return np.log(1e-6 + (frames ** 2).mean(-1))[:, None, :].astype(np.float32)  # [T, 1, 16]


def make_gen(**kw) -> mm.MoDAMotion:  # noqa: ANN003
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mean = np.zeros(70, np.float32)
    mean[63] = 1.3
    std = np.full(70, 0.05, np.float32)
    return mm.MoDAMotion(MoDADiT(TINY), band_energy, mean, std, profile="embedded", steps=3, **kw)


def avatar() -> Avatar:
    rest = np.zeros(70, np.float32)
    rest[63] = 1.3
    return Avatar(profile="embedded", image=np.zeros((8, 8, 3), np.uint8), crop=np.zeros((8, 8, 3), np.uint8),
                  crop_to_image=np.eye(3), kp_canonical=np.linspace(-1, 1, 63).reshape(21, 3).astype(np.float32),
                  rest_motion=rest)


def chunk(n_frames: int, left: int = 640 * 4, right: int = 640 * 2, seed: int = 0) -> SpeechChunk:
    rng = np.random.default_rng(seed)
    audio = (0.1 * rng.standard_normal(left + 640 * n_frames + right)).astype(np.float32)
    return SpeechChunk(audio=audio, start=0, n_new=640 * n_frames, left=left, right=right, speech=True)


def test_streaming_generator_contract() -> None:
    gen = make_gen(window=8, hop=6)
    with pytest.raises(RuntimeError, match="prepare"):
        gen.generate(chunk(4), np.zeros(70, np.float32))
    gen.prepare(avatar())
    assert isinstance(gen, MotionGenerator)            # rest_pose exists once prepared
    prev = avatar().rest_motion
    out = gen.generate(chunk(20), prev)                                          # 4 windows: 6+6+6+2
    assert out.shape == (20, 70) and out.dtype == np.float32 and np.isfinite(out).all()
    # Same seed → same motion; prev and emotion condition the result.
    again = make_gen(window=8, hop=6)
    again.prepare(avatar())
    assert np.array_equal(again.generate(chunk(20), prev), out)
    other_prev = prev.copy()
    other_prev[67] = 20.0
    g2 = make_gen(window=8, hop=6)
    g2.prepare(avatar())
    assert np.abs(g2.generate(chunk(20), other_prev) - out).max() > 1e-4
    g3 = make_gen(window=8, hop=6)
    g3.prepare(avatar())
    assert np.abs(g3.generate(chunk(20), prev, emotion=4) - out).max() > 1e-4
    # A left context that is not a whole frame: the partial frame is dropped, so the new audio
    # stays frame-aligned and the result equals the chunk without those samples.
    c = chunk(6, left=640 * 4 + 320)
    trimmed = SpeechChunk(audio=c.audio[320:], start=0, n_new=c.n_new, left=640 * 4, right=c.right, speech=True)
    ga, gb = make_gen(window=8, hop=6), make_gen(window=8, hop=6)
    ga.prepare(avatar()), gb.prepare(avatar())
    assert np.array_equal(ga.generate(c, prev), gb.generate(trimmed, prev))
    short = mm.MoDAMotion(MoDADiT(TINY), lambda a: band_energy(a)[:2], np.zeros(70, np.float32),
                          np.ones(70, np.float32), profile="embedded")
    short.prepare(avatar())
    with pytest.raises(ValueError, match="one frame per 640 samples"):
        short.generate(chunk(6), prev)


def test_streaming_intensity_and_errors() -> None:
    gen = make_gen()
    gen.prepare(avatar())
    still = gen.generate(chunk(5), avatar().rest_motion, intensity=0.0)
    assert np.array_equal(still[:, :63], np.zeros((5, 63), np.float32))          # rest expression
    with pytest.raises(ValueError, match="emotion label"):
        gen.generate(chunk(5), avatar().rest_motion, emotion=9)
    with pytest.raises(ValueError, match="less than one frame"):
        gen.generate(SpeechChunk(audio=np.zeros(100, np.float32), start=0, n_new=100, left=0, right=0,
                                 speech=True), avatar().rest_motion)
    official = Avatar(profile="official", image=avatar().image, crop=avatar().crop, crop_to_image=np.eye(3),
                      kp_canonical=avatar().kp_canonical, rest_motion=avatar().rest_motion)
    with pytest.raises(ValueError, match="profile"):
        gen.prepare(official)


def test_bare_generator_idle_holds_prev() -> None:
    """Living silence comes from motion.compose.SpeechAndIdle (tests/motion/test_compose.py)."""
    prev = np.arange(70, dtype=np.float32)
    assert np.array_equal(make_gen().idle(2, prev, 0.0), np.stack([prev, prev]))


def test_offline_release_path_shapes_and_rescale() -> None:
    """The release CLI path end to end on a tiny model: 1 s of audio → 25 raw frames."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mean = np.zeros(70, np.float32)
    mean[63] = 1.25
    std = np.full(70, 0.05, np.float32)
    off = ref.OfflineMoDA(MoDADiT(TINY), band_energy, mean, std, torch.zeros(1, 1, 1, 1, 16), steps=2)
    audio = (0.1 * np.sin(np.arange(16000) / 9.0)).astype(np.float32)
    src = np.zeros(70, np.float32)
    src[63], src[66] = 2.5, 0.7                                                  # 2× the mean scale
    out = off.generate(audio, src, np.zeros(63, np.float32), generator=torch.Generator().manual_seed(0))
    assert out.shape == (25, 70) and np.isfinite(out).all()
    # Generated scale is in the source's units: around rr·mean = 2·1.25.
    assert np.all(np.abs(out[:, 63] - 2.5) < 2.5 * 0.05 * 6)
    with pytest.raises(ValueError, match="shorter than one video frame"):
        off.generate(audio[:100], src, np.zeros(63, np.float32))


def stream_chunk(audio: np.ndarray, f0: int, k: int, left: int = 4, right: int = 1) -> SpeechChunk:
    """Frames f0..f0+k of a long clip as the live chunker cuts them (left context + lookahead)."""
    lo = max(0, f0 - left)
    a = audio[lo * 640 : (f0 + k + right) * 640]
    return SpeechChunk(audio=a, start=f0 * 640, n_new=k * 640, left=(f0 - lo) * 640,
                       right=min(right * 640, a.size - (f0 - lo + k) * 640), speech=True)


def test_window_seams_crossfade_from_the_previous_windows_look_ahead() -> None:
    rng = np.random.default_rng(3)
    audio = (0.1 * rng.standard_normal(640 * 30)).astype(np.float32)
    plain, faded = make_gen(window=16, hop=12), make_gen(window=16, hop=12, crossfade=4)
    plain.prepare(avatar()), faded.prepare(avatar())
    prev = avatar().rest_motion
    a1, b1 = plain.generate(stream_chunk(audio, 4, 4), prev), faded.generate(stream_chunk(audio, 4, 4), prev)
    assert np.array_equal(a1, b1)                                                # no seam yet
    # What the first window predicted past its 4 emitted frames; 1 of them had real audio.
    ahead = mm.from_model_space(faded._ahead.numpy(), plain.mean, plain.std, plain.rr)
    assert faded._ahead_at == 8 and faded._ahead_real == 1
    # Same noise and same prev → the second windows are equal before blending.
    a2, b2 = plain.generate(stream_chunk(audio, 8, 4), a1[-1]), faded.generate(stream_chunk(audio, 8, 4), b1[-1])
    w = np.arange(1, 5, dtype=np.float32)[:, None] / 5
    pose = slice(63, 70)
    np.testing.assert_allclose(b2[:, pose], (1 - w) * ahead[:4, pose] + w * a2[:, pose], atol=1e-4)
    # Expression blends only over the look-ahead frame that had real audio.
    np.testing.assert_allclose(b2[0, :63], 0.8 * ahead[0, :63] + 0.2 * a2[0, :63], atol=1e-4)
    np.testing.assert_array_equal(b2[1:, :63], a2[1:, :63])
    # The seam is smoother than without the crossfade: the velocity change at the join shrinks.
    def seam_jerk(m1: np.ndarray, m2: np.ndarray) -> float:
        seq = np.concatenate([m1, m2])[:, pose]
        return float(np.abs(np.diff(seq, 2, axis=0)[2:5]).mean())
    assert seam_jerk(b1, b2) < seam_jerk(a1, a2)
    # A chunk that does not continue the last one (idle frames in between): no blending.
    gap_p, gap_f = plain.generate(stream_chunk(audio, 16, 4), prev), faded.generate(stream_chunk(audio, 16, 4), prev)
    assert np.array_equal(gap_p, gap_f)


def test_traced_dit_in_the_streaming_generator_gives_the_same_motion() -> None:
    from avatar_agent.nn.moda import TracedDiT

    eager = make_gen(window=16, hop=12)
    traced = make_gen(window=16, hop=12)
    traced.model = TracedDiT(traced.model)
    eager.prepare(avatar()), traced.prepare(avatar())
    assert traced.model.traced                                  # prepare() traced the window shape
    c = chunk(20)
    np.testing.assert_allclose(traced.generate(c, avatar().rest_motion),
                               eager.generate(c, avatar().rest_motion), atol=1e-4)
    assert traced.model.failed is None and len(traced.model._traces) == 1      # one window shape


def test_frame_local_features_skip_unneeded_left_context() -> None:
    """band_energy is frame-local: with feature_context=1 the motion equals the full-context one."""
    full, lean = make_gen(window=16, hop=12), make_gen(window=16, hop=12, feature_context=1)
    full.prepare(avatar()), lean.prepare(avatar())
    seen: list[int] = []
    inner = lean.features
    lean.features = lambda a: (seen.append(a.size), inner(a))[1]
    c = chunk(6, left=640 * 10 + 100, right=640)
    np.testing.assert_array_equal(lean.generate(c, avatar().rest_motion), full.generate(c, avatar().rest_motion))
    assert seen == [640 * (1 + 6 + 1)]                                           # 1 context frame


def test_relative_model_moves_around_the_given_rest_pose_with_a_fixed_identity() -> None:
    """Relative (embedded tiny) models: the same audio and seed give the same offsets from the
    rest pose for two very different portraits; the portrait's keypoints are not fed."""
    fixed = np.linspace(-0.5, 0.5, 63).astype(np.float32)
    a, b = make_gen(relative=True, identity=fixed), make_gen(relative=True, identity=fixed)
    av_a = avatar()
    rest_b = av_a.rest_motion.copy()
    rest_b[:63] += 0.2                                                           # a wide smile
    rest_b[64:67] = (0.1, 0.16, 0.0)
    rest_b[67:70] = (5.0, -10.0, 3.0)
    av_b = Avatar(profile="embedded", image=av_a.image, crop=av_a.crop, crop_to_image=np.eye(3),
                  kp_canonical=av_a.kp_canonical[::-1].copy() * 3, rest_motion=av_a.rest_motion)
    a.prepare(av_a)
    b.prepare(av_b, reference=rest_b)                                            # reference wins
    assert torch.equal(a.identity, b.identity) and np.allclose(a.identity.numpy(), fixed)
    ma, mb = a.generate(chunk(8), av_a.rest_motion), b.generate(chunk(8), rest_b)
    np.testing.assert_allclose(mb - rest_b, ma - av_a.rest_motion, atol=1e-5)
    assert np.abs(ma - av_a.rest_motion).max() > 1e-3                          # it does move


def test_context_frames_are_pinned_by_inpainting() -> None:
    gen = make_gen(window=16, hop=12)
    gen.prepare(avatar())
    rng = torch.Generator().manual_seed(1)
    ctx = torch.randn(5, 70, generator=rng)
    audio = torch.from_numpy(band_energy(chunk(16, left=0, right=0).audio)[:, None])   # [16, 1, 1, 16]
    out = gen._sample(torch.zeros(70), audio, 8, ctx)
    torch.testing.assert_close(out[:5], ctx, atol=1e-6, rtol=0)                # σ ends at 0
    free = gen._sample(torch.zeros(70), audio, 8, None)
    assert (out[5:] - free[5:]).abs().max() > 1e-4                             # the context steers
    gen.final_step = False                                                      # σ ends at 0.001
    assert (gen._sample(torch.zeros(70), audio, 8, ctx)[:5] - ctx).abs().max() < 0.01


def test_live_windows_take_shown_frames_as_context_only_when_continuing(monkeypatch) -> None:
    gen = make_gen(window=16, hop=12, context=8, feature_context=1)
    gen.prepare(avatar())
    calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    inner = gen._sample

    def spy(prev, audio, emotion, context=None):  # noqa: ANN001, ANN202
        calls.append((prev.clone(), None if context is None else context.clone()))
        return inner(prev, audio, emotion, context)

    monkeypatch.setattr(gen, "_sample", spy)
    rng = np.random.default_rng(2)
    audio = (0.1 * rng.standard_normal(640 * 40)).astype(np.float32)
    rest = avatar().rest_motion
    shown = [gen.generate(stream_chunk(audio, f, 4, left=10), rest if f == 10 else None)
             for f in (10, 14, 18)]                                              # contiguous hops
    assert calls[0][1] is None                                                   # nothing shown yet
    assert calls[1][1].shape == (4, 70) and calls[2][1].shape == (8, 70)         # up to 8 frames
    norm = torch.from_numpy(gen._to_model(np.concatenate(shown[:2])))
    torch.testing.assert_close(calls[2][1], norm, atol=1e-5, rtol=1e-5)         # what was shown
    torch.testing.assert_close(calls[2][0], torch.from_numpy(gen._to_model(rest)), atol=1e-5, rtol=1e-5)
    # A hop that does not continue (idle frames in between) starts from the agent's frame.
    gen.generate(stream_chunk(audio, 30, 4, left=10), shown[-1][-1])
    assert calls[3][1] is None


@pytest.mark.parametrize("window", [3, 5])
def test_smooth_pose_is_the_centred_mean_with_truncated_ends(window: int) -> None:
    """The vectorised smoothing equals its definition (the release's per-frame loop), bit for bit
    for the release's window of 3 and to float rounding for longer ones, batched or not;
    expression dims are untouched."""
    g = torch.Generator().manual_seed(window)
    for n in (1, 2, 3, 4, 16, 33):
        for shape in ((n, 70), (2, n, 70)):
            x = torch.randn(*shape, generator=g) * 30
            want = x.clone()
            half = window // 2
            for i in range(n):
                lo, hi = max(0, i - half), min(n, i + half + 1)
                want[..., i, 63:70] = x[..., lo:hi, 63:70].mean(dim=-2)
            got = mm.smooth_pose(x, window)
            if window == 3:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
            assert torch.equal(got[..., :63], x[..., :63])
