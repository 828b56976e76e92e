"""Emotion presets for the embedded profile: MoDA's 8 classes as keypoint offsets.

Each preset is an expression (brows, lids, lip corners, jaw) in face units (eye distances, see
:func:`avatar_agent.motion.visemes.face_unit`), after the FACS prototypes: happiness = lip-corner
puller + cheek raiser (AU12+6), sadness = inner-brow raiser + brow lowerer + lid droop + corner
depressor + chin raiser (AU1+4+15+17), surprise = brow raisers + upper-lid raiser + jaw drop
(AU1+2+5+26), anger = brow lowerer + lid tightener + lip presser (AU4+7+24), disgust = nose
wrinkler + upper-lip raiser (AU9+10), fear = brows up and together + lids wide + lip stretcher
(AU1+2+4+5+20), contempt = one-sided corner raise (AU14 unilateral) with narrowed lids.

The sizes are chosen for what a viewer (and a face tracker) sees on the rendered portrait: every
non-neutral preset moves its defining region by about a tenth of the eye distance.

The presets act on a *neutralised* face: a portrait that smiles (or frowns) at rest first has its
lip corners brought to a relaxed height and width (:func:`rest_neutraliser`), so "sadness" on a
smiling photo does not smile.  "neutral" is that relaxed face; label 8 ("none") keeps the portrait's
own expression.  The inner lips are never parted by an emotion, so a silent face keeps its mouth
closed whatever the emotion.

Label order is :data:`avatar_agent.types.EMOTIONS`; label 8 (:data:`EMOTION_NONE`) means none.
"""

from __future__ import annotations

import numpy as np

from avatar_agent.motion.space import KP, exp_points
from avatar_agent.motion.visemes import face_offsets, face_unit
from avatar_agent.types import EMOTION_NONE, EMOTIONS, EXP, N_KP

Spec = dict[str, tuple[float, float, float]]


def _both(spec: dict[str, tuple[float, float, float]]) -> Spec:
    """Expand "stem" keys that name both sides ("brow_inner") into "stem_l" and "stem_r"."""
    out: Spec = {}
    for name, v in spec.items():
        if name in KP:
            out[name] = v
        else:
            out[name + "_l"] = out[name + "_r"] = v
    return out


