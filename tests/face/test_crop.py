"""crop_transform / warp_crop / paste_back: the crop follows the face through image transforms."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from avatar_agent.face.crop import CropTransform, crop_transform, feather_mask, paste_back, warp_crop
from avatar_agent.face.landmarks import detect_landmarks

S = 512
KEY = [1, 33, 133, 263, 362, 13, 14, 61, 291, 152, 10]
MIRROR = {1: 1, 33: 263, 263: 33, 133: 362, 362: 133, 13: 13, 14: 14, 61: 291, 291: 61, 152: 152,
          10: 10}


@pytest.fixture(scope="module")
def reference(portrait_landmarks):
    tf = crop_transform(portrait_landmarks.points, size=S)
    return tf, tf.to_crop(portrait_landmarks.points)


def test_default_crop_geometry(portrait, reference):
    tf, q = reference
    assert isinstance(tf, CropTransform) and tf.size == S
    np.testing.assert_allclose(tf.o2c @ tf.c2o, np.eye(3), atol=1e-9)
    # eyes level and centred left/right, mouth below, LivePortrait framing (face ~45 % of width)
    eye_l, eye_r = q[[33, 133]].mean(0), q[[362, 263]].mean(0)
    assert abs(eye_l[1] - eye_r[1]) < 0.01 * S
    assert abs((eye_l[0] + eye_r[0]) / 2 - S / 2) < 0.03 * S
    assert q[13, 1] > eye_l[1] + 0.1 * S
    face_w = q[454, 0] - q[234, 0]
    assert 0.35 * S < face_w < 0.6 * S
    # vy = -0.125 leaves room for the hair: the chin sits in the lower part, the top has margin
    assert 0.7 * S < q[152, 1] < 0.9 * S and q[10, 1] > 0.2 * S
    crop = warp_crop(portrait, tf)
    assert crop.shape == (S, S, 3) and crop.dtype == np.uint8


def _rotate(img: np.ndarray, deg: float) -> np.ndarray:
    h, w = img.shape[:2]
    pad = cv2.copyMakeBorder(img, h // 2, h // 2, w // 2, w // 2, cv2.BORDER_REFLECT)
    m = cv2.getRotationMatrix2D((pad.shape[1] / 2, pad.shape[0] / 2), deg, 1.0)
    return cv2.warpAffine(pad, m, (pad.shape[1], pad.shape[0]), flags=cv2.INTER_LINEAR)


def _variants(img: np.ndarray) -> dict[str, np.ndarray]:
    canvas = np.full((1100, 1300, 3), 200, np.uint8)
    canvas[400:912, 700:1212] = img
    return {
        "rot20": _rotate(img, 20),
        "rot-20": _rotate(img, -20),
        "scale0.6": cv2.resize(img, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA),
        "scale1.5": cv2.resize(img, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_LINEAR),
        "canvas": canvas,
    }


@pytest.mark.parametrize("name", ["rot20", "rot-20", "scale0.6", "scale1.5", "canvas"])
def test_crop_follows_the_face(portrait, reference, name):
    """Same face after rotation/scaling/placement → landmarks land at the same crop spots and
    the crops look alike."""
    img = _variants(portrait)[name]
    lm = detect_landmarks(img)
    tf = crop_transform(lm.points, size=S)
    q = tf.to_crop(lm.points)
    err = np.linalg.norm(q[KEY, :2] - reference[1][KEY, :2], axis=1)
    assert err.max() < 0.03 * S, dict(zip(KEY, err.round(1), strict=False))
    ref_crop = warp_crop(portrait, reference[0]).astype(np.float32)
    crop = warp_crop(img, tf).astype(np.float32)
    centre = (slice(128, 448), slice(128, 384))                     # the face itself
    corr = np.corrcoef(crop[centre].ravel(), ref_crop[centre].ravel())[0, 1]
    assert corr > 0.9, corr


def test_mirrored_portrait_swaps_sides(portrait, reference):
    mirrored = np.ascontiguousarray(portrait[:, ::-1])
    lm = detect_landmarks(mirrored)
    tf = crop_transform(lm.points, size=S)
    q = tf.to_crop(lm.points)
    ref = reference[1]
    for k in KEY:                     # landmark k sits where the mirror partner was, x flipped
        j = MIRROR[k]
        assert abs(q[k, 0] - (S - ref[j, 0])) < 0.03 * S, k
        assert abs(q[k, 1] - ref[j, 1]) < 0.03 * S, k
    crop = warp_crop(mirrored, tf).astype(np.float32)
    ref_crop = warp_crop(portrait, reference[0])[:, ::-1].astype(np.float32)
    centre = (slice(128, 448), slice(128, 384))
    assert np.corrcoef(crop[centre].ravel(), ref_crop[centre].ravel())[0, 1] > 0.9


def test_feather_mask():
    m = feather_mask(512, inner_margin=0, feather=16)
    assert m.shape == (512, 512) and m.dtype == np.float32
    assert m[256, 256] == 1.0 and m[20, 256] == 1.0
    assert m[0, 256] < 0.05 and m[256, 0] < 0.05 and m[0, 0] < 0.05
    assert 0.4 < m[8, 256] < 0.6                                    # halfway up the ramp
    row = m[256, :32]
    assert (np.diff(row) >= 0).all()
    m2 = feather_mask(256, inner_margin=10, feather=8)
    assert m2[128, 9] == 0.0 and m2[128, 18] == 1.0
    with pytest.raises(ValueError):
        feather_mask(20, 8, 8)


def test_paste_back(portrait, reference):
    tf = reference[0]
    crop = warp_crop(portrait, tf)
    # pasting the unmodified crop back changes the image only by resampling noise
    same = paste_back(crop, portrait, tf)
    assert same.shape == portrait.shape and same.dtype == np.uint8
    assert np.abs(same.astype(int) - portrait).mean() < 1.5
    # a red crop lands on the face and nowhere outside the crop's footprint
    red = np.zeros_like(crop)
    red[..., 0] = 255
    out = paste_back(red, portrait, tf, feather_mask(S, 0, 16))
    nose = reference[1][1, :2]
    nx, ny = tf.to_image(nose[None])[0].round().astype(int)
    assert tuple(out[ny, nx]) == (255, 0, 0)
    corners = tf.to_image(np.array([[0, 0], [S, 0], [0, S], [S, S]], float))
    x1 = int(np.ceil(corners[:, 0].max())) + 2
    assert np.array_equal(out[:, x1:], portrait[:, x1:])          # right of the crop: untouched
    with pytest.raises(ValueError):
        paste_back(red[:100, :100], portrait, tf)


def test_paste_back_with_kept_geometry_equals_the_formula(portrait, reference):
    """The geometry kept per avatar gives what the per-frame computation gives, and the blend is
    the feathered formula α·crop + (1 − α)·image, rounded."""
    from avatar_agent.face.crop import paste_geometry

    tf = reference[0]
    mask = feather_mask(S, 0, 16)
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    geo = paste_geometry(portrait.shape, tf, mask)
    assert geo is not None
    kept = paste_back(crop, portrait, tf, mask, geo)
    assert np.array_equal(kept, paste_back(crop, portrait, tf, mask))
    x0, y0, x1, y1 = geo.box
    warped = cv2.warpAffine(crop, geo.c2roi, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)
    want = geo.alpha[..., None] * warped + geo.rest[..., None] * portrait[y0:y1, x0:x1]
    assert np.abs(kept[y0:y1, x0:x1] - want).max() <= 0.51       # rounded (float32 weights)
    assert np.array_equal(kept[:y0], portrait[:y0]) and np.array_equal(kept[y1:], portrait[y1:])
