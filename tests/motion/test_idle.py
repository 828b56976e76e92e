"""The idle layer: blink rate and shape, sway, breathing, speech nods, determinism, continuity."""

from __future__ import annotations

import numpy as np
import pytest

from avatar_agent.motion.idle import IdleLayer, IdleParams, blink_shape, embedded_idle_offsets
from avatar_agent.motion.procedural import ProceduralMotion
from avatar_agent.motion.space import BROW_KEYPOINTS, eye_opening
from avatar_agent.motion.template import neutral_template, template_rest_motion


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    out, start = [], None
    for i, v in enumerate(np.append(mask, False)):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - start))
            start = None
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blink_rate_over_a_minute_of_idle(avatar, seed):
    g = ProceduralMotion(seed=seed)
    g.prepare(avatar)
    m = g.idle(60 * 25, g.rest_pose, t0=0.0)
    eyes = eye_opening(m, avatar.kp_canonical)
    open_gap = eye_opening(g.rest_pose, avatar.kp_canonical)
    blinks = runs(eyes < 0.5 * open_gap)
    assert 10 <= len(blinks) <= 30
    assert eyes.min() < 0.2 * open_gap                              # lids really close …
    assert eyes.min() > -1e-5                                         # … but never cross
    gaps = np.diff([s for s, _ in blinks]) / 25.0
    assert gaps.max() <= 6.5                                          # never a long stare
    assert all(2 <= n <= 4 for _, n in blinks)    # 80–160 ms below half-open: a video shows it


def test_blink_duration_is_about_240_ms():
    layer = IdleLayer(seed=5, fps=1000)
    tr = layer.track(30_000)
    events = runs(tr.blink > 0.02)
    assert len(events) >= 5
    durations = np.array([n for _, n in events]) / 1000.0
    assert np.all((durations > 0.2) & (durations < 0.26))
    # Fast close, slower reopening.
    shape = blink_shape(np.arange(0, 0.24, 0.001), 0.24)
    t_peak = np.argmax(shape >= 0.999) / 1000.0
    assert 0.07 < t_peak < 0.11


def test_double_blinks_happen():
    layer = IdleLayer(seed=0, fps=100, params=IdleParams(double_blink_p=1.0))
    tr = layer.track(1000)
    starts = [s for s, _ in runs(tr.blink > 0.5)]
    assert len(starts) >= 2 and np.any(np.diff(starts) <= 40)   # second blink within 0.4 s


def test_same_frames_whatever_the_call_sizes():
    a = IdleLayer(seed=9)
    b = IdleLayer(seed=9)
    level = np.abs(np.sin(np.arange(400) / 7.0))
    whole = a.track(400, level)
    parts, i = [], 0
    for n in (1, 7, 50, 3, 139, 200):
        parts.append(b.track(n, level[i : i + n]))
        i += n
    for name in ("blink", "pose", "scale", "ty", "gaze", "iris"):
        np.testing.assert_allclose(np.concatenate([getattr(p, name) for p in parts]),
                                   getattr(whole, name), atol=1e-6)
    c = IdleLayer(seed=10).track(400, level)
    assert not np.allclose(c.pose, whole.pose)
    a.reset()
    assert a.frame == 0
    np.testing.assert_array_equal(a.track(400, level).blink, whole.blink)


def test_sway_is_slow_and_small_and_breathing_has_its_rate():
    tr = IdleLayer(seed=3).track(25 * 40)
    p = IdleParams()
    bound = [a + 3.5 * d for a, d in zip(p.sway_deg, p.drift_deg, strict=True)]
    assert np.abs(tr.pose).max(0).tolist() <= bound
    assert np.abs(np.diff(tr.pose, axis=0)).max() < 0.2              # < 5 °/s
    assert np.abs(tr.pose).max() > 0.3                                 # but it does move
    spec = np.abs(np.fft.rfft(tr.scale - tr.scale.mean()))
    hz = np.fft.rfftfreq(len(tr.scale), 1 / 25)
    assert hz[np.argmax(spec)] == pytest.approx(p.breath_hz, abs=0.03)
    assert np.abs(tr.scale).max() == pytest.approx(p.breath_scale, rel=0.05)


def test_nods_follow_speech_emphasis():
    level = np.zeros(250)
    for s in range(20, 250, 25):                                       # a stressed syllable / s
        level[s : s + 6] = 1.0
    quiet = IdleLayer(seed=4).track(250)
    talk = IdleLayer(seed=4).track(250, level)
    nod = talk.pose[:, 0] - quiet.pose[:, 0]
    assert nod.max() > 1.0                                             # visible nods
    # Each nod peaks shortly after its onset (within 200 ms).
    for s in range(20, 225, 25):
        assert np.argmax(nod[s : s + 25]) <= 5
    np.testing.assert_array_equal(quiet.blink, talk.blink)            # blinks independent


