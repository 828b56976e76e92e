"""detect_landmarks / load_image on the real default portrait, its variants and bad inputs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar_agent.face.landmarks import (MIN_FACE_PX, FaceError, detect_landmarks, load_image,
                                         to_rgb_uint8)

PORTRAIT = Path(__file__).resolve().parents[2] / "avatars" / "default.png"

KEY = [1, 33, 133, 263, 362, 13, 14, 61, 291, 152]


def _median_dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.median(np.linalg.norm(a[:, :2] - b[:, :2], axis=1)))


def test_default_portrait_landmarks(portrait, portrait_landmarks):
    lm = portrait_landmarks
    p = lm.points
    assert p.shape == (478, 3) and p.dtype == np.float32
    assert lm.n_faces_found == 1 and lm.warnings == []
    h, w = portrait.shape[:2]
    assert (p[:, 0] > 0).all() and (p[:, 0] < w).all() and (p[:, 1] > 0).all() and (p[:, 1] < h).all()
    x0, y0, x1, y1 = lm.bbox
    assert x0 < p[1, 0] < x1 and y0 < p[1, 1] < y1                # nose tip inside the face box
    # anatomy: image-left eye left of the image-right eye, eyes above nose above mouth above chin
    assert p[33, 0] < p[133, 0] < p[362, 0] < p[263, 0]
    eye_y = p[[33, 133, 362, 263], 1].mean()
    assert eye_y < p[1, 1] < p[13, 1] < p[14, 1] < p[152, 1]
    # the nose tip is in front of the face outline (z grows away from the viewer)
    assert p[1, 2] < p[234, 2] - 20 and p[1, 2] < p[454, 2] - 20
    # the face in this photo is ~100 px wide (the astronaut's head is small in the frame)
    assert 70 < p[454, 0] - p[234, 0] < 130


def test_grayscale_rgba_float_inputs_match_rgb(portrait, portrait_landmarks):
    ref = portrait_landmarks.points
    gray = cv2.cvtColor(portrait, cv2.COLOR_RGB2GRAY)
    lm_g = detect_landmarks(gray)
    assert "grayscale image converted to RGB" in lm_g.warnings
    assert _median_dist(lm_g.points, ref) < 2.0
    rgba = np.dstack([portrait, np.full(portrait.shape[:2], 200, np.uint8)])
    lm_a = detect_landmarks(rgba)
    assert "alpha channel dropped" in lm_a.warnings
    assert _median_dist(lm_a.points, ref) < 0.5
    lm_f = detect_landmarks(portrait.astype(np.float32) / 255.0)
    assert _median_dist(lm_f.points, ref) < 0.5


def test_to_rgb_uint8_conversions():
    g16 = np.full((32, 40), 65535, np.uint16)
    out = to_rgb_uint8(g16)
    assert out.shape == (32, 40, 3) and out.dtype == np.uint8 and (out == 255).all()
    f = np.full((20, 20, 3), 300.0)                                # out of [0, 1]: clipped
    assert (to_rgb_uint8(f) == 255).all()
    with pytest.raises(FaceError, match="NaN"):
        to_rgb_uint8(np.full((20, 20, 3), np.nan, np.float32))
    with pytest.raises(FaceError, match="shape"):
        to_rgb_uint8(np.zeros((20, 20, 2), np.uint8))
    with pytest.raises(FaceError, match="dtype"):
        to_rgb_uint8(np.zeros((20, 20, 3), np.complex64))
    with pytest.raises(FaceError, match="numpy array"):
        to_rgb_uint8([[0, 1], [2, 3]])  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["gray", "noise"])
def test_no_face_is_a_clear_error(kind):
    rng = np.random.default_rng(0)
    img = (np.full((480, 640, 3), 128, np.uint8) if kind == "gray"
           else rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    with pytest.raises(FaceError, match="no face found") as e:
        detect_landmarks(img)
    assert f"{MIN_FACE_PX} px" in str(e.value)                     # names the requirement


@pytest.mark.parametrize("side", [128, 256])
def test_tiny_face_in_a_big_canvas_is_refused(portrait, side):
    """The portrait shrunk into a corner: the face is ~26 px (not even detected) or ~52 px
    (detected, refused as too small); both errors name the 64 px requirement and the fix."""
    small = cv2.resize(portrait, (side, side), interpolation=cv2.INTER_AREA)
    canvas = np.full((1024, 1024, 3), 120, np.uint8)
    canvas[1024 - side - 8:1016, 1024 - side - 8:1016] = small
    with pytest.raises(FaceError) as e:
        detect_landmarks(canvas)
    msg = str(e.value)
    assert f"{MIN_FACE_PX} px" in msg
    if side == 256:
        assert "only" in msg and "crop" in msg          # detected, then refused as too small


def test_huge_image_is_downscaled_and_mapped_back(portrait, portrait_landmarks):
    """A 10000×10000 canvas (300 MB, mostly untouched zero pages) with the portrait ×6 in it."""
    k, ox, oy = 6, 5200, 4100
    canvas = np.zeros((10000, 10000, 3), np.uint8)
    big = cv2.resize(portrait, None, fx=k, fy=k, interpolation=cv2.INTER_LINEAR)
    canvas[oy:oy + big.shape[0], ox:ox + big.shape[1]] = big
    lm = detect_landmarks(canvas)
    assert any("downscaled" in w for w in lm.warnings)
    expect = portrait_landmarks.points[:, :2] * k + (k - 1) / 2 + np.array([ox, oy])
    face_w = k * (portrait_landmarks.points[454, 0] - portrait_landmarks.points[234, 0])
    err = np.linalg.norm(lm.points[KEY, :2] - expect[KEY], axis=1)
    assert err.max() < 0.04 * face_w, err


def test_several_faces_largest_wins(portrait, portrait_landmarks):
    small = cv2.resize(portrait, (360, 360), interpolation=cv2.INTER_AREA)
    canvas = np.full((600, 900, 3), 90, np.uint8)
    canvas[40:552, 0:512] = portrait
    canvas[120:480, 530:890] = small
    lm = detect_landmarks(canvas)
    assert lm.n_faces_found == 2
    assert any("2 faces" in w for w in lm.warnings)
    expect = portrait_landmarks.points[:, :2] + np.array([0, 40])
    assert _median_dist(lm.points, np.c_[expect, np.zeros(478)]) < 3.0


def test_load_image_ok_and_errors(tmp_path, portrait):
    img = load_image(PORTRAIT)
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    # RGB order: the orange suit (bottom-left area) is red-dominant
    suit = img[400:450, 60:110].reshape(-1, 3).mean(0)
    assert suit[0] > suit[2] + 60
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"definitely not a PNG" * 20)
    with pytest.raises(FaceError, match="corrupt"):
        load_image(bad)
    data = PORTRAIT.read_bytes()
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(FaceError, match="corrupt"):
        load_image(trunc)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(FaceError, match="empty"):
        load_image(empty)
    with pytest.raises(FaceError, match="MP limit"):
        load_image(PORTRAIT, max_pixels=100_000)
    rgba = tmp_path / "rgba.png"
    cv2.imwrite(str(rgba), np.dstack([portrait[:, :, ::-1], np.full((512, 512), 255, np.uint8)]))
    assert np.array_equal(load_image(rgba), portrait)
