"""The embedded renderer: keypoint-driven warp of the portrait's face crop.

No network.  ``prepare`` finds the face mesh (478 FaceMesh points) in the crop and precomputes
everything that depends only on the avatar; ``render`` does, per frame, O(vertices) math and one
image remap:

1. Driven mesh.  Each mesh vertex v (frontalised canonical position V_c[v]) moves like a keypoint:
   ``V_d = s·(O + V_c·R + W·(δ − δ_rest·R0ᵀ·R)) + [tx, ty]`` where W [478, 21] spreads the 21
   keypoints' expression displacement over the mesh (normalised inverse-distance weights on
   *geodesic* mesh distances, so the upper lip ignores the lower lip across the mouth slit and the
   lids ignore each other across the eye; fixed anchor vertices — nose bridge, forehead, temples,
   cheekbones — keep rigid parts rigid), and O [478, 3] is a constant that makes the rest
   motion give back the source mesh exactly (V_c has its deep face sides flattened, see
   :func:`soft_depth`).  Keypoint vertices land on transform_keypoints' positions (exactly
   for all but the deep jaw corners).
2. Dense field.  Vertex displacements (pixels) are spread over a low-res grid by barycentric
   interpolation on a Delaunay triangulation of the mesh plus three rings around the face (which
   copy a decaying fraction of the nearest face-outline vertex's displacement: hair and neck
   follow the head softly) plus fixed points on the crop border (no tearing, no seams at
   paste-back).
3. Backward map.  The forward field D is inverted on the grid with Newton steps (q + D(q) = p),
   upsampled to full resolution and applied with one ``cv2.remap``.
4. Overlays.  Lips parted beyond the portrait's own gap → a procedural mouth cavity (dark throat,
   a band of upper teeth if the portrait showed none) inside the driven inner-lip polygon; lips
   pressed tighter than in the portrait → a dark seam where its teeth were squeezed; lids closed
   beyond the portrait's own opening → the aperture shows the unsqueezed eye moving with the
   lower lid (the upper lid occludes it) and, near closure, lid skin sampled above the eye.

Coordinates (motion/space.py, embedded profile): canonical = crop pixels normalised to [-1, 1]
(``u = 2·x/S − 1``), x right, y down, z = FaceMesh depth in the same units (away from viewer).
"""

from __future__ import annotations

import math
from typing import Literal

import cv2
import numpy as np

from avatar_agent.face.crop import (CropTransform, crop_transform, feather_mask, paste_back,
                                    paste_geometry, warp_crop)
from avatar_agent.face.landmarks import FaceAnalyzer, detect_landmarks, to_rgb_uint8
from avatar_agent.motion import space
from avatar_agent.types import Avatar, Profile

# FaceMesh topology used here (indices into the 478 points) -----------------------------------
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
             377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67,
             109)
INNER_LIP_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)     # left corner → right
INNER_LIP_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
EYE_L = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
EYE_R = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249)
IRIS_L = tuple(range(468, 473))
IRIS_R = tuple(range(473, 478))
ANCHORS = (168, 6, 197, 195, 5, 10, 151, 9, 8, 109, 338, 67, 297, 103, 332, 54, 284, 21, 251,
           127, 356, 234, 454, 116, 345, 123, 352, 143, 372)
"""Vertices that no expression keypoint moves (rigid skull: forehead, nose bridge, temples,
cheekbones)."""

RINGS = ((1.2, 0.85, 0.35), (1.5, 0.5, 0.0), (1.9, 0.18, 0.0))
"""(radius factor about the face centre, fraction of the nearest outline vertex's head motion,
fraction of its expression motion): hair and neck follow the head, only the skin right next to
the face follows the jaw."""

_LIP_UP, _LIP_LO = np.array(INNER_LIP_UPPER), np.array(INNER_LIP_LOWER)   # (for fancy indexing)
_EYE_L, _EYE_R = np.array(EYE_L), np.array(EYE_R)
_MOUTH_POLY = np.array(INNER_LIP_UPPER + INNER_LIP_LOWER[::-1][1:-1])

OUTER_LIPS = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181,
              91, 146)
"""Outer lip contour (left corner, upper lip, right corner, lower lip)."""

Output = Literal["crop", "image"]


# --------------------------------------------------------------------------------------------
# Geometry helpers (pure functions)
# --------------------------------------------------------------------------------------------


def rotation_to_angles(rot: np.ndarray) -> tuple[float, float, float]:
    """(pitch, yaw, roll) in degrees of R = (Rz·Ry·Rx)ᵀ (inverse of space.rotation_matrix)."""
    m = rot.T
    yaw = np.degrees(np.arcsin(np.clip(-m[2, 0], -1.0, 1.0)))
    pitch = np.degrees(np.arctan2(m[2, 1], m[2, 2]))
    roll = np.degrees(np.arctan2(m[1, 0], m[0, 0]))
    return float(pitch), float(yaw), float(roll)


PITCH_BIAS_DEG = 11.0
"""FaceMesh's forehead(10)→chin(152) line leans back by about this much in a camera-facing face
(measured on avatars/default.png, which looks straight into the camera); subtracted so that a
frontal portrait reads pitch ≈ 0."""
# Largest residual |q + D(q) − p| (px) the cheap fixed-point inversion may leave (see _invert).
INVERT_TOL = 0.05
# Grid points an unfolding round reaches past its bad points (see _unfold): the blend weight's
# dilation (1) + its σ 1.5 blur (OpenCV's float kernel: radius 6) = 7; the field's σ 2 blur
# reads 8 points.
UNFOLD_REACH = 8


