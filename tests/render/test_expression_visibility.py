"""Emotions and blinks as an independent tracker (FaceMesh) sees them on rendered frames
(issue 12, items 2 and 5).  Figures are % of the inter-ocular distance (IOD)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatar_agent.face import measure
from avatar_agent.face.landmarks import load_image
from avatar_agent.motion.emotion import emotion_offsets
from avatar_agent.motion.procedural import ProceduralMotion
from avatar_agent.motion.space import EXP, eye_opening
from avatar_agent.render.warp import WarpRenderer
from avatar_agent.types import EMOTIONS

PORTRAIT = Path(__file__).resolve().parents[2] / "avatars" / "default.png"
DEFINING = {"anger": "brows", "contempt": "corners", "disgust": "corners", "fear": "brows",
            "happiness": "corners", "sadness": "brows", "surprise": "brows"}


@pytest.fixture(scope="module")
def setup():
    r = WarpRenderer(size=512)
    av = r.prepare(load_image(PORTRAIT))                 # smiles at rest, teeth showing
    g = ProceduralMotion(seed=0)
    g.prepare(av)
    return r, av, g


def _render_emotions(r, av, g, intensity: float) -> dict[str, np.ndarray]:
    rest = g.rest_pose
    m = np.repeat(rest[None], len(EMOTIONS), 0)
    for i, e in enumerate(EMOTIONS):
        m[i, EXP] += emotion_offsets(e, intensity, av.kp_canonical, rest)
    return {e: measure.track(f) for e, f in zip(EMOTIONS, r.render(av, m), strict=True)}


def test_emotions_are_visible_and_distinct_on_a_smiling_portrait(setup):
    r, av, g = setup
    pts = _render_emotions(r, av, g, 1.0)
    ref = pts["neutral"]
    assert all(p is not None for p in pts.values())
    for e, region in DEFINING.items():
        ch = measure.expression_change(pts[e], ref)
        assert ch.regions[region] >= 0.06, (e, ch)
        assert ch.mean >= 0.03, (e, ch)
    names = [e for e in EMOTIONS]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert measure.expression_distance(pts[a], pts[b], ref) >= 0.02, (a, b)
    # the portrait's smile is relaxed first: sad corners sit below the lips' midline, angry ones
    # far lower than the photo's own smile
    def lift(p: np.ndarray) -> float:
        return float((0.5 * (p[13, 1] + p[14, 1]) - 0.5 * (p[61, 1] + p[291, 1])) / measure.iod(p))

    own = lift(measure.track(r.render(av, g.rest_pose)[0]))
    assert own > 0.06                                                # the photo does smile
    assert lift(pts["sadness"]) < 0.0
    assert lift(pts["anger"]) < 0.4 * own


def test_intensity_scales_the_emotion(setup):
    r, av, g = setup
    full = _render_emotions(r, av, g, 1.0)
    half = _render_emotions(r, av, g, 0.5)
    for e in ("surprise", "happiness"):
        a = measure.expression_change(full[e], full["neutral"]).mean
        b = measure.expression_change(half[e], half["neutral"]).mean
        assert 0.3 * a < b < 0.75 * a, (e, a, b)


def test_blinks_are_seen_by_the_tracker():
    """12 s of idle motion rendered at 256²: the tracker sees (almost) every blink."""
    r = WarpRenderer(size=256)
    av = r.prepare(load_image(PORTRAIT))
    g = ProceduralMotion(seed=3)
    g.prepare(av)
    m = g.idle(25 * 12, g.rest_pose, 0.0)
    truth = eye_opening(m, av.kp_canonical)
    frames = r.render(av, m)
    opening = []
    for f in frames:
        p = measure.track(f)
        opening.append(np.nan if p is None else measure.eye_opening(p))
    seen = measure.count_blinks(np.array(opening))
    made = measure.count_blinks(truth, threshold=0.5)
    assert made >= 2
    assert seen >= made - 1 and seen <= made + 1, (seen, made)


def test_gaze_moves_the_irises(setup):
    """The iris shift carried by the lids' depth offsets moves the irises the tracker sees,
    and nothing else of the face."""
    from avatar_agent.motion.idle import IdleTrack, embedded_idle_offsets

    r, av, g = setup
    z = np.zeros(3, np.float32)
    iris = np.array([[0, 0], [0.03, 0], [0, 0.02]], np.float32)
    tr = IdleTrack(blink=z, pose=np.zeros((3, 3), np.float32), scale=z, ty=z, gaze=z, iris=iris)
    m = g.rest_pose[None] + embedded_idle_offsets(tr, av.kp_canonical, g.rest_pose)
    frames = r.render(av, m)
    p = [measure.track(f) for f in frames]
    iod = measure.iod(p[0])
    eyes = np.zeros(frames[0].shape[:2], bool)
    vd = r.driven_mesh(av, m[0])
    for eye in ((33, 133, 159, 145, 160, 144), (263, 362, 386, 374, 387, 373)):
        (x0, y0), (x1, y1) = vd[list(eye)].min(0) - 4, vd[list(eye)].max(0) + 4
        eyes[int(y0):int(y1) + 1, int(x0):int(x1) + 1] = True
    for k, axis, least in ((1, 0, 0.015), (2, 1, 0.006)):         # lids hide vertical motion
        for c in (468, 473):
            assert (p[k][c, axis] - p[0][c, axis]) / iod > least, (k, c)
        diff = np.abs(frames[k].astype(int) - frames[0]).sum(-1)
        assert diff[eyes].max() > 30 and diff[~eyes].max() == 0          # only the eyes changed
