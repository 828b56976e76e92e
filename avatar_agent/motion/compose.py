"""Speech from a generator, silence from the idle layer: the one composition both profiles use.

:class:`SpeechAndIdle` is a :class:`~avatar_agent.types.MotionGenerator` made of two parts:

* a speech generator (a :class:`~avatar_agent.motion.moda.MoDAMotion`) for chunks with speech;
* an idle source (:class:`IdleSource`) for silence: the embedded profile's procedural generator,
  or :class:`LivePortraitIdle` for the official profile.

Both idle sources draw their signals from the same profile-neutral
:class:`~avatar_agent.motion.idle.IdleLayer` track (blinks, sway, breathing, gaze) and map it into
their keypoint space; both join the frame shown last (``prev``) with the same seam: the
difference between ``prev`` and where the idle target would have been decays exponentially
(pose, scale and t over ``seam_pose`` s, lids and brows over ``seam_idle`` s, the mouth over
``seam_idle_mouth`` s; the values of :class:`~avatar_agent.motion.procedural.ProceduralParams`).
So speech → silence has no jump, and the first speech frame continues from the last idle frame
because the speech generator is conditioned on ``prev``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from avatar_agent.motion import space
from avatar_agent.motion.idle import IdleLayer, IdleParams, IdleTrack
from avatar_agent.types import EMOTION_NONE, MOTION_FPS, Avatar, Profile, SpeechChunk


class IdleSource(Protocol):
    """What serves silence in a :class:`SpeechAndIdle`."""

    def prepare(self, avatar: Avatar) -> None:
        """Bind to an avatar of its profile; the idle timeline starts over."""

    @property
    def rest_pose(self) -> np.ndarray:
        """Where silence relaxes to, motion [70]; valid after :meth:`prepare`."""

    def set_emotion(self, emotion: int, intensity: float = 1.0) -> None:
        """Emotion (and intensity) of the idle frames from now on."""

    def idle(self, n: int, prev: np.ndarray, t0: float) -> np.ndarray:
        """``n`` frames [n, 70] of silence starting at time ``t0`` (s), relaxing from ``prev`` [70]."""

    def fork(self, seed: int) -> "IdleSource":
        """A source for another session: fresh state, its own seed."""


class SpeechGenerator(Protocol):
    """What serves speech in a :class:`SpeechAndIdle` (a :class:`MoDAMotion`)."""

    profile: Profile
    min_hop_ms: int

    def prepare(self, avatar: Avatar, reference: np.ndarray | None = None) -> None:
        """Bind to the avatar; ``reference`` replaces its rest pose as the motion's centre."""

    def generate(self, chunk: SpeechChunk, prev: np.ndarray, emotion: int = EMOTION_NONE,
                 intensity: float = 1.0) -> np.ndarray:
        """Motion [n, 70] for the chunk's new audio, continuing from ``prev`` [70]."""

    def reset(self) -> None:
        """Forget the speech history (after an interruption)."""

    def fork(self, seed: int) -> "SpeechGenerator":
        """A generator for another session: the same networks, fresh state, its own seed."""


class SpeechAndIdle:
    """One :class:`~avatar_agent.types.MotionGenerator`: speech from ``speech``, silence from
    ``idle`` (see the module docstring).

    Args:
        speech: the speech generator.
        idle: the idle source; its rest pose is where silence relaxes to, and speech motion is
            generated around it (``speech.prepare(avatar, reference=idle.rest_pose)``).
    """

    fps = MOTION_FPS

    def __init__(self, speech: SpeechGenerator, idle: IdleSource) -> None:
        self.moda, self.idle_gen = speech, idle
        self.profile: Profile = speech.profile
        self.min_hop_ms = speech.min_hop_ms

    @property
    def rest_pose(self) -> np.ndarray:
        """Where silence relaxes to (the idle source's rest)."""
        return self.idle_gen.rest_pose

    def prepare(self, avatar: Avatar) -> None:
        """Bind both parts to the avatar; speech is generated around the idle source's rest."""
        self.idle_gen.prepare(avatar)
        self.moda.prepare(avatar, reference=self.idle_gen.rest_pose)

    def set_emotion(self, emotion: int, intensity: float = 1.0) -> None:
        """Emotion of idle frames (speech gets it per chunk)."""
        self.idle_gen.set_emotion(emotion, intensity)

    def reset(self) -> None:
        """Forget the speech history; the idle timeline (blinks, sway) goes on."""
        self.moda.reset()

    def fork(self, seed: int) -> "SpeechAndIdle":
        """Another session's generator: the same networks, fresh state, its own seed."""
        return type(self)(self.moda.fork(seed), self.idle_gen.fork(seed))

    def generate(self, chunk: SpeechChunk, prev: np.ndarray, emotion: int = EMOTION_NONE,
                 intensity: float = 1.0) -> np.ndarray:
        """Speech motion from the speech generator, continuing from ``prev``."""
        return self.moda.generate(chunk, prev, emotion, intensity)

    def idle(self, n: int, prev: np.ndarray, t0: float) -> np.ndarray:
        """Silence from the idle source, relaxing from ``prev``."""
        return self.idle_gen.idle(n, prev, t0)


