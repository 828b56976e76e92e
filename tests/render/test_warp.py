"""WarpRenderer on the default portrait: rest reproduction, jaw, head turns, lids, robustness."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar_agent.face.landmarks import FaceError, detect_landmarks, load_image
from avatar_agent.motion import space
from avatar_agent.render.warp import WarpRenderer
from avatar_agent.types import Avatar, Renderer

PORTRAIT = Path(__file__).resolve().parents[2] / "avatars" / "default.png"
S = 512


@pytest.fixture(scope="module")
def renderer() -> WarpRenderer:
    return WarpRenderer(size=S)


@pytest.fixture(scope="module")
def avatar(renderer) -> Avatar:
    return renderer.prepare(load_image(PORTRAIT))


@pytest.fixture(scope="module")
def rest(avatar) -> np.ndarray:
    return avatar.rest_motion.astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _box(points: np.ndarray, pad: float = 0.0) -> tuple[slice, slice]:
    x0, y0 = points.min(0) - pad
    x1, y1 = points.max(0) + pad
    return slice(int(max(0, y0)), int(min(S, y1))), slice(int(max(0, x0)), int(min(S, x1)))


def _jaw_open(motion: np.ndarray, amount: float) -> np.ndarray:
    m = motion.copy()
    for name, f in (("lower_lip_inner", 1.0), ("lower_lip_outer", 1.0), ("lower_lip_outer_l", 1.0),
                    ("lower_lip_outer_r", 1.0), ("chin", 0.9), ("jaw_l", 0.5), ("jaw_r", 0.5)):
        m[space.exp_index(space.KP[name], 1)] += f * amount
    return m


def _close_lids(motion: np.ndarray, kp_c: np.ndarray, frac: float) -> np.ndarray:
    m = motion.copy()
    pts = kp_c + space.exp_points(m)
    for up, lo in (("upper_lid_l", "lower_lid_l"), ("upper_lid_r", "lower_lid_r")):
        gap = pts[space.KP[lo], 1] - pts[space.KP[up], 1]
        m[space.exp_index(space.KP[up], 1)] += frac * gap
    return m


def test_prepare_avatar(renderer, avatar, rest):
    assert isinstance(renderer, Renderer) and renderer.profile == "embedded"
    assert avatar.profile == "embedded"
    assert avatar.crop.shape == (S, S, 3) and avatar.crop.dtype == np.uint8
    assert avatar.kp_canonical.shape == (21, 3) and avatar.kp_canonical.dtype == np.float32
    assert avatar.rest_motion.shape == (70,) and avatar.rest_motion.dtype == np.float32
    assert np.abs(avatar.kp_canonical).max() < 1.0                  # normalised crop units
    assert avatar.extra["mesh_px"].shape == (478, 3)
    # the photo faces the camera: small rest angles
    assert np.abs(rest[space.POSE]).max() < 8.0
    # rest keypoints = the portrait's own 21 landmarks, in canonical crop units
    mesh = avatar.extra["mesh_px"][space.MESH_INDEX].astype(np.float64)
    kp_rest = space.transform_keypoints(avatar.kp_canonical, rest)
    np.testing.assert_allclose((kp_rest[:, :2] + 1) * S / 2, mesh[:, :2], atol=0.05)
    # the astronaut smiles with her teeth showing; the neutral keypoints have the lips closed
    assert space.lip_opening(rest, avatar.kp_canonical) > 0.03
    neutral = rest.copy()
    neutral[space.EXP] = 0
    assert abs(space.lip_opening(neutral, avatar.kp_canonical)) < 1e-6
    assert space.eye_opening(neutral, avatar.kp_canonical) > 0.03   # eyes open in the neutral
    # crop_to_image maps the crop centre into the portrait's face area
    cx, cy, _ = avatar.crop_to_image @ np.array([S / 2, S / 2, 1.0])
    assert 150 < cx < 300 and 50 < cy < 200


def test_rest_motion_reproduces_the_crop(renderer, avatar, rest):
    out = renderer.render(avatar, rest[None])
    assert out.shape == (1, S, S, 3) and out.dtype == np.uint8
    face = _box(avatar.extra["mesh_px"][:, :2])
    assert _psnr(out[0][face], avatar.crop[face]) >= 35.0
    # a tiny head movement is still (nearly) the same picture, but not bit-identical
    nudged = rest.copy()
    nudged[space.YAW] += 0.5
    o2 = renderer.render(avatar, nudged[None])[0]
    assert 30.0 < _psnr(o2[face], avatar.crop[face]) < np.inf


def test_neutral_closes_the_mouth(renderer, avatar, rest):
    """exp = 0 must render the neutral closed-mouth face: re-detected lips nearly touch."""
    neutral = rest.copy()
    neutral[space.EXP] = 0
    out = renderer.render(avatar, neutral[None])[0]
    p_rest = detect_landmarks(avatar.crop).points
    p_neu = detect_landmarks(out).points
    gap_rest = p_rest[14, 1] - p_rest[13, 1]
    gap_neu = p_neu[14, 1] - p_neu[13, 1]
    assert gap_rest > 12                                               # teeth showing
    assert gap_neu < 0.35 * gap_rest, (gap_rest, gap_neu)
    # the eyes are not touched by closing the mouth
    eye = _box(avatar.extra["mesh_px"][[33, 133, 159, 145], :2], 3)
    assert np.abs(out[eye].astype(int) - avatar.crop[eye]).mean() < 2.0


def test_jaw_open_changes_the_mouth_only(renderer, avatar, rest):
    out = renderer.render(avatar, _jaw_open(rest, 0.08)[None])[0]
    diff = np.abs(out.astype(int) - avatar.crop.astype(int)).max(-1)
    mesh = avatar.extra["mesh_px"][:, :2]
    mouth = _box(mesh[[61, 291, 0, 17, 152]], 4)
    assert diff[mouth].mean() > 15                                     # the mouth/chin moved
    brow_y = mesh[[70, 300, 105, 334], 1].min()
    assert diff[: int(brow_y) - 5].max() <= 2                          # forehead, hair, background
    corner = diff[S - 60:, :60], diff[:60, :60], diff[:60, S - 60:]
    assert all(c.max() == 0 for c in corner)
    # the lower lip moved down in the image: re-detected lips part further
    p = detect_landmarks(out).points
    gap = p[14, 1] - p[13, 1]
    assert gap > avatar.extra["mouth_gap_px"] + 8
    # the parted lips show a dark cavity (no longer the bright teeth everywhere)
    inner = _box(p[[13, 14, 78, 308], :2], -1)
    lum = out[inner].mean(-1)
    assert (lum < 90).mean() > 0.15


def test_yaw_moves_the_nose_both_ways(renderer, avatar, rest):
    frames = []
    for yaw in (15.0, -15.0):
        m = rest.copy()
        m[space.YAW] += yaw
        frames.append(renderer.render(avatar, m[None])[0])
    p0 = detect_landmarks(avatar.crop).points
    shifts = []
    for m_yaw, f in zip((15.0, -15.0), frames, strict=True):
        p = detect_landmarks(f).points
        # relative to the face outline, so the test sees rotation rather than translation
        rel = (p[1, 0] - p[[234, 454], 0].mean()) - (p0[1, 0] - p0[[234, 454], 0].mean())
        shifts.append((p[1, 0] - p0[1, 0], rel))
        m = rest.copy()
        m[space.YAW] += m_yaw
        # the warp puts the nose tip where the driven mesh says it is
        predicted = renderer.driven_mesh(avatar, m)[1]
        assert np.linalg.norm(p[1, :2] - predicted) < 0.02 * S
    (abs_p, rel_p), (abs_m, rel_m) = shifts
    assert abs_p < -10 and abs_m > 10                                  # +yaw → left, −yaw → right
    assert rel_p < -3 and rel_m > 3                                    # nose turns within the face


def test_eyelid_close_covers_the_eyes(renderer, avatar, rest):
    out = renderer.render(avatar, _close_lids(rest, avatar.kp_canonical, 1.0)[None])[0]
    mesh = avatar.extra["mesh_px"][:, :2]
    for eye in ([33, 133, 159, 145], [263, 362, 386, 374]):
        box = _box(mesh[eye], 1)
        dark_rest = (avatar.crop[box].mean(-1) < 90).mean()          # iris, pupil, lashes
        dark_closed = (out[box].mean(-1) < 90).mean()
        assert dark_rest > 0.15
        assert dark_closed < 0.5 * dark_rest, (dark_rest, dark_closed)
    # lids half-closed: part of the eye is covered (a closed eye keeps its dark lash line, so
    # half-closed is not necessarily lighter than closed)
    half = renderer.render(avatar, _close_lids(rest, avatar.kp_canonical, 0.5)[None])[0]
    box = _box(mesh[[33, 133, 159, 145]], 1)
    assert (half[box].mean(-1) < 90).mean() < 0.7 * (avatar.crop[box].mean(-1) < 90).mean()


def _random_motions(rest: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.repeat(rest[None], n, 0)
    m[:, space.EXP] = rng.normal(0, 0.008, (n, 63))
    m[:, space.PITCH] += rng.uniform(-15, 15, n)
    m[:, space.YAW] += rng.uniform(-20, 20, n)
    m[:, space.ROLL] += rng.uniform(-10, 10, n)
    m[:, space.SCALE] *= rng.uniform(0.95, 1.05, n)
    m[:, 64:66] += rng.uniform(-0.03, 0.03, (n, 2))
    for i in range(n):
        m[i] = _jaw_open(m[i], rng.uniform(0, 0.1))
    return m


def test_no_nan_holes_or_tears(renderer, avatar, rest):
    motions = _random_motions(rest, 6)
    out = renderer.render(avatar, motions)
    assert out.shape == (6, S, S, 3) and out.dtype == np.uint8
    src = avatar.crop.astype(np.float32)

    def black(img):
        return (img.max(-1) <= 4).sum()

    def grad99(img):
        g = img.astype(np.float32).mean(-1)
        return (np.percentile(np.abs(np.diff(g, axis=0)), 99.9),
                np.percentile(np.abs(np.diff(g, axis=1)), 99.9))

    gs = grad99(src)
    for f in out:
        assert black(f) <= 1.1 * black(avatar.crop) + 50               # no holes
        gy, gx = grad99(f)
        assert gy < 1.5 * gs[0] + 10 and gx < 1.5 * gs[1] + 10        # no tears/seams
        assert np.abs(f.astype(np.float32) - src).mean() > 0.5         # it did move


def test_emotions_at_full_intensity_do_not_tear(renderer, avatar):
    """Every emotion preset at full intensity, also with the jaw open and the eyes shut: no
    holes, no tears (no gradient beyond the portrait's own), nothing folded over (the warp
    field's Jacobian stays positive outside the lips and the eyes, which the renderer repaints:
    the closing of the photo's open smile squeezes its teeth, a shut lid squeezes the eye)."""
    from avatar_agent.motion.emotion import emotion_offsets
    from avatar_agent.motion.procedural import ProceduralMotion
    from avatar_agent.types import EMOTIONS

    g = ProceduralMotion()
    g.prepare(avatar)
    base = g.rest_pose.astype(np.float64)
    ms = []
    for e in EMOTIONS:
        m = base.copy()
        m[space.EXP] += emotion_offsets(e, 1.0, avatar.kp_canonical, base)
        ms += [m, _close_lids(_jaw_open(m, 0.08), avatar.kp_canonical, 1.0)]
    out = renderer.render(avatar, np.stack(ms))
    src = avatar.crop.astype(np.float32).mean(-1)
    g99 = np.percentile(np.abs(np.diff(src, axis=0)), 99.9)
    black0 = (avatar.crop.max(-1) <= 4).sum()
    ex = avatar.extra
    gx, gy = ex["grid_px"][..., 0], ex["grid_px"][..., 1]
    outside = np.ones(gx.shape, bool)
    for part in ([61, 291, 0, 17], [33, 133, 159, 145], [263, 362, 386, 374]):
        (x0, y0), (x1, y1) = ex["mesh_px"][part, :2].min(0) - 10, ex["mesh_px"][part, :2].max(0) + 10
        outside &= ~((gx > x0) & (gx < x1) & (gy > y0) & (gy < y1))
    st = renderer.grid_step
    for m, f in zip(ms, out, strict=True):
        assert (f.max(-1) <= 4).sum() <= 1.1 * black0 + 50
        assert np.percentile(np.abs(np.diff(f.astype(np.float32).mean(-1), axis=0)), 99.9) \
            < 1.5 * g99 + 10
        vd, vh = renderer._driven(avatar, m)
        dv = np.concatenate([vd - ex["mesh_px"][:, :2], vd - vh])
        n = S // st
        det = renderer._jacobian((ex["grid_mat"] @ dv).reshape(n, n, 2))[1]
        assert det[outside].min() > 0.05


def test_batch_equals_single_frames(renderer, avatar, rest):
    motions = _random_motions(rest, 3, seed=1)
    batch = renderer.render(avatar, motions)
    for i in range(3):
        assert np.array_equal(batch[i], renderer.render(avatar, motions[i])[0])


def test_image_output_pastes_back(avatar, rest):
    r = WarpRenderer(size=S, output="image")
    out = r.render(avatar, np.stack([rest, _jaw_open(rest, 0.08)]))
    assert out.shape == (2,) + avatar.image.shape
    # rest: the portrait comes back (up to crop resampling)
    assert np.abs(out[0].astype(int) - avatar.image).mean() < 1.5
    # the animated mouth is inside the original photo, the suit far below is untouched
    diff = np.abs(out[1].astype(int) - avatar.image).max(-1)
    mouth_img = avatar.extra["landmarks"].points[[61, 291, 17], :2]
    (ys, xs) = _box(mouth_img, 4)
    assert diff[ys, xs].mean() > 10
    assert diff[400:, :].max() == 0


def test_smaller_size_and_bad_inputs(avatar, rest):
    r = WarpRenderer(size=256)
    small = r.prepare(load_image(PORTRAIT))
    assert small.crop.shape == (256, 256, 3)
    # same canonical keypoints whatever the crop size
    np.testing.assert_allclose(small.kp_canonical, avatar.kp_canonical, atol=0.02)
    out = r.render(small, _random_motions(small.rest_motion.astype(np.float64), 2))
    assert out.shape == (2, 256, 256, 3)
    # output="image" on a smaller renderer: the 512² portrait letterboxed to 256², the rest
    # frame equals the downscaled portrait
    img_out = r.render(small, small.rest_motion, output="image")
    assert img_out.shape == (1, 256, 256, 3)
    ref = cv2.resize(small.image, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(img_out[0].astype(int) - ref).mean() < 3.0
    with pytest.raises(ValueError, match="prepared at"):
        r.render(avatar, rest)
    with pytest.raises(ValueError, match=r"\[B, 70\]"):
        r.render(small, np.zeros((2, 69)))
    bad = small.rest_motion.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        r.render(small, bad)
    with pytest.raises(ValueError):
        WarpRenderer(size=512, output="video")  # type: ignore[arg-type]


def test_prepare_handles_gray_rgba_and_refuses_no_face():
    r = WarpRenderer(size=256)
    img = load_image(PORTRAIT)
    gray = img.mean(-1).astype(np.uint8)
    av = r.prepare(gray)
    assert av.image.shape == (512, 512, 3) and av.crop.shape == (256, 256, 3)
    assert "grayscale image converted to RGB" in av.extra["warnings"]
    rgba = np.dstack([img, np.zeros((512, 512), np.uint8)])          # fully transparent alpha
    av = r.prepare(rgba)
    assert np.array_equal(av.image, img)
    with pytest.raises(FaceError, match="no face"):
        r.prepare(np.full((300, 300, 3), 127, np.uint8))


def test_letterbox_of_a_non_square_portrait():
    """An 800×400 (landscape) canvas: image output is 256² with black bars top and bottom."""
    img = load_image(PORTRAIT)
    canvas = np.full((400, 800, 3), 200, np.uint8)
    canvas[:, 200:600] = cv2.resize(img, (400, 400), interpolation=cv2.INTER_AREA)
    r = WarpRenderer(size=256, output="image")
    av = r.prepare(canvas)
    out = r.render(av, av.rest_motion)[0]
    assert out.shape == (256, 256, 3)
    assert out[:60].max() == 0 and out[-60:].max() == 0               # bars (64 px each)
    ref = cv2.resize(canvas, (256, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(out[64:192].astype(int) - ref).mean() < 3.0


def test_closed_mouth_portrait_gets_a_cavity():
    """Grace Hopper (matplotlib's sample photo): lips closed, glasses.  Opening the jaw from the
    neutral face shows a synthesised dark cavity with a band of teeth under the upper lip."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"  # ships with it
    r = WarpRenderer(size=S)
    av = r.prepare(load_image(path))
    rest = av.rest_motion.astype(np.float64)
    assert abs(space.lip_opening(rest, av.kp_canonical)) < 0.01         # closed in the photo
    neutral = rest.copy()
    neutral[space.EXP] = 0
    out = r.render(av, np.stack([neutral, _jaw_open(neutral, 0.08)]))
    assert np.abs(out[0].astype(int) - av.crop).mean() < 1.0          # neutral ≈ the photo
    p = detect_landmarks(out[1]).points
    assert p[14, 1] - p[13, 1] > 10                                     # lips re-detected apart
    lip_w = p[308, 0] - p[78, 0]
    cx = int(p[[13, 14], 0].mean())
    top, bot = int(p[13, 1]), int(p[14, 1])
    column = out[1][top:bot, cx - int(lip_w / 6): cx + int(lip_w / 6)].astype(np.float32)
    lum = column.mean(-1)
    third = max(1, lum.shape[0] // 3)
    assert lum[-third:].mean() < 80                                     # dark cavity below
    assert lum[:third].mean() > lum[-third:].mean() + 30                # lighter teeth above
