"""LivePortrait-style face crop from FaceMesh landmarks, and paste-back into the original frame.

The crop geometry follows LivePortrait's cropper (``src/utils/crop.py``): a box rotated so that the eyes-to-mouth
direction points straight down, sized ``scale`` × the rotated extent of the landmarks, shifted
by ``vy_ratio`` × box size along the face's down axis (negative = towards the forehead), and
resampled to ``size`` × ``size``.  LivePortrait measures the extent on insightface's 106 points;
we use the FaceMesh subset proposed in the spec (jaw/cheek contour at and below eye level, brows,
eyes, nose, lips), which mimics that extent — the mesh's forehead points would enlarge the box.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CROP_SUBSET = np.array([
    # jaw/cheek contour from the right temple round the chin to the left temple
    127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288,
    361, 323, 454, 356,
    # brows
    70, 63, 105, 66, 107, 55, 65, 52, 53, 46, 300, 293, 334, 296, 336, 285, 295, 282, 283, 276,
    # eyes
    33, 133, 159, 145, 362, 263, 386, 374,
    # nose
    1, 4, 98, 327, 168,
    # lips
    61, 291, 0, 17, 13, 14,
], dtype=np.int64)
"""FaceMesh landmarks whose rotated extent sizes the crop (our choice: LivePortrait uses all of its
detector's landmarks, FaceMesh has no such set)."""

EYE_L = (33, 133)    # corners of the image-left eye
EYE_R = (362, 263)   # corners of the image-right eye
IRIS_L, IRIS_R = 468, 473
MOUTH = (13, 14)     # inner-lip midpoints


@dataclass(frozen=True)
class CropTransform:
    """Similarity transform between an image and its square face crop.

    Attributes:
        o2c: float64 [3, 3] image pixel (x, y, 1) → crop pixel.
        c2o: float64 [3, 3] crop pixel → image pixel (inverse of o2c).
        size: crop side in pixels.
    """

    o2c: np.ndarray
    c2o: np.ndarray
    size: int

    @property
    def scale(self) -> float:
        """Crop pixels per image pixel."""
        return float(np.hypot(self.o2c[0, 0], self.o2c[0, 1]))

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """Map [..., 2] (or [..., 3], z scaled by :attr:`scale`) image points into the crop."""
        return _apply(self.o2c, points, self.scale)

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """Map [..., 2] (or [..., 3], z scaled by 1/:attr:`scale`) crop points into the image."""
        return _apply(self.c2o, points, 1.0 / self.scale)


def _apply(m: np.ndarray, points: np.ndarray, zscale: float) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    out = pts.copy()
    out[..., :2] = pts[..., :2] @ m[:2, :2].T + m[:2, 2]
    if pts.shape[-1] == 3:
        out[..., 2] = pts[..., 2] * zscale
    return out


def crop_transform(points: np.ndarray, size: int = 512, scale: float = 2.3,
                   vy_ratio: float = -0.125) -> CropTransform:
    """The LivePortrait crop of a face given its FaceMesh landmarks.

    Args:
        points: [478, 2|3] FaceMesh landmarks in image pixels (468 without iris also works).
        size: output crop side in pixels.
        scale: box side = ``scale`` × the larger side of the rotated landmark extent.
        vy_ratio: centre shift along the face's down axis, in box sides (negative = up).

    Returns:
        The image↔crop transform.
    """
    p = np.asarray(points, dtype=np.float64)[:, :2]
    if p.shape[0] < 468:
        raise ValueError(f"crop_transform needs FaceMesh landmarks [478, 2|3], got {p.shape}")
    if p.shape[0] > IRIS_R:
        eye_l, eye_r = p[IRIS_L], p[IRIS_R]
    else:
        eye_l, eye_r = p[list(EYE_L)].mean(0), p[list(EYE_R)].mean(0)
    mouth = p[list(MOUTH)].mean(0)
    down = mouth - (eye_l + eye_r) / 2
    n = np.linalg.norm(down)
    if not np.isfinite(n) or n < 1e-6:
        raise ValueError("degenerate landmarks: eyes and mouth coincide")
    uy = down / n                                   # face down axis in the image
    ux = np.array([uy[1], -uy[0]])                  # face right axis (image-right when upright)
    sub = p[CROP_SUBSET]
    mean = sub.mean(0)
    r = (sub - mean) @ np.stack([ux, uy]).T         # [N, 2] coords in the face frame
    lt, rb = r.min(0), r.max(0)
    box = float((rb - lt).max()) * scale
    mid = (lt + rb) / 2
    centre = mean + ux * mid[0] + uy * mid[1] + uy * (vy_ratio * box)
    s = size / box
    cos, sin = ux                                   # rotation that maps ux → +x
    o2c = np.array([
        [s * cos, s * sin, size / 2 - s * (cos * centre[0] + sin * centre[1])],
        [-s * sin, s * cos, size / 2 - s * (-sin * centre[0] + cos * centre[1])],
        [0.0, 0.0, 1.0],
    ])
    return CropTransform(o2c=o2c, c2o=np.linalg.inv(o2c), size=int(size))


def warp_crop(image: np.ndarray, tf: CropTransform, border: str = "replicate") -> np.ndarray:
    """Resample the face crop [size, size, C] out of ``image`` with ``tf``.

    ``border``: "replicate" (default; a crop running off the photo edge continues its edge
    pixels, which looks better in a crop-only stream) or "constant" (black, as LivePortrait).
    """
    mode = {"replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}.get(border)
    if mode is None:
        raise ValueError(f"border must be 'replicate' or 'constant', got {border!r}")
    # downscaling by a lot aliases with bilinear and INTER_AREA is not available for
    # warpAffine, so pre-shrink — only the region the crop covers (a 10000² photo stays cheap)
    if tf.scale < 0.5:
        h, w = image.shape[:2]
        s = tf.size
        corners = tf.to_image(np.array([[0, 0], [s, 0], [0, s], [s, s]], dtype=np.float64))
        x0 = int(np.clip(np.floor(corners[:, 0].min()) - 2, 0, w - 1))
        y0 = int(np.clip(np.floor(corners[:, 1].min()) - 2, 0, h - 1))
        x1 = int(np.clip(np.ceil(corners[:, 0].max()) + 3, x0 + 1, w))
        y1 = int(np.clip(np.ceil(corners[:, 1].max()) + 3, y0 + 1, h))
        f = 2.0 * tf.scale
        roi = image[y0:y1, x0:x1]
        small = cv2.resize(roi, (max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f))),
                           interpolation=cv2.INTER_AREA)
        fx, fy = small.shape[1] / (x1 - x0), small.shape[0] / (y1 - y0)
        # small pixel → image pixel: x = (u + 0.5)/fx − 0.5 + x0 (pixel-centre convention)
        pre = np.array([[1 / fx, 0, 0.5 / fx - 0.5 + x0], [0, 1 / fy, 0.5 / fy - 0.5 + y0],
                        [0, 0, 1.0]])
        m = (tf.o2c @ pre)[:2]
        return cv2.warpAffine(small, m, (tf.size, tf.size), flags=cv2.INTER_LINEAR,
                              borderMode=mode)
    return cv2.warpAffine(image, tf.o2c[:2], (tf.size, tf.size), flags=cv2.INTER_LINEAR,
                          borderMode=mode)