# --------------------------------------------------------------------------------------------
# The official profile's idle source
# --------------------------------------------------------------------------------------------

LID_UPPER = (11, 15)
"""LivePortrait implicit keypoints that move with the upper lids (and the iris): LivePortrait's own
expression editing moves them for gaze, blink and wink, and MoDA's fixed eyeball bias
(:data:`avatar_agent.render.liveportrait.MODA_EYEBALL_BIAS`) is made of the same ones."""
LID_LOWER = (13, 16)
"""LivePortrait implicit keypoints that move with the lower lids (opposite to the upper, ~0.3×)."""
MOUTH = (6, 12, 14, 17, 19, 20)
"""LivePortrait implicit keypoints of the lips (those the MoDA release's lip post-processing
modulates): an interrupted word relaxes on them with ``seam_idle_mouth``."""


@dataclass(frozen=True)
class LivePortraitIdleParams:
    """How the idle track maps into LivePortrait's motion space.

    Keypoint y grows downwards (LivePortrait's warping grid is in image orientation), so closing
    lids move the upper-lid keypoints by +y and the lower-lid keypoints by −y.

    The keypoints and directions follow LivePortrait's own expression edits (its wink and
    eyeball-direction sliders); the depth of a full blink is an estimate from the same edits and
    has not yet been checked on a render with the real weights (none are available here).

    Attributes:
        blink_depth: upper-lid keypoint y shift of a full blink (keypoint units; LivePortrait's
            editing moves these keypoints by 0.001 per slider step; a closed eye is ~30 steps).
        lower_lid: lower-lid shift relative to the upper (negative: towards the upper lid).
        gaze_steps: LivePortrait eyeball-direction steps (vertical) at full idle-track gaze.
        seam_pose: decay time (s) of a ``prev`` mismatch in pose, scale and t.
        seam_idle: decay time (s) of a ``prev`` mismatch in lids, brows and the rest of exp.
        seam_idle_mouth: the same for the lip keypoints (an interrupted word closes quickly).
    """

    blink_depth: float = 0.03
    lower_lid: float = -0.3
    gaze_steps: float = 3.0
    seam_pose: float = 0.3
    seam_idle: float = 0.3
    seam_idle_mouth: float = 0.1


def liveportrait_idle_offsets(track: IdleTrack, params: LivePortraitIdleParams | None = None) -> np.ndarray:
    """Raw LivePortrait motion deltas [T, 70] for an idle track, to add to a rest pose.

    Blink: upper-lid keypoints down, lower-lid keypoints up.  Vertical gaze: LivePortrait's eyeball
    direction edit (upper keypoints follow the gaze, partly compensated, lower ones follow a
    little), faded out while the lids close.  Pose deltas add to pitch/yaw/roll; breathing adds
    to ty (MoDA's drive keeps the source's scale, so the breathing scale would have no effect).
    """
    p = params or LivePortraitIdleParams()
    n = track.blink.shape[0]
    out = np.zeros((n, space.DIM), np.float64)
    blink = track.blink.astype(np.float64)
    # LivePortrait's eyeball-direction edit for a vertical direction y (up positive): upper
    # keypoints −0.001·y plus a "blink" −y/2 of −0.001 each, lower keypoints 0.0003 per blink step.
    y = -p.gaze_steps * track.gaze.astype(np.float64) * (1.0 - blink)      # track: +1 = down
    up_gaze = -0.001 * y + 0.001 * (y / 2)
    low_gaze = -0.0003 * (y / 2)
    for k in LID_UPPER:
        out[:, space.exp_index(k, 1)] = p.blink_depth * blink + up_gaze
    for k in LID_LOWER:
        out[:, space.exp_index(k, 1)] = p.lower_lid * p.blink_depth * blink + low_gaze
    out[:, space.POSE] = track.pose
    out[:, 65] = track.ty
    return out.astype(np.float32)


