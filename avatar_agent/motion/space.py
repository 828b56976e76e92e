"""MoDA's 70-d motion space, shared by both profiles, and the keypoint transform.

Layout of one motion frame (float32 [70], raw = denormalised; the constants are in types.py):

    [0:63]   exp   21 keypoints × (x, y, z), row-major: index = 3·k + axis
    [63]     scale
    [64:67]  t     (tx, ty, tz); tz is never used by the transform (as in LivePortrait)
    [67:70]  pitch, yaw, roll in degrees

Driven keypoints: x = s·(x_c·R + δ) + [tx, ty, 0], keypoints as row vectors, with
R = (Rz(roll)·Ry(yaw)·Rx(pitch))ᵀ (LivePortrait's convention: its ``src/utils/camera.py``).

The two profiles differ only in what the 21 keypoints are:

* ``official``: LivePortrait's implicit keypoints (learned, no fixed meaning).
* ``embedded``: 21 semantic FaceMesh landmarks, listed in :data:`EMBEDDED_KEYPOINTS`.
  Coordinates are face-crop coordinates normalised to [-1, 1] (x right, y down, crop centre = 0;
  z = FaceMesh depth in the same units, positive away from the viewer).  ``exp`` is the
  displacement of each keypoint from the avatar's *neutral* canonical position x_c (mouth closed,
  eyes open, brows relaxed), so exp = 0 is the neutral face and the portrait's own expression is
  ``Avatar.rest_motion[EXP]``.
"""

from __future__ import annotations

import numpy as np

# The layout itself is part of the motion → renderer contract and lives in types.py; re-exported
# here for the motion code that reads it as ``space.DIM`` next to the transform below.
from avatar_agent.types import DIM as DIM
from avatar_agent.types import EXP as EXP
from avatar_agent.types import N_KP as N_KP
from avatar_agent.types import PITCH as PITCH
from avatar_agent.types import POSE as POSE
from avatar_agent.types import ROLL as ROLL
from avatar_agent.types import SCALE as SCALE
from avatar_agent.types import T as T
from avatar_agent.types import YAW as YAW

# (name, FaceMesh index).  "l"/"r" are the *image* sides (image-left = the subject's right).
EMBEDDED_KEYPOINTS: tuple[tuple[str, int], ...] = (
    ("lip_corner_l", 61),
    ("lip_corner_r", 291),
    ("upper_lip_outer", 0),
    ("lower_lip_outer", 17),
    ("upper_lip_inner", 13),
    ("lower_lip_inner", 14),
    ("upper_lip_outer_l", 37),
    ("upper_lip_outer_r", 267),
    ("lower_lip_outer_l", 84),
    ("lower_lip_outer_r", 314),
    ("chin", 152),
    ("jaw_l", 172),
    ("jaw_r", 397),
    ("upper_lid_l", 159),
    ("lower_lid_l", 145),
    ("upper_lid_r", 386),
    ("lower_lid_r", 374),
    ("brow_inner_l", 107),
    ("brow_outer_l", 70),
    ("brow_inner_r", 336),
    ("brow_outer_r", 300),
)
"""The embedded profile's 21 keypoints, in exp order."""

KP = {name: i for i, (name, _) in enumerate(EMBEDDED_KEYPOINTS)}
"""Keypoint name → row in the 21 × 3 exp block."""

MESH_INDEX = np.array([idx for _, idx in EMBEDDED_KEYPOINTS], dtype=np.int64)
"""FaceMesh landmark index of each embedded keypoint."""

LIP_KEYPOINTS = tuple(KP[n] for n in (
    "lip_corner_l", "lip_corner_r", "upper_lip_outer", "lower_lip_outer", "upper_lip_inner",
    "lower_lip_inner", "upper_lip_outer_l", "upper_lip_outer_r", "lower_lip_outer_l",
    "lower_lip_outer_r"))
JAW_KEYPOINTS = tuple(KP[n] for n in ("chin", "jaw_l", "jaw_r"))
LID_KEYPOINTS = tuple(KP[n] for n in ("upper_lid_l", "lower_lid_l", "upper_lid_r", "lower_lid_r"))
BROW_KEYPOINTS = tuple(KP[n] for n in ("brow_inner_l", "brow_outer_l", "brow_inner_r", "brow_outer_r"))


def exp_index(kp: int, axis: int) -> int:
    """Index into the 70-d vector of keypoint ``kp``'s coordinate ``axis`` (0 x, 1 y, 2 z)."""
    return 3 * kp + axis


def rotation_matrix(pitch: np.ndarray | float, yaw: np.ndarray | float,
                    roll: np.ndarray | float) -> np.ndarray:
    """R = (Rz(roll)·Ry(yaw)·Rx(pitch))ᵀ for angles in degrees; shape [..., 3, 3].

    Keypoints are row vectors and are rotated as ``x @ R``.
    """
    p, y, r = (np.deg2rad(np.asarray(a, dtype=np.float64)) for a in (pitch, yaw, roll))
    p, y, r = np.broadcast_arrays(p, y, r)
    cp, sp, cy, sy, cr, sr = np.cos(p), np.sin(p), np.cos(y), np.sin(y), np.cos(r), np.sin(r)
    one, zero = np.ones_like(p), np.zeros_like(p)
    rx = np.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).reshape(p.shape + (3, 3))
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(p.shape + (3, 3))
    rz = np.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).reshape(p.shape + (3, 3))
    rot = rz @ ry @ rx
    return np.swapaxes(rot, -1, -2)