def feather_mask(size: int, inner_margin: int = 0, feather: int = 16) -> np.ndarray:
    """float32 [size, size] paste-back mask: 0 in the outer ``inner_margin`` px, then a linear
    ramp to 1 over ``feather`` px (LivePortrait's template: margin 0, feather 16 at 512)."""
    if size <= 2 * (inner_margin + feather):
        raise ValueError(f"mask of size {size} cannot hold margin {inner_margin} + feather {feather}")
    c = np.arange(size, dtype=np.float32) + 0.5
    d = np.minimum(c, size - c)                                   # distance to the nearest edge
    ramp = np.clip((d - inner_margin) / max(feather, 1e-6), 0.0, 1.0)
    return np.minimum(ramp[:, None], ramp[None, :]).astype(np.float32)


@dataclass(frozen=True)
class PasteGeometry:
    """Where a crop lands in its image and with which weights: the per-frame paste-back's fixed
    part, computed once per (image, transform, mask) by :func:`paste_geometry`.

    Attributes:
        box: (x0, y0, x1, y1) image region the crop covers.
        c2roi: [2, 3] affine crop pixels → region pixels.
        alpha, rest: float32 [y1 − y0, x1 − x0] weights of the crop and of the image (1 − alpha).
    """

    box: tuple[int, int, int, int]
    c2roi: np.ndarray
    alpha: np.ndarray
    rest: np.ndarray


