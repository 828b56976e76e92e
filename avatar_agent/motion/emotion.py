"""Emotion presets for the embedded profile: MoDA's 8 classes as keypoint offsets.

Each preset is a small expression (brows, lids, lip corners, jaw) in face units (eye distances,
see :func:`avatar_agent.motion.visemes.face_unit`), loosely after FACS prototypes: happiness =
lip-corner puller + cheek raiser (AU12+6), sadness = inner-brow raiser + corner depressor
(AU1+15), surprise = brow raisers + upper-lid raiser + jaw drop (AU1+2+5+26), anger = brow
lowerer + lid tightener + lip presser (AU4+7+24), disgust = upper-lip raiser + brow lowerer
(AU10+4), fear = brows up and together + lids wide + lip stretcher (AU1+2+4+5+20), contempt =
one-sided corner raise (AU14 unilateral).  The inner lips are never parted by an emotion, so a
silent face keeps its mouth closed whatever the emotion.

Label order is :data:`avatar_agent.types.EMOTIONS`; label 8 (:data:`EMOTION_NONE`) means none.
"""

from __future__ import annotations

import numpy as np

from avatar_agent.motion.visemes import face_offsets, face_unit
from avatar_agent.types import EMOTION_NONE, EMOTIONS

Spec = dict[str, tuple[float, float, float]]

EMOTION_PRESETS: dict[str, Spec] = {
    "anger": {
        "brow_inner_l": (-0.035, 0.05, 0.0), "brow_inner_r": (-0.035, 0.05, 0.0),
        "brow_outer_l": (0.0, 0.015, 0.0), "brow_outer_r": (0.0, 0.015, 0.0),
        "upper_lid_l": (0.0, 0.012, 0.0), "upper_lid_r": (0.0, 0.012, 0.0),
        "lower_lid_l": (0.0, -0.008, 0.0), "lower_lid_r": (0.0, -0.008, 0.0),
        "lip_corner_l": (-0.02, 0.01, 0.0), "lip_corner_r": (-0.02, 0.01, 0.0),
        "upper_lip_outer": (0.0, 0.008, 0.0), "lower_lip_outer": (0.0, -0.012, 0.0),
    },
    "contempt": {
        "lip_corner_r": (0.04, -0.035, 0.01), "upper_lip_outer_r": (0.012, -0.01, 0.0),
        "lip_corner_l": (0.0, 0.005, 0.0),
    },
    "disgust": {
        "upper_lip_outer": (0.0, -0.035, 0.0),
        "upper_lip_outer_l": (0.005, -0.03, 0.0), "upper_lip_outer_r": (0.005, -0.03, 0.0),
        "lower_lip_outer": (0.0, -0.01, 0.0),
        "lip_corner_l": (0.0, 0.015, 0.0), "lip_corner_r": (0.0, 0.015, 0.0),
        "brow_inner_l": (-0.02, 0.035, 0.0), "brow_inner_r": (-0.02, 0.035, 0.0),
        "lower_lid_l": (0.0, -0.012, 0.0), "lower_lid_r": (0.0, -0.012, 0.0),
    },
    "fear": {
        "brow_inner_l": (-0.015, -0.06, 0.0), "brow_inner_r": (-0.015, -0.06, 0.0),
        "brow_outer_l": (0.0, -0.03, 0.0), "brow_outer_r": (0.0, -0.03, 0.0),
        "upper_lid_l": (0.0, -0.02, 0.0), "upper_lid_r": (0.0, -0.02, 0.0),
        "lower_lid_l": (0.0, -0.004, 0.0), "lower_lid_r": (0.0, -0.004, 0.0),
        "lip_corner_l": (0.05, 0.015, 0.0), "lip_corner_r": (0.05, 0.015, 0.0),
        "lower_lip_outer": (0.0, 0.01, 0.0), "chin": (0.0, 0.02, 0.0),
    },
    "happiness": {
        "lip_corner_l": (0.06, -0.06, 0.01), "lip_corner_r": (0.06, -0.06, 0.01),
        "upper_lip_outer_l": (0.02, -0.02, 0.0), "upper_lip_outer_r": (0.02, -0.02, 0.0),
        "lower_lip_outer_l": (0.02, -0.01, 0.0), "lower_lip_outer_r": (0.02, -0.01, 0.0),
        "lower_lid_l": (0.0, -0.015, 0.0), "lower_lid_r": (0.0, -0.015, 0.0),
        "upper_lid_l": (0.0, 0.004, 0.0), "upper_lid_r": (0.0, 0.004, 0.0),
    },
    "neutral": {},
    "sadness": {
        "brow_inner_l": (-0.01, -0.045, 0.0), "brow_inner_r": (-0.01, -0.045, 0.0),
        "brow_outer_l": (0.0, 0.02, 0.0), "brow_outer_r": (0.0, 0.02, 0.0),
        "upper_lid_l": (0.0, 0.012, 0.0), "upper_lid_r": (0.0, 0.012, 0.0),
        "lip_corner_l": (-0.01, 0.04, 0.0), "lip_corner_r": (-0.01, 0.04, 0.0),
        "lower_lip_outer": (0.0, -0.01, -0.005), "chin": (0.0, -0.01, 0.0),
    },
    "surprise": {
        "brow_inner_l": (0.0, -0.09, 0.0), "brow_inner_r": (0.0, -0.09, 0.0),
        "brow_outer_l": (0.0, -0.08, 0.0), "brow_outer_r": (0.0, -0.08, 0.0),
        "upper_lid_l": (0.0, -0.025, 0.0), "upper_lid_r": (0.0, -0.025, 0.0),
        "lower_lid_l": (0.0, 0.004, 0.0), "lower_lid_r": (0.0, 0.004, 0.0),
        "chin": (0.0, 0.05, 0.0), "jaw_l": (0.0, 0.025, 0.0), "jaw_r": (0.0, 0.025, 0.0),
        "lower_lip_outer": (0.0, 0.015, 0.0),
        "lower_lip_outer_l": (0.0, 0.012, 0.0), "lower_lip_outer_r": (0.0, 0.012, 0.0),
        "lip_corner_l": (-0.02, 0.01, 0.0), "lip_corner_r": (-0.02, 0.01, 0.0),
    },
}
"""Offsets at intensity 1 per emotion name: {keypoint: (dx away from midline, dy down, dz)}."""