EMOTION_PRESETS: dict[str, Spec] = {
    "anger": _both({
        "brow_inner": (-0.06, 0.14, 0.0), "brow_outer": (0.0, 0.06, 0.0),
        "upper_lid": (0.0, 0.03, 0.0), "lower_lid": (0.0, -0.035, 0.0),
        "lip_corner": (-0.05, 0.035, 0.0),
        "upper_lip_outer": (0.0, 0.02, 0.0), "upper_lip_outer_l": (-0.01, 0.015, 0.0),
        "upper_lip_outer_r": (-0.01, 0.015, 0.0),
        "lower_lip_outer": (0.0, -0.04, 0.0), "lower_lip_outer_l": (-0.015, -0.03, 0.0),
        "lower_lip_outer_r": (-0.015, -0.03, 0.0), "chin": (0.0, -0.04, 0.0),
    }),
    "contempt": {
        "lip_corner_r": (0.1, -0.12, 0.01), "upper_lip_outer_r": (0.045, -0.055, 0.0),
        "lower_lip_outer_r": (0.035, -0.045, 0.0), "upper_lip_outer": (0.0, -0.015, 0.0),
        "lower_lip_outer": (0.0, -0.01, 0.0), "lip_corner_l": (-0.02, 0.035, 0.0),
        "brow_outer_r": (0.0, -0.08, 0.0), "brow_inner_r": (0.0, -0.05, 0.0),
        "brow_inner_l": (0.0, 0.025, 0.0), "brow_outer_l": (0.0, 0.025, 0.0),
        "upper_lid_l": (0.0, 0.045, 0.0), "upper_lid_r": (0.0, 0.04, 0.0),
        "lower_lid_l": (0.0, -0.025, 0.0), "lower_lid_r": (0.0, -0.02, 0.0),
    },
    "disgust": _both({
        "upper_lip_outer": (0.0, -0.06, 0.0), "upper_lip_outer_l": (0.005, -0.055, 0.0),
        "upper_lip_outer_r": (0.005, -0.055, 0.0), "lip_corner": (-0.01, 0.06, 0.0),
        "lower_lip_outer": (0.0, -0.03, 0.0), "lower_lip_outer_l": (0.0, -0.01, 0.0),
        "lower_lip_outer_r": (0.0, -0.01, 0.0), "chin": (0.0, -0.03, 0.0),
        "brow_inner": (-0.03, 0.07, 0.0), "brow_outer": (0.0, 0.03, 0.0),
        "upper_lid": (0.0, 0.015, 0.0), "lower_lid": (0.0, -0.035, 0.0),
    }),
    "fear": _both({
        "brow_inner": (-0.04, -0.12, 0.0), "brow_outer": (0.0, -0.06, 0.0),
        "upper_lid": (0.0, -0.05, 0.0), "lower_lid": (0.0, -0.01, 0.0),
        "lip_corner": (0.09, 0.04, 0.0), "upper_lip_outer_l": (0.025, 0.0, 0.0),
        "upper_lip_outer_r": (0.025, 0.0, 0.0),
        "lower_lip_outer": (0.0, 0.02, 0.0), "lower_lip_outer_l": (0.025, 0.025, 0.0),
        "lower_lip_outer_r": (0.025, 0.025, 0.0), "chin": (0.0, 0.03, 0.0), "jaw": (0.0, 0.015, 0.0),
    }),
    "happiness": _both({
        "lip_corner": (0.09, -0.11, 0.01),
        "upper_lip_outer_l": (0.04, -0.045, 0.0), "upper_lip_outer_r": (0.04, -0.045, 0.0),
        "upper_lip_outer": (0.0, -0.02, 0.0),
        "lower_lip_outer_l": (0.04, -0.02, 0.0), "lower_lip_outer_r": (0.04, -0.02, 0.0),
        "lower_lip_outer": (0.0, -0.01, 0.0),
        "lower_lid": (0.0, -0.05, 0.0), "upper_lid": (0.0, 0.015, 0.0),
        "jaw": (0.01, -0.015, 0.0),
    }),
    "neutral": {},
    "sadness": _both({
        "brow_inner": (-0.03, -0.18, 0.0), "brow_outer": (0.0, 0.07, 0.0),
        "upper_lid": (0.0, 0.035, 0.0),
        "lip_corner": (-0.02, 0.09, 0.0), "upper_lip_outer_l": (0.0, 0.02, 0.0),
        "upper_lip_outer_r": (0.0, 0.02, 0.0),
        "lower_lip_outer": (0.0, -0.035, -0.005), "lower_lip_outer_l": (0.0, 0.01, 0.0),
        "lower_lip_outer_r": (0.0, 0.01, 0.0), "chin": (0.0, -0.035, 0.0),
    }),
    "surprise": _both({
        "brow_inner": (0.0, -0.13, 0.0), "brow_outer": (0.0, -0.12, 0.0),
        "upper_lid": (0.0, -0.045, 0.0), "lower_lid": (0.0, 0.01, 0.0),
        "chin": (0.0, 0.07, 0.0), "jaw": (0.0, 0.035, 0.0),
        "lower_lip_outer": (0.0, 0.03, 0.0), "lower_lip_outer_l": (0.0, 0.025, 0.0),
        "lower_lip_outer_r": (0.0, 0.025, 0.0),
        "lip_corner": (-0.035, 0.02, 0.0), "upper_lip_outer_l": (-0.01, 0.0, 0.0),
        "upper_lip_outer_r": (-0.01, 0.0, 0.0),
    }),
}
"""Offsets at intensity 1 per emotion name: {keypoint: (dx away from midline, dy down, dz)}."""

assert tuple(EMOTION_PRESETS) == EMOTIONS  # label order is MoDA's

CORNER_LIFT_RANGE = (-0.03, 0.01)
"""Relaxed lip-corner height above the closed lips' midline, face units (a neutral face has its
corners level with the lips or a little below)."""


def rest_neutraliser(kp_canonical: np.ndarray, rest_motion: np.ndarray | None) -> np.ndarray:
    """Exp offsets [21, 3] that relax the portrait's own smile or frown.

    The corners' height above the inner lips' midline (the smile) is brought into
    :data:`CORNER_LIFT_RANGE`; a smile's widening goes with it (the corners move in by half
    their drop) and the outer lips follow part of the way.  Zero for a relaxed portrait.
    """
    if rest_motion is None:
        return np.zeros((N_KP, 3))
    kp = np.asarray(kp_canonical, dtype=np.float64)
    u = face_unit(kp)
    p = kp + exp_points(np.asarray(rest_motion, dtype=np.float64))
    mid = 0.5 * (p[KP["upper_lip_inner"], 1] + p[KP["lower_lip_inner"], 1])
    out = np.zeros((N_KP, 3))
    for side in ("l", "r"):
        corner = KP[f"lip_corner_{side}"]
        lift = (mid - p[corner, 1]) / u
        drop = lift - float(np.clip(lift, *CORNER_LIFT_RANGE))          # > 0: lower the corner
        inward = 0.5 * max(drop, 0.0)
        sign = np.sign(p[corner, 0] - 0.5 * (p[KP["lip_corner_l"], 0] + p[KP["lip_corner_r"], 0]))
        out[corner, :2] = (-sign * inward * u, drop * u)
        for name, f in ((f"upper_lip_outer_{side}", 0.5), (f"lower_lip_outer_{side}", 0.3)):
            out[KP[name], :2] = (-sign * f * inward * u, f * drop * u)
    return out


