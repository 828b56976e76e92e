"""Emotion presets move the keypoints each emotion is known for."""

from __future__ import annotations

import numpy as np
import pytest

from avatar_agent.motion.emotion import (EmotionError, emotion_label, emotion_offsets,
                                         emotion_table)
from avatar_agent.motion.procedural import ProceduralMotion
from avatar_agent.motion.space import KP, eye_opening, lip_opening
from avatar_agent.motion.template import neutral_template
from avatar_agent.motion.visemes import face_unit
from avatar_agent.types import EMOTION_NONE, EMOTIONS

KPC = neutral_template()
U = face_unit(KPC)


def dy(off: np.ndarray, name: str) -> float:
    """Vertical offset of a keypoint in face units (negative = up)."""
    return float(off.reshape(21, 3)[KP[name], 1] / U)


def dx_out(off: np.ndarray, name: str) -> float:
    """Horizontal offset away from the face midline, face units."""
    side = np.sign(KPC[KP[name], 0])
    return float(side * off.reshape(21, 3)[KP[name], 0] / U)


def both(f, off: np.ndarray, stem: str) -> float:
    return 0.5 * (f(off, stem + "_l") + f(off, stem + "_r"))


def expression(name: str, intensity: float = 1.0) -> np.ndarray:
    return emotion_offsets(name, intensity, KPC)


def test_labels_follow_moda_order():
    assert [emotion_label(n) for n in EMOTIONS] == list(range(8))
    assert emotion_label("none") == EMOTION_NONE == 8
    assert emotion_label(4) == 4 == EMOTIONS.index("happiness")
    for bad in (9, -1, "joy", 1.5, True):
        with pytest.raises(EmotionError):
            emotion_label(bad)
    with pytest.raises(EmotionError, match="intensity"):
        emotion_offsets("happiness", 1.5, KPC)


def test_happiness_raises_and_widens_the_lip_corners():
    e = expression("happiness")
    assert dy(e, "lip_corner_l") < -0.03 and dy(e, "lip_corner_r") < -0.03
    assert dx_out(e, "lip_corner_l") > 0.03 and dx_out(e, "lip_corner_r") > 0.03
    assert both(dy, e, "lower_lid") < 0                     # cheeks push the lower lids up


def test_sadness_lowers_corners_and_raises_inner_brows():
    e = expression("sadness")
    assert both(dy, e, "lip_corner") > 0.02
    assert both(dy, e, "brow_inner") < -0.02
    assert both(dy, e, "brow_outer") > 0                     # outer brows drop: the oblique brow


def test_surprise_raises_brows_and_lids_and_drops_the_jaw():
    e = expression("surprise")
    assert both(dy, e, "brow_inner") < -0.05 and both(dy, e, "brow_outer") < -0.05
    assert both(dy, e, "upper_lid") < -0.01
    assert dy(e, "chin") > 0.03
    assert eye_opening(np.concatenate([e, np.zeros(7, np.float32)]), KPC) > \
        eye_opening(np.zeros(70, np.float32), KPC)


def test_anger_lowers_and_draws_the_brows_together_and_narrows_the_eyes():
    e = expression("anger")
    assert both(dy, e, "brow_inner") > 0.03
    assert both(dx_out, e, "brow_inner") < -0.02
    m = np.concatenate([e, np.zeros(7, np.float32)])
    assert eye_opening(m, KPC) < eye_opening(np.zeros(70, np.float32), KPC)


def test_fear_disgust_contempt():
    fear = expression("fear")
    assert both(dy, fear, "brow_inner") < -0.04 and both(dx_out, fear, "lip_corner") > 0.03
    disgust = expression("disgust")
    assert dy(disgust, "upper_lip_outer") < -0.02 and both(dy, disgust, "brow_inner") > 0.02
    contempt = expression("contempt")
    assert dy(contempt, "lip_corner_r") < dy(contempt, "lip_corner_l") - 0.03   # one-sided