def paste_geometry(image_shape: tuple[int, ...], tf: CropTransform,
                   mask: np.ndarray | None = None) -> PasteGeometry | None:
    """The fixed part of :func:`paste_back` for an image of ``image_shape`` (None: the crop
    covers none of it)."""
    s = tf.size
    if mask is None:
        mask = feather_mask(s, 0, max(1, s // 32))
    h, w = image_shape[:2]
    corners = tf.to_image(np.array([[0, 0], [s, 0], [0, s], [s, s]], dtype=np.float64))
    x0 = int(max(0, np.floor(corners[:, 0].min())))
    y0 = int(max(0, np.floor(corners[:, 1].min())))
    x1 = int(min(w, np.ceil(corners[:, 0].max()) + 1))
    y1 = int(min(h, np.ceil(corners[:, 1].max()) + 1))
    if x1 <= x0 or y1 <= y0:
        return None
    m = tf.c2o.copy()
    m[0, 2] -= x0
    m[1, 2] -= y0
    alpha = cv2.warpAffine(mask.astype(np.float32), m[:2], (x1 - x0, y1 - y0),
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return PasteGeometry((x0, y0, x1, y1), m[:2].copy(), alpha, 1.0 - alpha)


def paste_back(crop_frame: np.ndarray, image: np.ndarray, tf: CropTransform,
               mask: np.ndarray | None = None, geometry: PasteGeometry | None = None
               ) -> np.ndarray:
    """Blend a rendered crop back into the full original image.

    Only the image region the crop covers is resampled (cheap for big portraits).

    Args:
        crop_frame: uint8 [size, size, 3] rendered crop.
        image: uint8 [H, W, 3] original image (not modified).
        tf: the transform the crop was taken with.
        mask: float [size, size] blend weights in crop space (default :func:`feather_mask`).
        geometry: :func:`paste_geometry` of (image, tf, mask), when the caller keeps it for
            every frame (it is then neither recomputed nor checked against them).

    Returns:
        uint8 [H, W, 3] image with the crop pasted in.
    """
    s = tf.size
    if crop_frame.shape[:2] != (s, s):
        raise ValueError(f"crop_frame is {crop_frame.shape[:2]}, transform expects {s}×{s}")
    geo = geometry or paste_geometry(image.shape, tf, mask)
    out = image.copy()
    if geo is None:
        return out
    x0, y0, x1, y1 = geo.box
    warped = cv2.warpAffine(crop_frame, geo.c2roi, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT)
    # (OpenCV's weighted blend rounds to nearest, as the float formula with + 0.5 did, at a
    # third of numpy's cost)
    out[y0:y1, x0:x1] = cv2.blendLinear(warped, out[y0:y1, x0:x1], geo.alpha, geo.rest)
    return out
    m = tf.c2o.copy()
    m[0, 2] -= x0
    m[1, 2] -= y0
    size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(crop_frame, m[:2], size, flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT)
    alpha = cv2.warpAffine(mask.astype(np.float32), m[:2], size, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT)[:, :, None]
    roi = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(alpha * warped + (1 - alpha) * roi + 0.5, 0, 255).astype(np.uint8)
    return out