def _rotation(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """:func:`space.rotation_matrix` for one pose, written out: the general (batched) one costs
    a few tens of µs of array set-up per frame."""
    p, y, r = np.radians(pitch), np.radians(yaw), np.radians(roll)
    cp, sp, cy, sy, cr, sr = np.cos(p), np.sin(p), np.cos(y), np.sin(y), np.cos(r), np.sin(r)
    # (Rz·Ry·Rx)ᵀ
    return np.array([[cr * cy, sr * cy, -sy],
                     [cr * sy * sp - sr * cp, sr * sy * sp + cr * cp, cy * sp],
                     [cr * sy * cp + sr * sp, sr * sy * cp - cr * sp, cy * cp]])


def estimate_head_rotation(mesh: np.ndarray) -> np.ndarray:
    """Head rotation R0 [3, 3] (row-vector convention: observed ≈ frontal @ R0) from the mesh.

    The face frame is built from the mesh itself: x = mean left→right direction of symmetric
    landmark pairs, y = forehead→chin midline made orthogonal to x, z = x × y, and the pitch is
    corrected by :data:`PITCH_BIAS_DEG`.  With no reference head to calibrate against, pitch
    keeps a small person-dependent bias; it cancels out because poses are always applied
    relative to this rest estimate.
    """
    pairs = ((33, 263), (133, 362), (234, 454), (61, 291), (127, 356), (172, 397), (70, 300))
    ax = sum(mesh[right] - mesh[left] for left, right in pairs)
    ax = ax / np.linalg.norm(ax)
    ay = mesh[152] - mesh[10]
    ay = ay - ax * (ay @ ax)
    ay = ay / np.linalg.norm(ay)
    az = np.cross(ax, ay)
    pitch, yaw, roll = rotation_to_angles(np.stack([ax, ay, az]))
    return space.rotation_matrix(pitch - PITCH_BIAS_DEG, yaw, roll)


def soft_depth(z: np.ndarray, knee: float, slope: float = 0.3) -> np.ndarray:
    """Compress depths behind ``knee`` (the outer eye corners' depth) by ``slope``.

    A warp cannot hide the far cheek when the head turns: with true depth the face outline
    (deep, so it barely moves) is overtaken by the cheek in front of it and the warp field folds
    (torn, jagged outline).  Flattening the deep sides keeps the field one-to-one at ±20° yaw at
    the cost of a little parallax at the silhouette.
    """
    return np.where(z > knee, knee + (z - knee) * slope, z)


def _mesh_edges() -> np.ndarray:
    """[E, 2] FaceMesh tessellation edges (+ iris rings tied to their eye contour)."""
    from mediapipe.python.solutions import face_mesh_connections as fmc  # bundled with landmarks

    edges = {tuple(sorted(e)) for e in fmc.FACEMESH_TESSELATION}
    for iris, eye in ((IRIS_L, EYE_L), (IRIS_R, EYE_R)):
        for i in iris:
            for j in eye:
                edges.add((j, i) if j < i else (i, j))
    return np.array(sorted(edges), dtype=np.int64)


BROW_LINES = (((70, 63, 105, 66, 107), (46, 53, 52, 65, 55), "brow_outer_l", "brow_inner_l"),
              ((300, 293, 334, 296, 336), (276, 283, 282, 295, 285), "brow_outer_r", "brow_inner_r"))
"""Per brow: upper and lower contour (outer → inner) and its outer/inner keypoints."""


def contour_sources(mesh_c: np.ndarray) -> dict[int, np.ndarray]:
    """Mesh vertices that move as part of a keypoint's feature, not as its neighbours: {vertex:
    coefficients [21] over the keypoints' expression displacements}.

    * Brow contours follow their outer and inner keypoints, interpolated along the brow, so a
      brow rises as a whole arch (not as two pinched tents at its ends).
    * Lid margins follow their lid keypoint scaled by the eye's local opening over its opening
      at the keypoint, so a closing lid stays an arc and meets the other lid everywhere at once
      (and an emotion's lid raise widens the whole eye).
    """
    out: dict[int, np.ndarray] = {}
    for upper, lower, outer, inner in BROW_LINES:
        xo, xi = mesh_c[upper[0], 0], mesh_c[upper[-1], 0]
        for v in upper + lower:
            t = float(np.clip((mesh_c[v, 0] - xo) / (xi - xo), 0.0, 1.0))
            c = np.zeros(space.N_KP)
            c[space.KP[outer]], c[space.KP[inner]] = 1.0 - t, t
            out[v] = c
    for eye, side in ((EYE_L, "l"), (EYE_R, "r")):
        up_line, lo_line = eye[1:8], eye[9:16]
        kp_up, kp_lo = space.KP[f"upper_lid_{side}"], space.KP[f"lower_lid_{side}"]
        mu, ml = mesh_c[list(eye[0:9]), :2], mesh_c[list(eye[8:]) + [eye[0]], :2]
        ou, ol = np.argsort(mu[:, 0]), np.argsort(ml[:, 0])

        def opening(x: float, mu: np.ndarray = mu, ml: np.ndarray = ml,  # this eye's lines
                    ou: np.ndarray = ou, ol: np.ndarray = ol) -> float:
            return float(np.interp(x, ml[ol, 0], ml[ol, 1]) - np.interp(x, mu[ou, 0], mu[ou, 1]))

        centre = max(opening(float(mesh_c[space.MESH_INDEX[kp_up], 0])), 1e-6)
        for line, k in ((up_line, kp_up), (lo_line, kp_lo)):
            for v in line:
                c = np.zeros(space.N_KP)
                c[k] = float(np.clip(opening(float(mesh_c[v, 0])) / centre, 0.0, 1.0))
                out[v] = c
    for k, v in enumerate(space.MESH_INDEX):          # keypoints are exact
        c = np.zeros(space.N_KP)
        c[k] = 1.0
        out[int(v)] = c
    return out


def geodesic_weights(mesh_c: np.ndarray, sigma: float = 0.16, eps: float = 1e-4,
                     null: float = 20.0) -> np.ndarray:
    """W [478, 21]: how much each vertex follows each keypoint's expression displacement.

    Normalised inverse-square geodesic distance with a Gaussian cut-off from every source vertex
    (the keypoints and the :func:`contour_sources`, each carrying its coefficients over the
    keypoints); anchors and a constant ``null`` weight (both meaning "stay") make far vertices
    stay put.  Distances run along the mesh surface, so points across the mouth slit or the eye
    opening are far apart.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    n = mesh_c.shape[0]
    e = _mesh_edges()
    length = np.linalg.norm(mesh_c[e[:, 0]] - mesh_c[e[:, 1]], axis=1) + 1e-6
    graph = coo_matrix((length, (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    contour = contour_sources(mesh_c)
    src_v = np.array(list(contour), dtype=np.int64)
    coef = np.stack([contour[int(v)] for v in src_v])                       # [C, 21]
    sources = np.concatenate([src_v, np.array(ANCHORS)])
    g = dijkstra(graph, directed=False, indices=sources)                     # [C + A, 478]
    unreachable = ~np.isfinite(g)
    if unreachable.any():                                                    # fall back to 3-D
        eu = np.linalg.norm(mesh_c[sources][:, None] - mesh_c[None], axis=-1)
        g[unreachable] = eu[unreachable]
    w = np.exp(-(g / sigma) ** 2) / (g ** 2 + eps)                           # [C + A, 478]
    w = w / (w.sum(0, keepdims=True) + null)
    w_kp = w[: len(src_v)].T @ coef                                          # [478, 21]
    w_kp[src_v] = coef                                                       # exact at sources
    w_kp[list(ANCHORS)] = 0.0
    return w_kp


def neutralise(kp: np.ndarray) -> np.ndarray:
    """Neutral (mouth closed) version of frontalised keypoints [21, 3].

    The portrait's lip gap (inner lower − inner upper, y) is attributed to the jaw: the lower lip
    moves up by the whole gap, the chin by 90 % of it and the jaw corners by 50 %, so that
    ``lip_opening(exp=0) == 0``.  Eyes and brows are taken as they are (portraits have them open
    and relaxed).
    """
    k = kp.copy()
    gap = max(0.0, float(k[space.KP["lower_lip_inner"], 1] - k[space.KP["upper_lip_inner"], 1]))
    for name, f in (("lower_lip_inner", 1.0), ("lower_lip_outer", 1.0), ("lower_lip_outer_l", 1.0),
                    ("lower_lip_outer_r", 1.0), ("chin", 0.9), ("jaw_l", 0.5), ("jaw_r", 0.5)):
        k[space.KP[name], 1] -= f * gap
    # exactly closed, whatever FaceMesh's rounding
    k[space.KP["lower_lip_inner"], 1] = k[space.KP["upper_lip_inner"], 1]
    return k


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre ``image`` on a black square and resize it to size × size.

    Returns the uint8 [size, size, 3] picture and the 3×3 map image pixel → picture pixel.
    """
    h, w = image.shape[:2]
    side = max(h, w)
    k = size / side
    ox, oy = (side - w) / 2 * k, (side - h) / 2 * k
    # pixel-centre convention, as cv2.resize
    m = np.array([[k, 0, ox + 0.5 * k - 0.5], [0, k, oy + 0.5 * k - 0.5], [0, 0, 1.0]])
    if h == w == size:
        return image.copy(), np.eye(3)
    src, pre = image, np.eye(3)
    if k < 0.5:  # warpAffine has no area filter: shrink big portraits with INTER_AREA first
        src = cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))),
                         interpolation=cv2.INTER_AREA)
        sx, sy = src.shape[1] / w, src.shape[0] / h
        pre = np.array([[1 / sx, 0, 0.5 / sx - 0.5], [0, 1 / sy, 0.5 / sy - 0.5], [0, 0, 1.0]])
    out = cv2.warpAffine(src, (m @ pre)[:2], (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return out, m


def _barycentric_grid(points: np.ndarray,
                      grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Delaunay-triangulate ``points`` [P, 2]; for each grid point [G, 2] return the triangle's
    vertex indices [G, 3] and barycentric weights [G, 3] (nearest-vertex for points outside),
    and the triangles [T, 3]."""
    from scipy.spatial import Delaunay

    tri = Delaunay(points)
    simplex = tri.find_simplex(grid)
    inside = simplex >= 0
    idx = np.zeros((grid.shape[0], 3), dtype=np.int64)
    bary = np.zeros((grid.shape[0], 3), dtype=np.float64)
    s = simplex[inside]
    t = tri.transform[s]                                                     # [n, 3, 2]
    b = np.einsum("nij,nj->ni", t[:, :2], grid[inside] - t[:, 2])            # [n, 2]
    bary[inside] = np.concatenate([b, 1 - b.sum(1, keepdims=True)], axis=1)
    idx[inside] = tri.simplices[s]
    if (~inside).any():
        d = np.linalg.norm(grid[~inside][:, None] - points[None], axis=-1)
        idx[~inside, 0] = d.argmin(1)
        bary[~inside, 0] = 1.0
    return idx, bary, tri.simplices


def _poly_mask(shape: tuple[int, int], poly: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
    return mask.astype(bool)


def mouth_palette(crop: np.ndarray, mesh: np.ndarray) -> dict[str, np.ndarray | float]:
    """Colours of a synthesised mouth interior, taken from the portrait itself.

    * ``lip``: median colour of the lips (outer minus inner contour) — the hue of everything
      inside the mouth (cavity walls and tongue are the same mucosa);
    * ``shadow``: the darkest tenth of the face's skin — how this picture renders shade
      (black-and-white photos, statues and paintings have their own);
    * ``cavity`` [2, 3]: lip edge → throat: the lip colour darkened towards the shadow colour;
    * ``teeth``: the sclera's bright pixels (the picture's own "white", so teeth match its
      white balance, grain and grey) a little darker and warmer towards the lips;
    * ``tongue``: the lip colour, darker;
    * ``light``: horizontal lighting slope (−1 light from the image-left … +1 from the right),
      from the brightness of the two cheeks.

    On a grayscale portrait every colour is grey; on a colour one the hues lie between the lips'
    and the shadows'.
    """
    h, w = crop.shape[:2]
    img = crop.astype(np.float32)
    lips = _poly_mask((h, w), mesh[list(OUTER_LIPS)]) & ~_poly_mask(
        (h, w), mesh[list(INNER_LIP_UPPER) + list(INNER_LIP_LOWER[::-1][1:-1])])
    lip = np.median(img[lips], axis=0) if lips.sum() > 8 else np.array([150, 90, 90], np.float32)
    face = _poly_mask((h, w), mesh[list(FACE_OVAL)]) & ~lips
    for eye in (EYE_L, EYE_R):
        face &= ~_poly_mask((h, w), mesh[list(eye)])
    skin = img[face]
    lum = skin.mean(-1)
    shadow = (np.median(skin[lum <= np.percentile(lum, 10)], axis=0) if skin.size
              else lip * 0.4)
    # the sclera: bright pixels inside the eyes (not the iris)
    eyes = np.zeros((h, w), bool)
    for eye in (EYE_L, EYE_R):
        eyes |= _poly_mask((h, w), mesh[list(eye)])
    px = img[eyes]
    if px.shape[0] >= 8:
        white = np.median(px[px.mean(-1) >= np.percentile(px.mean(-1), 75)], axis=0)
    else:
        white = np.percentile(skin, 95, axis=0) if skin.size else np.full(3, 200, np.float32)
    # teeth are a little darker than the sclera and pick up the mouth's own colour
    teeth = 0.88 * white + 0.12 * lip
    teeth = teeth * max(1.0, 1.1 * float(lip.mean()) / max(float(teeth.mean()), 1.0))
    teeth = np.clip(teeth * 0.92, 0, 255)        # in the mouth's shade, never brighter than white
    teeth = teeth.mean() + 0.4 * (teeth - teeth.mean())   # enamel: the picture's tint, muted
    # cavity: from darkened lips at the edge to a deep shadow in the throat, with the hue of
    # the lips (mucosa) fading into the hue of the picture's shadows
    edge = 0.38 * lip + 0.04 * shadow
    throat = 0.07 * lip + 0.06 * shadow
    tongue = 0.42 * lip + 0.04 * shadow
    sides = []
    for idx in ((50, 101, 205), (280, 330, 425)):      # image-left, image-right cheek
        q = np.clip(np.round(mesh[list(idx)]).astype(int), 0, h - 1)
        sides.append(float(img[q[:, 1], q[:, 0]].mean()))
    light = float(np.clip((sides[1] - sides[0]) / max(sum(sides) / 2, 1.0) * 3.0, -1.0, 1.0))
    return {"lip": lip, "shadow": shadow, "cavity": np.stack([edge, throat]).astype(np.float32),
            "teeth": teeth.astype(np.float32), "tongue": tongue.astype(np.float32),
            "light": light}


def _blend(roi: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """roi ← roi·(1 − α) + colour·α in place, rounded: uint8 roi [h, w, 3], α float32 [h, w],
    colour [3] or [h, w, 3]."""
    paint = np.empty_like(roi)
    paint[...] = np.clip(np.asarray(colour) + 0.5, 0, 255)    # (truncates: rounds)
    alpha = np.asarray(alpha, np.float32)
    rest = 1.0 - alpha
    roi[...] = cv2.blendLinear(roi, paint, rest, alpha)      # (one OpenCV call, GIL released)


# --------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------


class WarpRenderer:
    """Embedded-profile renderer: warps the portrait's crop with the 21 driven keypoints.

    Args:
        size: output crop side in pixels (the crop is taken at this size).
        output: "crop" → frames are the size×size face crop; "image" → frames are the full
            portrait with the animated crop pasted back through a feathered mask, letterboxed
            (centred, black bars) and resized to size×size.
        grid_step: the dense warp field is computed every ``grid_step`` pixels and upsampled.
        newton_steps: Newton iterations when inverting the forward warp field.
        fixed_steps: cheap fixed-point iterations tried first (0: Newton only).
        analyzer: face analyzer to use (default: the process-wide cached one).
    """

    profile: Profile = "embedded"

    def __init__(self, size: int = 512, output: Output = "crop", grid_step: int | None = None,
                 newton_steps: int = 3, fixed_steps: int = 3,
                 analyzer: FaceAnalyzer | None = None) -> None:
        if size < 64:
            raise ValueError(f"WarpRenderer size must be ≥ 64 px, got {size}")
        if output not in ("crop", "image"):
            raise ValueError(f"output must be 'crop' or 'image', got {output!r}")
        self.size = int(size)
        self.output: Output = output
        # the field grid must tile the crop exactly (the upsampling assumes size = g · step)
        step = int(grid_step or max(2, size // 128))
        while self.size % step:
            step -= 1
        self.grid_step = step
        self.newton_steps = int(newton_steps)
        self.fixed_steps = int(fixed_steps)
        self._analyzer = analyzer

    # ---------------------------------------------------------------------------------- prepare

    def prepare(self, image: np.ndarray) -> Avatar:
        """Analyse a portrait once: landmarks, crop, pose, neutral keypoints, warp tables.

        Raises:
            FaceError: no usable face in ``image``.
        """
        lm = detect_landmarks(image, self._analyzer)
        rgb = to_rgb_uint8(image)
        S = self.size
        tf = crop_transform(lm.points, size=S)
        crop = warp_crop(rgb, tf)
        mesh_px = tf.to_crop(lm.points.astype(np.float64))                  # [478, 3] crop px
        mesh_n = mesh_px * (2.0 / S)
        mesh_n[:, :2] -= 1.0                                                 # canonical units

        # rest pose: rotation from the mesh frame, pivot at the head centre (x, y: mesh centroid;
        # z: depth of the face outline's sides, roughly where the neck pivots), scale 1
        rot0 = estimate_head_rotation(mesh_n)
        pitch0, yaw0, roll0 = rotation_to_angles(rot0)
        # (the neck pivots behind the ears: a third of a face width behind the outline's sides;
        # a shallower pivot makes yaw fold the far cheek over the face outline)
        width = float(np.linalg.norm(mesh_n[454, :2] - mesh_n[234, :2]))
        pivot = np.array([mesh_n[:468, 0].mean(), mesh_n[:468, 1].mean(),
                          mesh_n[[234, 454, 127, 356], 2].mean() + width / 3])
        mesh_true = mesh_n - pivot                                           # about the pivot
        mesh_c = mesh_true @ rot0.T                                          # frontalised
        mesh_c[:, 2] = soft_depth(mesh_c[:, 2], mesh_c[[33, 263], 2].mean())
        # what the softened depth changes at the rest pose; added back so that the rest motion
        # reproduces the portrait exactly (head turns are applied to the softened mesh)
        rest_offset = mesh_true - mesh_c @ rot0                              # [478, 3]
        kp_front = mesh_c[space.MESH_INDEX]
        kp_c = neutralise(kp_front)
        # so that transform_keypoints(kp_c, rest) == the portrait's 21 keypoints exactly
        delta_rest = mesh_true[space.MESH_INDEX] - kp_c @ rot0               # [21, 3]
        rest = np.zeros(space.DIM, dtype=np.float64)
        rest[space.EXP] = delta_rest.reshape(-1)
        rest[space.SCALE] = 1.0
        rest[64:66] = pivot[:2]
        rest[space.POSE] = (pitch0, yaw0, roll0)

        extra = self._tables(crop, mesh_px, mesh_c, delta_rest, rot0)
        extra["rest_offset"] = rest_offset
        # output="image": paste straight into the letterboxed size×size portrait
        base, to_box = letterbox(rgb, S)
        c2b = to_box @ tf.c2o
        extra.update(crop_tf=tf, landmarks=lm, warnings=list(lm.warnings),
                     mask=feather_mask(S, 0, max(2, S // 32)), image_base=base,
                     crop_to_base=CropTransform(o2c=np.linalg.inv(c2b), c2o=c2b, size=S))
        return Avatar(profile="embedded", image=rgb, crop=crop, crop_to_image=tf.c2o.copy(),
                      kp_canonical=kp_c.astype(np.float32), rest_motion=rest.astype(np.float32),
                      extra=extra)

    def _tables(self, crop: np.ndarray, mesh_px: np.ndarray, mesh_c: np.ndarray,
                delta_rest: np.ndarray, rot0: np.ndarray) -> dict:
        """Everything per-avatar the per-frame path needs."""
        S, st = self.size, self.grid_step
        src = mesh_px[:, :2]
        # rings around the face: each ring point copies a fraction of an outline vertex's motion
        oval = np.array(FACE_OVAL)
        centre = src[oval].mean(0)
        # each extended point reads up to two entries of the per-frame stacked displacement
        # table [D_full (478) ; D_expression (478)] with fixed weights
        n = len(src)
        ext_pts = [src]
        ext_idx = [np.stack([np.arange(n), np.arange(n)], 1)]
        ext_w = [np.stack([np.ones(n), np.zeros(n)], 1)]
        margin = 0.04 * S
        for radius, f_head, f_exp in RINGS:
            p = centre + (src[oval] - centre) * radius
            ok = ((p > margin) & (p < S - margin)).all(1)
            ext_pts.append(p[ok])
            ext_idx.append(np.stack([oval[ok], oval[ok] + n], 1))
            # f_head·D_full + (f_exp − f_head)·D_exp = f_head·D_rigid + f_exp·D_exp
            ext_w.append(np.tile([f_head, f_exp - f_head], (ok.sum(), 1)))
        k = 12
        border = np.linspace(0, S, k + 1)[:-1]
        bpts = np.concatenate([np.stack([border, np.zeros(k)], 1),
                               np.stack([np.full(k, S), border], 1),
                               np.stack([S - border, np.full(k, S)], 1),
                               np.stack([np.zeros(k), S - border], 1)]) - 0.5
        ext_pts.append(bpts)
        ext_idx.append(np.zeros((len(bpts), 2), dtype=np.int64))
        ext_w.append(np.zeros((len(bpts), 2)))
        pts = np.concatenate(ext_pts)
        eidx = np.concatenate(ext_idx)                                         # [E, 2]
        ew = np.concatenate(ext_w)                                             # [E, 2]

        g = S // st
        off = (st - 1) / 2.0
        gx, gy = np.meshgrid(np.arange(g) * st + off, np.arange(g) * st + off)
        grid = np.stack([gx.ravel(), gy.ravel()], 1)                          # [G², 2] pixels
        idx, bary, triangles = _barycentric_grid(pts, grid)
        # compose: grid ← 3 extended points ← 2 table entries each, as one sparse matrix
        from scipy.sparse import csr_matrix

        gidx = eidx[idx].reshape(len(grid), 6)                                # [G², 6]
        gw = (bary[:, :, None] * ew[idx]).reshape(len(grid), 6)
        rows = np.repeat(np.arange(len(grid)), 6)
        grid_mat = csr_matrix((gw.ravel().astype(np.float32), (rows, gidx.ravel())),
                              shape=(len(grid), 2 * n))
        grid_mat.eliminate_zeros()          # (mesh and border points' zero weights: per-frame work)

        return {
            "mesh_px": mesh_px.astype(np.float32),
            "mesh_c": mesh_c,
            "rot0": rot0,
            "delta_rest": delta_rest,
            "weights": geodesic_weights(mesh_c),
            "grid_mat": grid_mat,                                             # [G², 956]
            "grid_px": np.stack([gx, gy], -1).astype(np.float32),             # [g, g, 2]
            # remap's 4-channel path is faster than its 3-channel one, even with the conversion
            "crop_rgba": cv2.cvtColor(crop, cv2.COLOR_RGB2RGBA),
            "warp_points": pts.astype(np.float32),                            # mesh+rings+border
            "triangles": triangles,                                           # [T, 3] into those
            "mouth_gap_px": self._gap(mesh_px[:, :2], 13, 14),
            "palette": mouth_palette(crop, mesh_px[:, :2]),
            "lid_rgb": self._under_eye(crop, mesh_px[:, :2]),
            "eye_gap_px": (self._gap(mesh_px[:, :2], 159, 145), self._gap(mesh_px[:, :2], 386, 374)),
        }

    @staticmethod
    def _gap(p: np.ndarray, upper: int, lower: int) -> float:
        """Signed distance lower − upper along the face's down axis (pixels) in points p [N, 2]."""
        # (scalars: three of these a frame, and numpy's per-call overhead dwarfs the maths)
        dx, dy = float(p[152, 0]) - float(p[168, 0]), float(p[152, 1]) - float(p[168, 1])
        gx, gy = float(p[lower, 0]) - float(p[upper, 0]), float(p[lower, 1]) - float(p[upper, 1])
        return (gx * dx + gy * dy) / (math.hypot(dx, dy) + 1e-9)

    # ----------------------------------------------------------------------------------- render

    def driven_mesh(self, avatar: Avatar, motion: np.ndarray) -> np.ndarray:
        """Driven mesh [478, 2] in crop pixels for one raw motion frame [70]."""
        return self._driven(avatar, motion)[0]

    def _driven(self, avatar: Avatar, motion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(driven mesh, head-motion-only mesh), each [478, 2] crop pixels."""
        return self._driven_from(avatar.extra, *self._pose(avatar, motion))

    @staticmethod
    def _pose(avatar: Avatar, motion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(motion [70] float64, head rotation [3, 3], expression offsets from the portrait's
        rest [21, 3]) — computed once per frame, shared by the mesh and the gaze."""
        ex = avatar.extra
        m = np.asarray(motion, dtype=np.float64)
        rot = _rotation(float(m[space.PITCH]), float(m[space.YAW]), float(m[space.ROLL]))
        corr = m[space.EXP].reshape(space.N_KP, 3) - ex["delta_rest"] @ ex["rot0"].T @ rot
        return m, rot, corr

    def _driven_from(self, ex: dict, m: np.ndarray, rot: np.ndarray,
                     corr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rigid = ex["rest_offset"][:, :2] + (ex["mesh_c"] @ rot[:, :2])         # [478, 2]
        expr = ex["weights"] @ corr[:, :2]                                     # [478, 2]
        half = self.size / 2.0
        full = ((m[space.SCALE] * (rigid + expr) + m[64:66] + 1.0) * half).astype(np.float32)
        head = ((m[space.SCALE] * rigid + m[64:66] + 1.0) * half).astype(np.float32)
        return full, head

    def render(self, avatar: Avatar, motion: np.ndarray, output: Output | None = None) -> np.ndarray:
        """uint8 frames for raw motion [B, 70] (or [70]).

        Returns [B, size, size, 3]: the face crop (output "crop") or the letterboxed portrait
        with the crop pasted back (output "image").
        """
        if avatar.profile != "embedded" or "weights" not in avatar.extra:
            raise ValueError("WarpRenderer.render needs an avatar from WarpRenderer.prepare "
                             f"(got profile {avatar.profile!r})")
        if avatar.crop.shape[0] != self.size:
            raise ValueError(f"avatar was prepared at {avatar.crop.shape[0]} px, renderer is "
                             f"{self.size} px; prepare it with this renderer")
        m = np.asarray(motion, dtype=np.float64)
        if m.ndim == 1:
            m = m[None]
        if m.ndim != 2 or m.shape[1] != space.DIM:
            raise ValueError(f"motion must be [B, {space.DIM}], got {np.shape(motion)}")
        if not np.isfinite(m).all():
            raise ValueError("motion contains NaN or infinite values")
        out = output or self.output
        if out == "crop":
            # each frame is drawn straight into the batch (no per-frame image, no stacking copy:
            # memory traffic, not arithmetic, is much of a frame's cost beside other sessions)
            batch = np.empty((len(m), self.size, self.size, 3), np.uint8)
            for row, dst in zip(m, batch, strict=True):
                self._frame(avatar, row, dst)
            return batch
        # output "image": each crop frame pasted into the letterboxed portrait
        ex = avatar.extra
        # Kept with the avatar on first use (a crop-output session never pays for it; two
        # threads computing it at once store the same thing).
        geo = ex.get("paste")
        if geo is None:
            geo = ex["paste"] = paste_geometry(ex["image_base"].shape, ex["crop_to_base"],
                                               ex["mask"])
        crop = np.empty((self.size, self.size, 3), np.uint8)
        frames = [paste_back(self._frame(avatar, row, crop), ex["image_base"], ex["crop_to_base"],
                             ex["mask"], geo) for row in m]
        # (one frame: a view, not a 0.8 MB copy under the GIL)
        return frames[0][None] if len(frames) == 1 else np.stack(frames)

    def _frame(self, avatar: Avatar, motion: np.ndarray, frame: np.ndarray) -> np.ndarray:
        """Draw the crop-sized frame of one motion row into ``frame`` (uint8 [S, S, 3])."""
        ex = avatar.extra
        S, st = self.size, self.grid_step
        m, rot, corr = self._pose(avatar, motion)
        vd, vh = self._driven_from(ex, m, rot, corr)                          # [478, 2] each
        dv = np.concatenate([vd - ex["mesh_px"][:, :2], vd - vh])              # [956, 2] px
        if not np.abs(dv).max() > 1e-3:
            frame[...] = avatar.crop
        else:
            g = S // st
            # one channel at a time: scipy's multi-vector product is ~1.5× slower than two
            dgrid = cv2.merge([ex["grid_mat"] @ np.ascontiguousarray(dv[:, k])
                               for k in (0, 1)]).reshape(g, g, 2)              # [g, g, 2]
            q = self._invert(dgrid, ex["grid_px"])                              # [g, g, 2]
            cv2.cvtColor(cv2.remap(ex["crop_rgba"], *self._full_map(q), cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE), cv2.COLOR_RGBA2RGB,
                         dst=frame)
        self._mouth(frame, vd, ex)
        shift = self._iris_shift_from(m, corr)
        if np.abs(shift).max() > 0.2:                     # less is not visible
            self._irises(frame, vd, ex, shift)
        self._lids(frame, vd, vh, ex, avatar.crop)
        return frame

    def _full_map(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full-resolution backward map of the grid's solution q [g, g, 2] (source pixel of each
        grid point), as OpenCV's fixed-point maps (what remap converts a float map to anyway;
        converting once up front is cheaper).

        Bilinear upsampling is linear and reproduces the identity exactly between grid points,
        so q is upsampled directly (not q − grid, then + identity); only the outer
        (step − 1) / 2 pixels, where the resize clamps instead of extrapolating, get the
        identity's slope added back.
        """
        S, st = self.size, self.grid_step
        full: np.ndarray = cv2.resize(q, (S, S), interpolation=cv2.INTER_LINEAR)  # [S, S, 2]
        off = (st - 1) / 2.0
        nb = int(np.ceil(off))
        if nb:
            lo = np.arange(nb, dtype=np.float32) - np.float32(off)             # x − first point
            hi = lo[::-1] * -1                                                 # x − last point
            full[:, :nb, 0] += lo
            full[:, S - nb:, 0] += hi
            full[:nb, :, 1] += lo[:, None]
            full[S - nb:, :, 1] += hi[:, None]
        m1, m2 = cv2.convertMaps(full, None, cv2.CV_16SC2)  # type: ignore[call-overload]
        return m1, m2

    def _iris_shift(self, avatar: Avatar, motion: np.ndarray) -> np.ndarray:
        """Gaze as an iris shift (x, y) in crop pixels: the embedded space carries it in the lid
        keypoints' depth offsets (x: upper lids, y: lower lids; see motion/idle.py), relative to
        the portrait's own."""
        m, _, corr = self._pose(avatar, motion)
        return self._iris_shift_from(m, corr)

    def _iris_shift_from(self, m: np.ndarray, corr: np.ndarray) -> np.ndarray:
        kp = space.KP
        x = 0.5 * (corr[kp["upper_lid_l"], 2] + corr[kp["upper_lid_r"], 2])
        y = 0.5 * (corr[kp["lower_lid_l"], 2] + corr[kp["lower_lid_r"], 2])
        return np.array([x, y]) * (m[space.SCALE] * self.size / 2.0)

    def _irises(self, frame: np.ndarray, vd: np.ndarray, ex: dict, shift: np.ndarray) -> None:
        """Move each iris by ``shift`` px inside its eye opening (the sclera around it follows
        softly; lids and skin stay)."""
        # (runs on most frames — the idle gaze never rests — and every numpy call on these small
        # boxes costs more in overhead than in arithmetic, under the GIL: scalars are Python
        # floats, the weight is built from two coordinate vectors, in place)
        S = self.size
        sx, sy = float(shift[0]), float(shift[1])
        norm = max(math.hypot(sx, sy), 1e-9)
        for eye, first in ((_EYE_L, IRIS_L[0]), (_EYE_R, IRIS_R[0])):
            (cx, cy), *ring = vd[first:first + 5].tolist()
            r = sum(math.hypot(x - cx, y - cy) for x, y in ring) / len(ring)
            if r < 1.0:
                continue
            k = min(1.0, 0.45 * r / norm)
            shx, shy = sx * k, sy * k
            poly = vd[eye]
            (px0, py0), (px1, py1) = poly.min(0).tolist(), poly.max(0).tolist()
            # only the iris and the sclera right around it move: a box of 2 radii about it
            reach = 1.9 * r + max(abs(shx), abs(shy)) + 2
            x0, y0 = max(0, math.floor(max(px0 - 2, cx - reach))), max(0, math.floor(max(py0 - 2, cy - reach)))
            x1 = min(S, math.ceil(min(px1 + 2, cx + reach)) + 1)
            y1 = min(S, math.ceil(min(py1 + 2, cy + reach)) + 1)
            if x1 - x0 < 4 or y1 - y0 < 4:
                continue
            mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            pts = (poly - np.array([x0, y0], np.float32)) * 8
            cv2.fillPoly(mask, [pts.round().astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=3)
            xs = np.arange(x1 - x0, dtype=np.float32)
            ys = np.arange(y1 - y0, dtype=np.float32)
            # u = clip((|p − c| − r) / 0.9r, 0, 1); w = (1 − u²(3 − 2u)) · mask: 1 on the iris
            u = np.hypot((xs + (x0 - cx))[None], (ys + (y0 - cy))[:, None])
            u -= r
            u *= 1.0 / (0.9 * r)
            np.clip(u, 0.0, 1.0, out=u)
            w = u * 2.0
            w -= 3.0
            w *= u
            w *= u
            w += 1.0
            w *= mask
            w *= 1.0 / 255.0
            mx = w * -shx
            mx += xs[None]
            w *= -shy
            w += ys[:, None]
            frame[y0:y1, x0:x1] = cv2.remap(frame[y0:y1, x0:x1], mx, w, cv2.INTER_LINEAR,
                                            borderMode=cv2.BORDER_REPLICATE)

    def _derivatives(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(∂D/∂x [g, g, 2], ∂D/∂y [g, g, 2], det(I + J) [g, g]) of a grid field, per pixel:
        central differences inside, one-sided at the border."""
        k = np.float32(0.5 / self.grid_step)
        # a replicated border turns the central difference into half the one-sided one
        gx: np.ndarray = cv2.filter2D(d, -1, np.array([[-k, 0, k]], np.float32),
                          borderType=cv2.BORDER_REPLICATE)
        gy: np.ndarray = cv2.filter2D(d, -1, np.array([[-k], [0], [k]], np.float32),
                          borderType=cv2.BORDER_REPLICATE)
        gx[:, 0] *= 2
        gx[:, -1] *= 2
        gy[0] *= 2
        gy[-1] *= 2
        det = gx[..., 0] + 1
        det *= gy[..., 1] + 1
        det -= gx[..., 1] * gy[..., 0]
        return gx, gy, det

    def _jacobian(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(J [g, g, 4] = dDx/dx, dDy/dx, dDx/dy, dDy/dy;  det(I + J) [g, g]) of a grid field."""
        gx, gy, det = self._derivatives(d)
        return np.concatenate([gx, gy], -1), det

    def _unfold(self, d: np.ndarray, det: np.ndarray,
                rounds: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Relax the forward field where it (nearly) folds over itself (det(I + J) < 0.35).

        Strong head turns push the far cheek over the face outline, and a mouth closing on a
        portrait with parted lips squeezes the gap between them to nothing; a fold has no
        inverse and shows as a torn edge.  Blending towards a blurred field only where the
        Jacobian is bad keeps the mouth and eyes sharp elsewhere.  Returns the field (``d`` is
        updated in place) and its derivatives.

        Each round works on a window around the grid points with det < 0.6 (the only ones with a
        blend weight): the weight reaches UNFOLD_REACH points past them and the blur reads as far
        again, so the window gives the same field as blurring the whole grid at a small share of
        the cost (the idle mouth of such a portrait folds on most frames).
        """
        kernel = np.ones((3, 3), np.float32)
        g_h, g_w = det.shape
        det = det.copy()
        for _ in range(rounds):
            if det.min() >= 0.35:
                break
            rows = np.flatnonzero((det < 0.6).any(1))
            cols = np.flatnonzero((det < 0.6).any(0))
            m = 2 * UNFOLD_REACH + 2
            y0, y1 = max(0, int(rows[0]) - m), min(g_h, int(rows[-1]) + 1 + m)
            x0, x1 = max(0, int(cols[0]) - m), min(g_w, int(cols[-1]) + 1 + m)
            sub = d[y0:y1, x0:x1]
            bad: np.ndarray = 0.6 - det[y0:y1, x0:x1]
            bad *= 1 / 0.3
            np.clip(bad, 0.0, 1.0, out=bad)
            w: np.ndarray = cv2.GaussianBlur(cv2.dilate(bad, kernel), (0, 0), 1.5)
            w *= 1.5
            np.clip(w, 0.0, 1.0, out=w)
            soft: np.ndarray = cv2.GaussianBlur(sub, (0, 0), 2.0)
            soft -= sub                                          # d·(1 − w) + soft·w
            soft *= cv2.merge([w, w])
            sub += soft
            # the field changed at most UNFOLD_REACH − 1 points past the bad ones and its
            # determinant one point further, all 2·UNFOLD_REACH + 2 inside the window's edges;
            # the window's own derivatives are exact but for its outer ring (unless that is the
            # grid's edge), so its inner part, UNFOLD_REACH + 1 in, is written back
            _, _, sdet = self._derivatives(sub)
            iy0 = 0 if y0 == 0 else UNFOLD_REACH + 1
            ix0 = 0 if x0 == 0 else UNFOLD_REACH + 1
            iy1 = sub.shape[0] - (0 if y1 == g_h else UNFOLD_REACH + 1)
            ix1 = sub.shape[1] - (0 if x1 == g_w else UNFOLD_REACH + 1)
            det[y0 + iy0:y0 + iy1, x0 + ix0:x0 + ix1] = sdet[iy0:iy1, ix0:ix1]
        gx, gy, _ = self._derivatives(d)
        return d, gx, gy

    def _invert(self, d: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Solve q + D(q) = p on the grid (D sampled bilinearly); returns q [g, g, 2] pixels.

        Fixed-point iteration q ← p − D(q) first, on the whole grid: one 2-channel remap per
        step, and it converges wherever the field is contractive (most of the face on most
        frames).  Grid points it leaves with a residual over INVERT_TOL px (lids closing, lips
        parting, a strong turn) are solved by Newton's method from the usual start instead; its
        remaps of the field and its derivatives and the 2×2 solve cost about 5× a fixed-point
        step per point, so running Newton only there roughly halves the inversion.

        The iteration runs in grid units (u = (q − off) / step, the coordinates remap reads), so
        each step is one remap and one subtraction.
        """
        st = self.grid_step
        off = (st - 1) / 2.0
        inv = 1.0 / st
        gx, gy, det = self._derivatives(d)
        if det.min() < 0.35:
            d, gx, gy = self._unfold(d, det)
        ds = d * np.float32(inv)                                               # grid units
        idx = (p - np.float32(off)) * np.float32(inv)                         # p in grid units
        u = idx - ds
        for _ in range(self.fixed_steps):
            u = idx - cv2.remap(ds, u, None, cv2.INTER_LINEAR,  # type: ignore[call-overload]
                                borderMode=cv2.BORDER_REPLICATE)
        if self.fixed_steps:
            r = cv2.remap(ds, u, None, cv2.INTER_LINEAR,  # type: ignore[call-overload]
                          borderMode=cv2.BORDER_REPLICATE)
            r += u
            r -= idx
            np.abs(r, out=r)
            bad = np.maximum(r[..., 0], r[..., 1]) > INVERT_TOL * inv        # [g, g]
            if not bad.any():
                return self._to_px(u)
        else:
            bad = np.ones(u.shape[:2], bool)
        # (flat indices and take: boolean indexing of a [g, g, 2] array is several times slower)
        at = np.flatnonzero(bad)
        flat = u.reshape(-1, 2)
        flat[at] = self._newton(ds, gx, gy, idx.reshape(-1, 2).take(at, 0),
                                ds.reshape(-1, 2).take(at, 0))
        return self._to_px(u)

    def _newton(self, ds: np.ndarray, gx: np.ndarray, gy: np.ndarray, p: np.ndarray,
                d0: np.ndarray) -> np.ndarray:
        """Newton's method for u + D(u) = p at n points [n, 2] (grid units), from u = p − d0;
        D [g, g, 2] in grid units, its per-pixel derivatives gx, gy (the Jacobian is the same
        in grid units as in pixels)."""
        pb = p[:, None]                                                        # [n, 1, 2]
        ub = pb - d0[:, None]
        jac = cv2.merge([gx, gy])                                              # [g, g, 4]
        for _ in range(self.newton_steps):
            f = cv2.remap(ds, ub, None, cv2.INTER_LINEAR,  # type: ignore[call-overload]
                          borderMode=cv2.BORDER_REPLICATE)
            j = cv2.remap(jac, ub, None, cv2.INTER_LINEAR,  # type: ignore[call-overload]
                          borderMode=cv2.BORDER_REPLICATE)
            r = ub + f - pb                                                    # residual
            # I + J = [[a b], [c e]]  (rows: x, y output; cols: d/dx, d/dy)
            a, c, b, e = 1 + j[..., 0], j[..., 1], j[..., 2], 1 + j[..., 3]
            det_q = np.maximum(a * e - b * c, 0.15)                            # fold guard
            ub[..., 0] -= (e * r[..., 0] - b * r[..., 1]) / det_q
            ub[..., 1] -= (a * r[..., 1] - c * r[..., 0]) / det_q
        return ub[:, 0]

    def _to_px(self, u: np.ndarray) -> np.ndarray:
        """Grid units → crop pixels."""
        u *= np.float32(self.grid_step)
        u += np.float32((self.grid_step - 1) / 2.0)
        return u

    # ---------------------------------------------------------------------------------- overlays

    def _mouth(self, frame: np.ndarray, vd: np.ndarray, ex: dict) -> None:
        """Paint a mouth cavity where the lips are parted more than in the portrait."""
        gap = self._gap(vd, 13, 14)
        rest_gap = max(ex["mouth_gap_px"], 0.0)
        extra = gap - rest_gap
        if extra < -0.75 and rest_gap > 1.5:
            self._seam(frame, vd, 1.0 - max(gap, 0.0) / rest_gap, ex["palette"]["cavity"][0])
            return
        if gap < 1.5 or extra < 0.75:
            return
        # share of the opening the portrait never showed: the warp stretches the portrait's own
        # mouth interior (teeth, if it smiled) over the upper part, the cavity fills the rest
        ext_frac = extra / gap
        upper, lower, poly = vd[_LIP_UP], vd[_LIP_LO], vd[_MOUTH_POLY]
        x0, y0 = np.floor(poly.min(0)).astype(int) - 1
        x1, y1 = np.ceil(poly.max(0)).astype(int) + 2
        S = self.size
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(S, x1), min(S, y1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        h, w = y1 - y0, x1 - x0
        mask = np.zeros((h, w), np.uint8)
        shift = 3
        pts = np.round((poly - [x0, y0]) * (1 << shift)).astype(np.int32)
        cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=shift)
        # vertical position inside the opening: 0 at the upper lip, 1 at the lower lip
        xs = np.arange(x0, x1, dtype=np.float32) + 0.0
        ou = np.argsort(upper[:, 0])
        ol = np.argsort(lower[:, 0])
        top = np.interp(xs, upper[ou, 0], upper[ou, 1])
        bot = np.interp(xs, lower[ol, 0], lower[ol, 1])
        ys = np.arange(y0, y1, dtype=np.float32)[:, None]
        v = np.clip((ys - top[None]) / np.maximum(bot - top, 1.0)[None], 0.0, 1.0)   # [h, w]
        width = max(float(np.ptp(upper[:, 0])), 1.0)
        cx = float(upper[:, 0].mean())
        ux = np.clip(np.abs(xs - cx) / (width / 2), 0.0, 1.0)[None]               # 0 centre
        depth = np.clip(np.minimum(v, 1 - v) * 2, 0, 1) * (1 - ux)                # darker inside
        pal = ex["palette"]
        cav = pal["cavity"]
        col = cav[0] + (cav[1] - cav[0]) * depth[..., None]
        # the tongue: a low mound along the lower lip, seen once the mouth is well open
        open_frac = gap / width                                    # opening / mouth width
        t_alpha = float(np.clip((open_frac - 0.18) / 0.15, 0.0, 1.0))
        if t_alpha > 0:
            mound = np.clip((v - (0.72 + 0.2 * ux ** 2)) / 0.12, 0.0, 1.0) * (1 - ux ** 3)
            tm = (t_alpha * mound)[..., None]
            col += (pal["tongue"] * (0.75 + 0.25 * mound[..., None]) - col) * tm
        # a band of upper teeth just under the upper lip, shaded towards the corners, with
        # faint gaps between teeth — only if none showed, and only once the lips are apart
        # enough to uncover them
        show = (float(np.clip(2.0 * ext_frac - 1.0, 0.0, 1.0))
                * float(np.clip((open_frac - 0.04) / 0.06, 0.0, 1.0)))
        if show > 0:
            band_px = min(0.35 * gap, 0.11 * width)
            band = np.clip((top[None] + band_px - ys) / max(band_px * 0.25, 0.75), 0.0, 1.0)
            band = band * (ys >= top[None] - 1)
            tooth_w = width / 9.0
            gaps = 1 - 0.25 * np.cos(np.pi * (xs - cx) / tooth_w) ** 16
            shade = (1 - 0.7 * ux ** 2) * gaps[None]
            band = (band * show)[..., None]
            col += (pal["teeth"] * shade[..., None] - col) * band
        # the light falls on the mouth as on the face: the side away from it is darker
        side = np.clip((xs - cx) / (width / 2), -1.0, 1.0)[None, :, None]
        col = col * (1.0 + 0.25 * pal["light"] * side)
        a_v = np.clip((v - (1.0 - ext_frac)) / 0.25 + 0.5, 0.0, 1.0)             # [h, w]
        _blend(frame[y0:y1, x0:x1], mask.astype(np.float32) * (1.0 / 255.0) * a_v, col)

    def _seam(self, frame: np.ndarray, vd: np.ndarray, strength: float,
              seam_rgb: np.ndarray) -> None:
        """Lips closed more than in the portrait: the squeezed mouth interior (teeth) becomes a
        thin line; draw it as the dark seam between closed lips instead."""
        # (drawn on every idle frame of a portrait with parted lips: few numpy calls)
        line = vd[_LIP_UP] + vd[_LIP_LO]
        line *= 0.5
        (lx0, ly0), (lx1, ly1) = line.min(0).tolist(), line.max(0).tolist()
        S = self.size
        x0, y0 = max(0, math.floor(lx0) - 3), max(0, math.floor(ly0) - 3)
        x1, y1 = min(S, math.ceil(lx1) + 4), min(S, math.ceil(ly1) + 4)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        shift = 3
        line -= np.array([x0, y0], np.float32)
        line *= 1 << shift
        thick = max(1, round(S / 256))
        cv2.polylines(mask, [line.round().astype(np.int32)], False, 255, thickness=thick,
                      lineType=cv2.LINE_AA, shift=shift)
        a = cv2.GaussianBlur(mask, (3, 3), 0).astype(np.float32)
        a *= 0.85 * min(max(float(strength), 0.0), 1.0) / 255.0
        _blend(frame[y0:y1, x0:x1], a, seam_rgb)

    def _lids(self, frame: np.ndarray, vd: np.ndarray, vh: np.ndarray, ex: dict,
              crop: np.ndarray) -> None:
        """Lids closing over the eye where they closed beyond the portrait's own opening.

        The warp alone squeezes the whole eye into the shrinking aperture and stretches the
        lid margin (lashes, liner) into a thick dark band.  Instead:

        * the aperture shows the portrait's eye *unsqueezed*, moving with the lower lid, so the
          descending upper lid occludes it as a real lid does;
        * the area the upper lid has swept over (between where its margin would be at rest,
          moving with the head — ``vh`` — and where it is now) is lid skin, sampled from just
          above the lid and blurred;
        * the lid margin is a thin lash line, as on a real closed eye.
        """
        S = self.size
        src = ex["mesh_px"][:, :2]
        thick = max(1, round(S / 320))
        for (up, lo), eye, rest_gap in zip(((159, 145), (386, 374)), (EYE_L, EYE_R),
                                           ex["eye_gap_px"], strict=True):
            if rest_gap <= 0.5:
                continue
            closure = 1.0 - self._gap(vd, up, lo) / rest_gap
            if closure < 0.05:
                continue
            poly = vd[list(eye)]
            upper_d = vd[list(eye[0:9])]                         # corner, upper margin, corner
            upper_h = vh[list(eye[0:9])]
            pad = 2 + S // 128
            allp = np.concatenate([poly, upper_h])
            x0, y0 = np.floor(allp.min(0)).astype(int) - pad
            x1, y1 = np.ceil(allp.max(0)).astype(int) + pad + 1
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(S, x1), min(S, y1)
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            shift = 3
            mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            pts = np.round((poly - [x0, y0]) * (1 << shift)).astype(np.int32)
            cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=shift)
            m = (cv2.GaussianBlur(mask, (0, 0), 0.4 + S / 1024).astype(np.float32)
                 * (1.0 / 255.0))[:, :, None]
            # the eye itself, translated with the lower lid
            lower = list(eye[8:]) + [eye[0]]
            sx, sy = (vd[lower] - src[lower]).mean(0).tolist()
            # (a translation: one affine warp of the box, no coordinate grids)
            to_src = np.array([[1, 0, x0 - sx], [0, 1, y0 - sy]], np.float64)
            eye_px = cv2.warpAffine(crop, to_src, (x1 - x0, y1 - y0),
                                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
            roi = frame[y0:y1, x0:x1].astype(np.float32)
            out = roi * (1 - m) + eye_px * m
            # the swept lid: skin from above the lid margin, shifted down, over the region
            # between the margin's rest line and its current line (and the last sliver of eye)
            a_skin = float(np.clip((closure - 0.1) / 0.35, 0.0, 1.0))
            if a_skin > 0:
                lift = int(round(1.2 * rest_gap))
                sy0, sy1 = max(0, y0 - lift), max(1, y1 - lift)
                skin: np.ndarray = frame[sy0:sy1, x0:x1].astype(np.float32)
                if skin.shape[0] < y1 - y0:
                    skin = cv2.copyMakeBorder(skin, y1 - y0 - skin.shape[0], 0, 0, 0,
                                              cv2.BORDER_REPLICATE)
                skin = cv2.GaussianBlur(skin, (0, 0), 1.0 + S / 256)
                # lid skin: the portrait's under-eye skin tone, with the texture from above the
                # lid where that is skin too (not a brow, a lash line or a spectacle frame)
                lid = ex["lid_rgb"]
                # (the channel mean spelled out: numpy's reduction over a length-3 last axis is
                # ~10× slower, and this runs on every blink frame)
                lum = (skin[..., 0] + skin[..., 1] + skin[..., 2]) / 3
                like = np.exp(-((lum[..., None] - lid.mean()) / 25.0) ** 2)
                col = 0.5 * like * skin + (1.0 - 0.5 * like) * lid[None, None]
                swept = np.concatenate([upper_h, upper_d[::-1]])
                ms = np.zeros_like(mask)
                cv2.fillPoly(ms, [np.round((swept - [x0, y0]) * (1 << shift)).astype(np.int32)],
                             255, lineType=cv2.LINE_AA, shift=shift)
                near = float(np.clip((closure - 0.75) / 0.2, 0.0, 1.0))
                if near > 0:                                 # the last sliver of eye, too
                    ms = np.maximum(ms, (mask.astype(np.float32) * near).astype(np.uint8))
                ms = cv2.GaussianBlur(ms, (0, 0), 0.6 + S / 1024).astype(np.float32)
                a = ms[:, :, None] * (a_skin / 255.0)
                out = out * (1 - a) + col * a
                # the lash line along the lid margin
                lash = np.zeros_like(mask)
                cv2.polylines(lash, [np.round((upper_d - [x0, y0]) * (1 << shift)).astype(np.int32)],
                              False, 255, thickness=thick, lineType=cv2.LINE_AA, shift=shift)
                al = lash.astype(np.float32)[:, :, None] * (0.6 * a_skin / 255.0)
                out = out * (1 - al) + (0.45 * col) * al
            frame[y0:y1, x0:x1] = np.clip(out + 0.5, 0, 255).astype(np.uint8)

    @staticmethod
    def _under_eye(crop: np.ndarray, mesh: np.ndarray) -> np.ndarray:
        """Eyelid skin colour: the median of the skin just under both eyes (cheek top), a little
        darker (lids are in the brow's shade).  Sampled below the eye, not above it, where brows
        and spectacle frames are."""
        p = np.clip(np.round(mesh[[118, 119, 100, 347, 348, 329, 117, 346]]).astype(int), 0,
                    crop.shape[0] - 1)
        return np.median(crop[p[:, 1], p[:, 0]].astype(np.float32), axis=0) * 0.93