def test_head_motion_is_not_a_loop():
    """The pose track never comes back to an earlier stretch of itself: over 4 minutes no 10 s
    window (shifted by ≥ 20 s) repeats an earlier one within a tenth of the motion's spread."""
    pose = IdleLayer(seed=6).track(25 * 240).pose.astype(np.float64)
    w = 25 * 10
    spread = pose.std(0).mean()
    best = np.inf
    for lag in range(25 * 20, len(pose) - w, 25):
        for start in range(0, len(pose) - w - lag, 25 * 5):
            a, b = pose[start : start + w], pose[start + lag : start + lag + w]
            best = min(best, float(np.sqrt(((a - b) ** 2).mean())))
    assert best > 0.1 * spread, (best, spread)


def test_embedded_offsets_close_the_eyes_and_move_brows_with_gaze():
    kp = neutral_template()
    rest = template_rest_motion()
    n = 5
    from avatar_agent.motion.idle import IdleTrack

    def track(blink: float, gaze: float) -> IdleTrack:
        z = np.zeros(n, np.float32)
        return IdleTrack(blink=z + blink, pose=np.zeros((n, 3), np.float32), scale=z, ty=z,
                         gaze=z + gaze)

    closed = rest + embedded_idle_offsets(track(1.0, 0.0), kp, rest)
    assert np.all(eye_opening(closed, kp) == pytest.approx(0.0, abs=1e-6))
    down = rest + embedded_idle_offsets(track(0.0, 1.0), kp, rest)
    up = rest + embedded_idle_offsets(track(0.0, -1.0), kp, rest)
    assert eye_opening(down, kp)[0] < eye_opening(rest, kp) < eye_opening(up, kp)[0]
    brow_y = [3 * k + 1 for k in BROW_KEYPOINTS]
    assert np.all(up[0, brow_y] < rest[brow_y])                       # brows rise on up-gaze


def test_eyes_move_in_saccades():
    """Fixations held for 0.3–2 s, one-frame jumps between them, now and then a look away."""
    p = IdleParams()
    tr = IdleLayer(seed=7).track(25 * 60)
    sacc = tr.iris - np.stack([0 * tr.gaze, p.gaze_iris * tr.gaze], 1)   # minus the slow gaze
    step = np.linalg.norm(np.diff(sacc, axis=0), axis=1)
    jumps = np.flatnonzero(step > 1e-6)
    assert 30 <= len(jumps) <= 200                                 # ~1 per second
    assert np.diff(jumps).min() >= int(p.saccade_interval[0] * 25) - 1
    assert np.abs(sacc).max() > p.look_away[0]                       # it looks away at times
    assert np.linalg.norm(tr.iris, axis=1).max() < p.look_away[1] + 5 * p.saccade_micro + \
        p.gaze_iris


def test_iris_rides_on_the_lid_depths_and_impose_keeps_blinks_in_speech():
    from avatar_agent.motion.idle import EYE_DIMS, IdleTrack, impose_idle_eyes
    from avatar_agent.motion.space import KP
    from avatar_agent.motion.visemes import face_unit

    kp, rest = neutral_template(), template_rest_motion()
    u = face_unit(kp)
    n = 3
    z = np.zeros(n, np.float32)
    iris = np.array([[0.02, -0.01]] * n, np.float32)
    tr = IdleTrack(blink=np.array([0, 0.5, 1], np.float32), pose=np.zeros((n, 3), np.float32),
                   scale=z, ty=z, gaze=z, iris=iris)
    off = embedded_idle_offsets(tr, kp, rest)
    assert off[0, 3 * KP["upper_lid_l"] + 2] == pytest.approx(0.02 * u)
    assert off[0, 3 * KP["lower_lid_r"] + 2] == pytest.approx(-0.01 * u)
    # a speech generator's motion with smeared lids gets the track's blink, the rest untouched
    speech = np.repeat(rest[None], n, 0) + np.random.default_rng(0).normal(0, 0.01, (n, 70))
    before = speech.copy()
    impose_idle_eyes(speech, tr, kp, rest)
    assert eye_opening(speech[2], kp) == pytest.approx(0.0, abs=1e-6)      # shut
    others = np.setdiff1d(np.arange(70), EYE_DIMS)
    np.testing.assert_array_equal(speech[:, others], before[:, others])
