"""The synthesised mouth interior takes its colours from the portrait (issue 12, item 3)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar_agent.face.landmarks import load_image
from avatar_agent.motion import space
from avatar_agent.render.warp import FACE_OVAL, OUTER_LIPS, WarpRenderer

ROOT = Path(__file__).resolve().parents[2]
S = 512


def _hopper() -> np.ndarray:
    import matplotlib

    return load_image(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")


def _gray(img: np.ndarray) -> np.ndarray:
    return np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)


def _statue(img: np.ndarray) -> np.ndarray:
    """A marble look: grey, smoothed, low contrast, a faint warm-white tint."""
    g = cv2.bilateralFilter(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32), 9, 40, 7)
    g = 150.0 + 0.55 * (g - g.mean())
    return np.clip(g[:, :, None] * np.array([1.0, 0.985, 0.95], np.float32), 0, 255).astype(
        np.uint8)


def _open(avatar, amount: float) -> np.ndarray:
    """The neutral face with the jaw dropped by ``amount`` canonical units."""
    m = avatar.rest_motion.astype(np.float64).copy()
    m[space.EXP] = 0
    for name, f in (("lower_lip_inner", 1.0), ("lower_lip_outer", 1.0), ("lower_lip_outer_l", 1.0),
                    ("lower_lip_outer_r", 1.0), ("chin", 0.9), ("jaw_l", 0.5), ("jaw_r", 0.5)):
        m[space.exp_index(space.KP[name], 1)] += f * amount
    return m


def _mouth_mask(renderer: WarpRenderer, avatar, motion: np.ndarray) -> np.ndarray:
    vd = renderer.driven_mesh(avatar, motion)
    mask = np.zeros((S, S), np.uint8)
    cv2.fillPoly(mask, [np.round(vd[list(OUTER_LIPS)]).astype(np.int32)], 1)
    return mask.astype(bool)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb.reshape(-1, 1, 3).astype(np.uint8), cv2.COLOR_RGB2HSV)[:, 0, 1]


@pytest.mark.parametrize("portrait", ["photo", "hopper"])
def test_grayscale_portrait_opens_a_grey_mouth(portrait):
    """On a black-and-white picture the opened mouth adds no colour at all."""
    img = load_image(ROOT / "avatars" / "default.png") if portrait == "photo" else _hopper()
    r = WarpRenderer(size=S)
    av = r.prepare(_gray(img))
    m = _open(av, 0.1)
    out = r.render(av, m)[0]
    mouth = _mouth_mask(r, av, m)
    assert mouth.sum() > 500
    # the interior really changed (a cavity was drawn) …
    closed = r.render(av, _open(av, 0.0))[0]
    assert np.abs(out[mouth].astype(int) - closed[mouth]).mean() > 15
    # … and it is grey: every pixel's channels agree as in the input (JPEG-free: exactly)
    assert int(_saturation(out[mouth]).max()) <= 3


def _hues(rgb: np.ndarray) -> np.ndarray:
    """Hue angles in degrees of reasonably saturated pixels [N, 3]."""
    hsv = cv2.cvtColor(rgb.reshape(-1, 1, 3).astype(np.uint8), cv2.COLOR_RGB2HSV_FULL)[:, 0]
    keep = (hsv[:, 1] > 25) & (hsv[:, 2] > 12)
    return hsv[keep, 0].astype(np.float64) * 360.0 / 256.0


def _arc(hues: np.ndarray, lo: float = 5, hi: float = 95) -> tuple[float, float]:
    """Percentile range of hues around their circular mean, as (low, high) offsets in degrees."""
    mean = np.degrees(np.angle(np.exp(1j * np.radians(hues)).mean()))
    d = (hues - mean + 180.0) % 360.0 - 180.0
    return float(mean + np.percentile(d, lo)), float(mean + np.percentile(d, hi))


@pytest.mark.parametrize("portrait", ["photo", "hopper"])
def test_colour_photo_mouth_hue_lies_within_lips_and_shadows(portrait):
    img = load_image(ROOT / "avatars" / "default.png") if portrait == "photo" else _hopper()
    r = WarpRenderer(size=S)
    av = r.prepare(img)
    m = _open(av, 0.1)
    out = r.render(av, m)[0]
    closed = r.render(av, _open(av, 0.0))[0]
    mouth = _mouth_mask(r, av, m)
    changed = mouth & (np.abs(out.astype(int) - closed).sum(-1) > 30)     # the drawn interior
    assert changed.sum() > 300
    # reference hues: the portrait's lips and the face's shadows
    mesh = av.extra["mesh_px"][:, :2]
    lips = np.zeros((S, S), np.uint8)
    cv2.fillPoly(lips, [np.round(mesh[list(OUTER_LIPS)]).astype(np.int32)], 1)
    face = np.zeros((S, S), np.uint8)
    cv2.fillPoly(face, [np.round(mesh[list(FACE_OVAL)]).astype(np.int32)], 1)
    crop = av.crop
    lum = crop.mean(-1)
    shadows = face.astype(bool) & (lum <= np.percentile(lum[face.astype(bool)], 15))
    ref = np.concatenate([_hues(crop[lips.astype(bool)]), _hues(crop[shadows])])
    lo, hi = _arc(ref, 2, 98)
    got = _hues(out[changed])
    assert got.size > 100
    d_lo, d_hi = _arc(got, 10, 90)
    tol = 8.0                                                    # degrees
    assert d_lo >= lo - tol and d_hi <= hi + tol, ((d_lo, d_hi), (lo, hi))


def test_teeth_only_when_the_mouth_is_open_enough():
    r = WarpRenderer(size=S)
    av = r.prepare(_hopper())                                      # no teeth in the photo
    teeth = av.extra["palette"]["teeth"].mean()
    bright = []
    for amount in (0.012, 0.1):
        m = _open(av, amount)
        out = r.render(av, m)[0].astype(np.float32)
        mouth = _mouth_mask(r, av, m)
        bright.append(int((out[mouth].mean(-1) > 0.85 * teeth).sum()))
    closed_out = r.render(av, _open(av, 0.0))[0].astype(np.float32)
    base = int((closed_out[_mouth_mask(r, av, _open(av, 0.0))].mean(-1) > 0.85 * teeth).sum())
    assert bright[0] <= base + 20, bright                         # a slit: no teeth drawn
    assert bright[1] > base + 100, bright                         # open: a band of teeth


def test_statue_mouth_keeps_the_marble_tint():
    """A tinted marble bust: the opened mouth is no more saturated than the stone itself (the
    old fixed red cavity was saturation ~170)."""
    r = WarpRenderer(size=S)
    av = r.prepare(_statue(load_image(ROOT / "avatars" / "default.png")))
    m = _open(av, 0.1)
    out = r.render(av, m)[0]
    closed = r.render(av, _open(av, 0.0))[0]
    mouth = _mouth_mask(r, av, m)
    drawn = mouth & (np.abs(out.astype(int) - closed).sum(-1) > 30)
    assert drawn.sum() > 300
    face = np.zeros((S, S), np.uint8)
    cv2.fillPoly(face, [np.round(av.extra["mesh_px"][list(FACE_OVAL), :2]).astype(np.int32)], 1)
    stone = int(_saturation(av.crop[face.astype(bool)]).max())
    assert int(_saturation(out[drawn]).max()) <= stone + 3, stone