def emotion_table(kp_canonical: np.ndarray, rest_motion: np.ndarray | None = None) -> np.ndarray:
    """Offsets of all 9 labels at intensity 1 for this face: float32 [9, 63] (row 8 = zeros).

    With ``rest_motion`` (the rest pose the offsets are added to), rows 0–7 include
    :func:`rest_neutraliser`, so each preset shows on a relaxed face whatever the portrait's own
    expression.
    """
    kp = np.asarray(kp_canonical, dtype=np.float64)
    u = face_unit(kp)
    base = rest_neutraliser(kp, rest_motion)
    rows = [(base + face_offsets(EMOTION_PRESETS[name], kp, u)).reshape(-1) for name in EMOTIONS]
    rows.append(np.zeros(63))
    return np.stack(rows).astype(np.float32)


class EmotionError(ValueError):
    """Unknown emotion label or intensity out of range."""


def emotion_label(emotion: int | str) -> int:
    """Label 0..8 for a label or a name ("happiness"; "none" → 8)."""
    if isinstance(emotion, str):
        if emotion == "none":
            return EMOTION_NONE
        if emotion not in EMOTIONS:
            raise EmotionError(f"unknown emotion {emotion!r}: choose one of "
                               f"{', '.join(EMOTIONS + ('none',))}")
        return EMOTIONS.index(emotion)
    if isinstance(emotion, (bool,)) or not isinstance(emotion, (int, np.integer)):
        raise EmotionError(f"emotion must be an int label or a name, got {emotion!r}")
    if not 0 <= int(emotion) <= EMOTION_NONE:
        raise EmotionError(f"emotion label {emotion} must be within 0..{EMOTION_NONE} "
                           f"({', '.join(EMOTIONS)}, 8 = none)")
    return int(emotion)


def emotion_offsets(emotion: int | str, intensity: float, kp_canonical: np.ndarray,
                    rest_motion: np.ndarray | None = None) -> np.ndarray:
    """Exp offsets [63] of ``emotion`` at ``intensity`` in [0, 1] for this face (on
    ``rest_motion``, see :func:`emotion_table`)."""
    label = emotion_label(emotion)
    if not np.isfinite(intensity) or not 0.0 <= float(intensity) <= 1.0:
        raise EmotionError(f"intensity={intensity} must be within [0, 1]")
    return emotion_table(kp_canonical, rest_motion)[label] * np.float32(intensity)


class EmotionLayer:
    """An emotion as a layer over motion that does not carry it (the tiny MoDA's speech).

    Keeps the shown emotion offsets and glides them towards the target with time constant
    ``tau`` (first use jumps), like the procedural generator does.  ``strip`` removes the current
    offsets from a frame (what the layer-free generator should continue from), ``frames`` gives
    the offsets of the next ``n`` frames.

    Args:
        kp_canonical, rest_motion: the face and its rest pose (see :func:`emotion_table`).
        fps: frame rate.
        tau: glide time constant in seconds.
    """

    def __init__(self, kp_canonical: np.ndarray, rest_motion: np.ndarray | None, fps: int = 25,
                 tau: float = 0.3) -> None:
        self.table = emotion_table(kp_canonical, rest_motion).astype(np.float64)
        self._a = 1.0 - float(np.exp(-1.0 / (tau * fps)))
        self._now: np.ndarray | None = None

    def strip(self, motion: np.ndarray) -> np.ndarray:
        """``motion`` [70] (or [T, 70]) without the layer's current offsets (a copy)."""
        out = np.array(motion, dtype=np.float32, copy=True)
        if self._now is not None:
            out[..., EXP] -= self._now.astype(np.float32)
        return out

    def frames(self, n: int, emotion: int | str, intensity: float = 1.0) -> np.ndarray:
        """Offsets [n, 63] of the next ``n`` frames gliding to ``emotion`` at ``intensity``."""
        if not np.isfinite(intensity) or not 0.0 <= float(intensity) <= 1.0:
            raise EmotionError(f"intensity={intensity} must be within [0, 1]")
        target = self.table[emotion_label(emotion)] * float(intensity)
        if self._now is None:
            self._now = target.copy()
        out = np.empty((n, 63))
        for k in range(n):
            self._now = self._now + self._a * (target - self._now)
            out[k] = self._now
        return out.astype(np.float32)