def transform_keypoints(kp_canonical: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """Driven keypoints x = s·(x_c·R + δ) + [tx, ty, 0].

    Args:
        kp_canonical: [21, 3] or [B, 21, 3] canonical keypoints x_c.
        motion: [70] or [B, 70] raw motion.

    Returns:
        [B, 21, 3] (or [21, 3] when motion is 1-D) float64 keypoints.
    """
    single = motion.ndim == 1
    m = np.atleast_2d(np.asarray(motion, dtype=np.float64))                  # [B, 70]
    kc = np.asarray(kp_canonical, dtype=np.float64)
    kc = np.broadcast_to(kc, (m.shape[0], N_KP, 3))                           # [B, 21, 3]
    rot = rotation_matrix(m[:, PITCH], m[:, YAW], m[:, ROLL])                 # [B, 3, 3]
    delta = m[:, EXP].reshape(-1, N_KP, 3)                                    # [B, 21, 3]
    x = m[:, SCALE, None, None] * (kc @ rot + delta)                          # [B, 21, 3]
    x[:, :, :2] += m[:, None, 64:66]                                          # tz never used
    return x[0] if single else x


def normalise(motion: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x − mean) / (std + 1e-5), as the release does (the 1e-5 matters for tiny-std dims)."""
    return (motion - mean) / (std + 1e-5)


def denormalise(motion: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalise`."""
    return motion * (std + 1e-5) + mean


def exp_points(motion: np.ndarray) -> np.ndarray:
    """The exp block of [..., 70] motion as [..., 21, 3]."""
    return np.asarray(motion)[..., EXP].reshape(*np.shape(motion)[:-1], N_KP, 3)


def lip_opening(motion: np.ndarray, kp_canonical: np.ndarray) -> np.ndarray:
    """Embedded profile: inner-lip gap (lower − upper, y) in canonical units; [...] per frame.

    Measured before rotation/scale so head motion does not count as mouth motion.  0 = closed.
    """
    pts = np.asarray(kp_canonical)[None] + exp_points(np.atleast_2d(motion))  # [B, 21, 3]
    gap = pts[:, KP["lower_lip_inner"], 1] - pts[:, KP["upper_lip_inner"], 1]
    return gap if np.ndim(motion) > 1 else gap[0]


def eye_opening(motion: np.ndarray, kp_canonical: np.ndarray) -> np.ndarray:
    """Embedded profile: mean lid gap of both eyes (y, canonical units); [...] per frame."""
    pts = np.asarray(kp_canonical)[None] + exp_points(np.atleast_2d(motion))
    gap_l = pts[:, KP["lower_lid_l"], 1] - pts[:, KP["upper_lid_l"], 1]
    gap_r = pts[:, KP["lower_lid_r"], 1] - pts[:, KP["upper_lid_r"], 1]
    gap = 0.5 * (gap_l + gap_r)
    return gap if np.ndim(motion) > 1 else gap[0]


GAZE_YAW_DEG = 10.0
"""Head yaw for gaze x = ±1: the embedded keypoints have no iris, so the head turns a little."""
GAZE_PITCH_DEG = 8.0
"""Head pitch for gaze y = ±1."""
MAX_ABS = 1e3
"""No sane motion value (keypoint offsets, scale, translation, degrees) comes near this."""


def valid(motion: np.ndarray) -> bool:
    """True if every value is finite and sane: invalid motion must never become continuity."""
    m = np.asarray(motion)
    return bool(m.size and np.isfinite(m).all() and np.abs(m).max() < MAX_ABS)


class Steering:
    """Live controls on top of generated motion: emotion, expression/head scales and gaze.

    The emotion goes to the motion generator; scales and gaze are applied here, around the
    avatar's rest motion, to every frame (speech and idle alike).
    """

    def __init__(self, expression: float = 1.0, head: float = 1.0) -> None:
        from ..types import EMOTION_NONE

        self.emotion, self.intensity = EMOTION_NONE, 1.0
        self.expression, self.head = float(expression), float(head)
        self.gaze = (0.0, 0.0)

    def apply(self, motion: np.ndarray, rest: np.ndarray) -> np.ndarray:
        """motion [T, 70] scaled around ``rest`` [70] and turned towards the gaze."""
        if self.expression == 1.0 and self.head == 1.0 and self.gaze == (0.0, 0.0):
            return motion
        out = motion.copy()
        out[:, EXP] = rest[EXP] + (motion[:, EXP] - rest[EXP]) * self.expression
        out[:, SCALE:] = rest[SCALE:] + (motion[:, SCALE:] - rest[SCALE:]) * self.head
        out[:, YAW] += GAZE_YAW_DEG * self.gaze[0]
        out[:, PITCH] += GAZE_PITCH_DEG * self.gaze[1]
        return out
