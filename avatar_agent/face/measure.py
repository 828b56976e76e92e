"""Face measurements on rendered frames with an independent tracker (FaceMesh), for benches/tests.

Everything here reads FaceMesh landmarks of *pixels* (never the motion that made them), so it
measures what a viewer sees.  Distances are divided by the inter-ocular distance (IOD: between the
iris centres) of a reference frame, so figures are comparable across portraits and resolutions.

* :data:`EXPRESSION_LANDMARKS`: the 40 landmarks an expression moves (brows, lids, lips, chin).
* :func:`expression_change`: landmark motion between two frames after removing head motion
  (similarity fit on rigid landmarks), as a fraction of IOD.
* :func:`eye_opening` / :func:`count_blinks`: lid gap per frame and blinks as dips below a
  fraction of its median.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avatar_agent.face.landmarks import FaceAnalyzer, FaceError, default_analyzer

IRIS_L, IRIS_R = 468, 473

BROWS = (70, 63, 105, 66, 107, 300, 293, 334, 296, 336)
LIDS = (159, 145, 386, 374, 160, 144, 387, 373)
MOUTH_CORNERS = (61, 291)
LIPS = (0, 17, 13, 14, 37, 267, 84, 314, 40, 270, 91, 321, 78, 308)
JAW = (152, 148, 377, 172, 397, 205, 425)
EXPRESSION_LANDMARKS = BROWS + LIDS + MOUTH_CORNERS + LIPS + JAW[:6]
"""40 FaceMesh landmarks that expressions move (10 brow, 8 lid, 16 lip, 6 chin/jaw/cheek)."""
assert len(EXPRESSION_LANDMARKS) == 40 and len(set(EXPRESSION_LANDMARKS)) == 40

RIGID = (168, 6, 197, 195, 5, 4, 1, 33, 133, 362, 263, 234, 454, 127, 356)
"""Landmarks no expression moves much (nose, eye corners, the face's sides at eye level): the
head frame.  (Not the forehead: the tracker drags it along with raised brows.)"""

REGIONS: dict[str, tuple[int, ...]] = {
    "brows": BROWS, "lids": LIDS[:4], "corners": MOUTH_CORNERS,
}
"""Defining regions of an expression: brow arch, lid midpoints, lip corners."""


def iod(points: np.ndarray) -> float:
    """Inter-ocular distance (iris centre to iris centre) of [478, 2|3] landmarks, pixels."""
    p = np.asarray(points, dtype=np.float64)
    return float(np.linalg.norm(p[IRIS_R, :2] - p[IRIS_L, :2]))


def track(frame: np.ndarray, analyzer: FaceAnalyzer | None = None) -> np.ndarray | None:
    """FaceMesh landmarks [478, 2] (pixels) of a rendered RGB frame, or None if no face."""
    a = analyzer or default_analyzer()
    try:
        return a.analyse(frame).points[:, :2].astype(np.float64)
    except FaceError:
        return None


def align(points: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``points`` [478, 2] mapped onto ``ref`` by the similarity transform that best fits the
    rigid landmarks (least squares): what is left is expression, not head motion."""
    a, b = np.asarray(points)[list(RIGID), :2], np.asarray(ref)[list(RIGID), :2]
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = a - ma, b - mb
    u, s, vt = np.linalg.svd(ca.T @ cb)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, d]) @ vt
    scale = (s * [1.0, d]).sum() / (ca ** 2).sum()
    return (np.asarray(points)[:, :2] - ma) @ rot * scale + mb


@dataclass(frozen=True)
class ExpressionChange:
    """Landmark motion from a reference frame, as fractions of the reference IOD.

    Attributes:
        mean: mean displacement of the 40 expression landmarks.
        regions: motion per region of :data:`REGIONS`: the mean displacement of its more-moved
            half of landmarks (the raised inner half of a sad brow, the raised corner of a
            one-sided smirk).
    """

    mean: float
    regions: dict[str, float]


def expression_change(points: np.ndarray, ref: np.ndarray) -> ExpressionChange:
    """How far the expression in ``points`` is from ``ref`` (both [478, 2] landmarks)."""
    p = align(points, ref)
    d = np.linalg.norm(p - np.asarray(ref)[:, :2], axis=1) / iod(ref)
    regions = {name: float(np.sort(d[list(idx)])[len(idx) // 2:].mean())
               for name, idx in REGIONS.items()}
    return ExpressionChange(mean=float(d[list(EXPRESSION_LANDMARKS)].mean()), regions=regions)


def expression_distance(a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> float:
    """Mean distance of the 40 expression landmarks between frames ``a`` and ``b`` (aligned on
    ``ref``), as a fraction of ``ref``'s IOD."""
    pa, pb = align(a, ref), align(b, ref)
    idx = list(EXPRESSION_LANDMARKS)
    return float(np.linalg.norm(pa[idx] - pb[idx], axis=1).mean() / iod(ref))


def eye_opening(points: np.ndarray) -> float:
    """Mean lid gap of both eyes (159–145, 386–374) over the IOD of the same frame."""
    p = np.asarray(points, dtype=np.float64)
    gap = 0.5 * (np.linalg.norm(p[159, :2] - p[145, :2]) + np.linalg.norm(p[386, :2] - p[374, :2]))
    return float(gap / iod(p))


def count_blinks(opening: np.ndarray, threshold: float = 0.55) -> int:
    """Blinks in an eye-opening series: runs of frames below ``threshold`` × its median
    (frames the tracker lost, NaN, count as open)."""
    x = np.asarray(opening, dtype=np.float64)
    med = float(np.nanmedian(x))
    closed = np.nan_to_num(x, nan=med) < threshold * med
    return int(np.count_nonzero(closed[1:] & ~closed[:-1]) + int(closed[0]))
