"""A plausible neutral face in the embedded motion space, for tests and for faceless fallbacks.

Coordinates follow motion/space.py: the 512 face crop normalised to [-1, 1] (x right, y down,
z = depth, positive away from the viewer).  Proportions are those of an average adult face at
LivePortrait's crop scale 2.3, where the face is about 0.87 units wide: eye centres 0.40 apart,
mouth 0.34 wide, brows 0.13 above the eyes, chin 0.62 below them.  The mouth is closed (inner
lips touch) and the eyes are open, as the space's exp = 0 requires.
"""

from __future__ import annotations

import numpy as np

from avatar_agent.motion.space import EMBEDDED_KEYPOINTS, KP
from avatar_agent.types import DIM, N_KP, PITCH, ROLL, SCALE, YAW, Avatar

# (x, y, z) per embedded keypoint name; image-left ("_l") keypoints have negative x.
_NEUTRAL: dict[str, tuple[float, float, float]] = {
    "lip_corner_l": (-0.170, 0.285, 0.030),
    "lip_corner_r": (0.170, 0.285, 0.030),
    "upper_lip_outer": (0.000, 0.235, -0.060),
    "lower_lip_outer": (0.000, 0.340, -0.050),
    "upper_lip_inner": (0.000, 0.282, -0.045),
    "lower_lip_inner": (0.000, 0.282, -0.043),
    "upper_lip_outer_l": (-0.060, 0.242, -0.050),
    "upper_lip_outer_r": (0.060, 0.242, -0.050),
    "lower_lip_outer_l": (-0.070, 0.330, -0.040),
    "lower_lip_outer_r": (0.070, 0.330, -0.040),
    "chin": (0.000, 0.500, -0.020),
    "jaw_l": (-0.330, 0.370, 0.150),
    "jaw_r": (0.330, 0.370, 0.150),
    "upper_lid_l": (-0.200, -0.142, 0.020),
    "lower_lid_l": (-0.200, -0.098, 0.020),
    "upper_lid_r": (0.200, -0.142, 0.020),
    "lower_lid_r": (0.200, -0.098, 0.020),
    "brow_inner_l": (-0.085, -0.245, -0.010),
    "brow_outer_l": (-0.320, -0.235, 0.060),
    "brow_inner_r": (0.085, -0.245, -0.010),
    "brow_outer_r": (0.320, -0.235, 0.060),
}

TEMPLATE_SCALE = 1.0
"""Scale of :func:`template_rest_motion`: the template is already in crop units."""


def neutral_template() -> np.ndarray:
    """Neutral canonical keypoints of an average face: float32 [21, 3] (mouth closed, eyes open)."""
    out = np.zeros((N_KP, 3), np.float32)
    for name, _ in EMBEDDED_KEYPOINTS:
        out[KP[name]] = _NEUTRAL[name]
    return out


def template_rest_motion(pitch: float = 0.0, yaw: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rest motion [70] of the template: neutral expression, unit scale, no translation."""
    m = np.zeros(DIM, np.float32)
    m[SCALE] = TEMPLATE_SCALE
    m[PITCH], m[YAW], m[ROLL] = pitch, yaw, roll
    return m


def template_avatar(size: int = 512, rest_motion: np.ndarray | None = None) -> Avatar:
    """An embedded-profile Avatar built from :func:`neutral_template` (no face detection needed).

    The image and crop are a flat grey ``size``² picture; ``crop_to_image`` is the identity.
    """
    img = np.full((size, size, 3), 128, np.uint8)
    rest = template_rest_motion() if rest_motion is None else np.asarray(rest_motion, np.float32)
    if rest.shape != (DIM,):
        raise ValueError(f"rest_motion must have shape ({DIM},), got {rest.shape}")
    return Avatar(profile="embedded", image=img, crop=img.copy(), crop_to_image=np.eye(3),
                  kp_canonical=neutral_template(), rest_motion=rest.copy(),
                  extra={"template": True})