class LivePortraitIdle:
    """Idle motion for the official profile: the avatar's own pose and expression (the source
    portrait's motion) with the idle layer's blinks, sway, breathing and gaze on top.

    Args:
        seed: seeds the idle layer.
        fps: frame rate.
        idle_params: the profile-neutral :class:`IdleParams`.
        params: :class:`LivePortraitIdleParams`.
    """

    profile: Profile = "official"

    def __init__(self, seed: int = 0, fps: int = 25, idle_params: IdleParams | None = None,
                 params: LivePortraitIdleParams | None = None) -> None:
        self.seed, self.fps = seed, fps
        self.idle_params = idle_params or IdleParams()
        self.params = params or LivePortraitIdleParams()
        self._layer = IdleLayer(seed, fps, self.idle_params)
        self._rest: np.ndarray | None = None
        self._last_target: np.ndarray | None = None
        p = self.params
        tau = np.full(space.DIM, p.seam_pose)
        tau[space.EXP] = p.seam_idle
        for k in MOUTH:
            tau[space.exp_index(k, 0):space.exp_index(k, 2) + 1] = p.seam_idle_mouth
        self._decay = np.exp(-1.0 / (tau * fps))                               # [70] per frame

    def prepare(self, avatar: Avatar) -> None:
        """Bind to an official-profile avatar; the idle timeline starts over."""
        if avatar.profile != "official":
            raise ValueError(f"LivePortraitIdle drives the 'official' profile, the avatar is "
                             f"{avatar.profile!r}")
        rest = np.asarray(avatar.rest_motion, np.float32).reshape(-1)
        if rest.shape != (space.DIM,) or not np.all(np.isfinite(rest)):
            raise ValueError(f"avatar.rest_motion must be a finite [{space.DIM}] vector")
        self._rest = rest.copy()
        self._layer = IdleLayer(self.seed, self.fps, self.idle_params)
        self._last_target = None

    @property
    def rest_pose(self) -> np.ndarray:
        """The source portrait's motion: where silence relaxes to."""
        if self._rest is None:
            raise RuntimeError("LivePortraitIdle: prepare(avatar) first")
        return self._rest

    def fork(self, seed: int) -> "LivePortraitIdle":
        """The same settings for another session, its own seed, no avatar yet."""
        return LivePortraitIdle(seed, self.fps, self.idle_params, self.params)

    def set_emotion(self, emotion: int, intensity: float = 1.0) -> None:
        """Accepted for the protocol: LivePortrait's keypoints have no emotion basis to apply in
        silence (MoDA renders emotion while speaking)."""

    def idle(self, n: int, prev: np.ndarray, t0: float) -> np.ndarray:
        """``n`` idle frames [n, 70] relaxing from ``prev`` (``t0`` unused: the idle layer keeps
        its own frame counter, so sway and blinks continue seamlessly across calls)."""
        rest = self.rest_pose
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        if n == 0:
            return np.zeros((0, space.DIM), np.float32)
        prev = np.asarray(prev, np.float64).reshape(-1)
        if prev.shape != (space.DIM,) or not np.all(np.isfinite(prev)):
            raise ValueError(f"prev must be a finite motion frame [{space.DIM}]")
        target = rest[None].astype(np.float64) + liveportrait_idle_offsets(self._layer.track(n),
                                                                           self.params)
        # Seam: where the idle motion would have been one frame before (its last target when it
        # continues, else its own first frame) is matched to prev, and the mismatch decays.
        before = self._last_target if self._last_target is not None else target[0]
        decay = self._decay[None] ** np.arange(1, n + 1)[:, None]               # [n, 70]
        out = target + (prev - before)[None] * decay
        self._last_target = target[-1].copy()
        return out.astype(np.float32)