assert tuple(EMOTION_PRESETS) == EMOTIONS  # label order is MoDA's


class EmotionError(ValueError):
    """Unknown emotion label or intensity out of range."""


def emotion_label(emotion: int | str) -> int:
    """Label 0..8 for a label or a name ("happiness"; "none" → 8)."""
    if isinstance(emotion, str):
        if emotion == "none":
            return EMOTION_NONE
        if emotion not in EMOTIONS:
            raise EmotionError(f"unknown emotion {emotion!r}; use one of {EMOTIONS + ('none',)}")
        return EMOTIONS.index(emotion)
    if isinstance(emotion, (bool,)) or not isinstance(emotion, (int, np.integer)):
        raise EmotionError(f"emotion must be an int label or a name, got {emotion!r}")
    if not 0 <= int(emotion) <= EMOTION_NONE:
        raise EmotionError(f"emotion label {emotion} must be within 0..{EMOTION_NONE} "
                           f"({', '.join(EMOTIONS)}, 8 = none)")
    return int(emotion)


def emotion_table(kp_canonical: np.ndarray) -> np.ndarray:
    """Offsets of all 9 labels at intensity 1 for this face: float32 [9, 63] (row 8 = zeros)."""
    kp = np.asarray(kp_canonical, dtype=np.float64)
    u = face_unit(kp)
    rows = [face_offsets(EMOTION_PRESETS[name], kp, u).reshape(-1) for name in EMOTIONS]
    rows.append(np.zeros(63))
    return np.stack(rows).astype(np.float32)


def emotion_offsets(emotion: int | str, intensity: float, kp_canonical: np.ndarray) -> np.ndarray:
    """Exp offsets [63] of ``emotion`` at ``intensity`` in [0, 1] for this face."""
    label = emotion_label(emotion)
    if not np.isfinite(intensity) or not 0.0 <= float(intensity) <= 1.0:
        raise EmotionError(f"intensity={intensity} must be within [0, 1]")
    return emotion_table(kp_canonical)[label] * np.float32(intensity)