def test_neutral_none_and_intensity():
    assert np.all(expression("neutral") == 0) and np.all(emotion_offsets(8, 1.0, KPC) == 0)
    np.testing.assert_allclose(expression("happiness", 0.5), 0.5 * expression("happiness"),
                               rtol=1e-6)
    assert np.all(expression("surprise", 0.0) == 0)
    # Offsets scale with the face: a face twice as large moves twice as far.
    big = emotion_table(KPC * 2.0)
    np.testing.assert_allclose(big, 2.0 * emotion_table(KPC), rtol=1e-5, atol=1e-7)


def test_no_emotion_parts_the_lips():
    for label in range(9):
        m = np.concatenate([emotion_table(KPC)[label], np.zeros(7, np.float32)])
        assert abs(float(lip_opening(m, KPC))) < 1e-6, EMOTIONS[label] if label < 8 else "none"


def test_generator_applies_the_emotion(avatar):
    g = ProceduralMotion(seed=0)
    g.prepare(avatar)
    silence = np.zeros(16000, np.float32)
    none = g.generate_utterance(silence, emotion=EMOTION_NONE)
    happy = g.generate_utterance(silence, emotion="happiness", intensity=1.0)
    corner = 3 * KP["lip_corner_l"] + 1
    np.testing.assert_allclose(happy[:, corner] - none[:, corner],
                               expression("happiness")[corner], atol=1e-6)
    # Streaming: a change of emotion glides in (no jump) and is complete within ~1 s.
    from avatar_agent.types import SpeechChunk

    prev = g.rest_pose
    out = []
    for i, emo in enumerate([8, 8, 4, 4, 4, 4, 4, 4]):
        chunk = SpeechChunk(np.zeros(3200, np.float32), i * 3200, 3200, 0, 0, speech=False)
        m = g.generate(chunk, prev, emotion=emo, intensity=1.0)
        out.append(m)
        prev = m[-1]
    y = np.concatenate(out)[:, corner]
    target = expression("happiness")[corner]
    steps = np.abs(np.diff(y))
    assert steps.max() < 0.3 * abs(target)
    assert y[-1] == pytest.approx(y[0] + target, abs=0.05 * abs(target))


def test_emotion_layer_glides_and_strips():
    """The layer a speech generator without emotion gets on top: first use jumps, changes glide
    (time constant 0.3 s), strip() removes exactly what was last added."""
    from avatar_agent.motion.emotion import EmotionLayer
    from avatar_agent.motion.template import template_rest_motion

    rest = template_rest_motion()
    layer = EmotionLayer(KPC, rest)
    first = layer.frames(3, "surprise")
    np.testing.assert_allclose(first, np.repeat(layer.table[7][None], 3, 0), atol=1e-6)
    frame = rest.copy()
    frame[:63] += first[-1]
    np.testing.assert_allclose(layer.strip(frame), rest, atol=1e-6)
    glide = layer.frames(50, "sadness", 0.5)
    target = layer.table[EMOTIONS.index("sadness")] * 0.5
    assert np.abs(np.diff(glide, axis=0)).max() < 0.2 * np.abs(target - first[-1]).max()
    np.testing.assert_allclose(glide[-1], target, atol=0.01 * np.abs(target).max())
    with pytest.raises(EmotionError):
        layer.frames(1, "joy")


def test_smiling_rest_is_neutralised():
    """A rest pose with raised lip corners (a smile) gets them lowered and narrowed by every
    preset (neutral included); "none" keeps the portrait's own expression."""
    from avatar_agent.motion.template import template_rest_motion

    rest = template_rest_motion()
    smile = rest.copy()
    for side, sx in (("l", -1), ("r", 1)):
        smile[3 * KP[f"lip_corner_{side}"] + 1] -= 0.06                # corners up
        smile[3 * KP[f"lip_corner_{side}"]] += sx * 0.03                # and out
    table = emotion_table(KPC, smile)
    for name in ("neutral", "sadness", "anger"):
        row = table[EMOTIONS.index(name)]
        assert dy(row, "lip_corner_l") > 0.05 and dy(row, "lip_corner_r") > 0.05, name
    assert dx_out(table[EMOTIONS.index("neutral")], "lip_corner_l") < -0.02
    assert np.all(table[EMOTION_NONE] == 0)
    assert np.all(emotion_table(KPC, rest)[EMOTIONS.index("neutral")] == 0)   # relaxed: no change
