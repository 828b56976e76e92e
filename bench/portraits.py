"""Test portraits for the embedded benches: the bundled photo and variants made from free images.

* ``photo``: avatars/default.png (the bundled portrait; public domain, smiles at rest).
* ``photo-gray``: the same in grayscale.
* ``hopper-gray``: matplotlib's bundled sample photo of Grace Hopper (public domain, US Navy),
  in grayscale, as an old black-and-white photo.
* ``painting``: the Grace Hopper photo turned into an oil-painting look (edge-preserving
  smoothing, diagonal strokes, a warm varnish palette and a canvas weave), made here.
* ``statue``: the bundled photo as a marble bust: smoothed, flat low-contrast grey with a faint
  warm-white tint (no lip colour at all).
* ``photo-painting``: the bundled photo turned into a painting the same way (a painting without
  spectacles: both Hopper portraits wear thick ones, which the face tracker reads as brows).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from avatar_agent.config import DEFAULT_AVATAR
from avatar_agent.face.landmarks import load_image


def hopper() -> np.ndarray:
    """Grace Hopper, uint8 RGB (ships with matplotlib)."""
    import matplotlib

    return load_image(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")


def grayscale(img: np.ndarray) -> np.ndarray:
    """Luma replicated into three channels."""
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return np.repeat(g[:, :, None], 3, axis=2)


def painting(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """An oil-painting look: flattened colour areas and diagonal strokes, a warm aged-varnish palette, canvas weave."""
    flat = cv2.edgePreservingFilter(img, flags=cv2.RECURS_FILTER, sigma_s=25, sigma_r=0.25)
    # brush strokes: a directional smear of the flattened picture
    stroke = cv2.filter2D(flat, -1, np.eye(7, dtype=np.float32)[::-1] / 7.0)
    f = (0.5 * flat + 0.5 * stroke) / 255.0
    lum = f.mean(-1, keepdims=True)
    warm = np.array([1.08, 0.97, 0.78], np.float32)              # varnish yellows the blues
    f = np.clip((0.75 * f + 0.25 * lum) * warm, 0, 1)
    h, w = f.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    weave = 0.03 * (np.sin(xx * 1.9) * np.sin(yy * 2.1))
    noise = np.random.default_rng(seed).normal(0, 0.015, (h, w)).astype(np.float32)
    f = np.clip(f * (1 + weave + cv2.GaussianBlur(noise, (0, 0), 1.2))[:, :, None], 0, 1)
    return (f * 255 + 0.5).astype(np.uint8)


def statue(img: np.ndarray) -> np.ndarray:
    """A marble look: grey, smoothed, low contrast, lit white, a faint warm tint."""
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    g = cv2.bilateralFilter(g, 9, 40, 7)
    g = 150.0 + 0.55 * (g - g.mean())
    tint = np.array([1.0, 0.985, 0.95], np.float32)
    return np.clip(g[:, :, None] * tint, 0, 255).astype(np.uint8)


def portraits() -> dict[str, np.ndarray]:
    """name → uint8 RGB portrait (see the module docstring)."""
    photo = load_image(DEFAULT_AVATAR)
    h = hopper()
    return {"photo": photo, "photo-gray": grayscale(photo), "painting": painting(h),
            "hopper-gray": grayscale(h), "statue": statue(photo),
            "photo-painting": painting(photo)}
