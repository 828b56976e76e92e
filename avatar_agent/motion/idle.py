"""The idle layer: blinks, head sway, speech-following nods, breathing and gaze, for every profile.

:class:`IdleLayer` produces an :class:`IdleTrack` (profile-neutral signals per frame: blink
closure, head-pose deltas, breathing scale/offset, vertical gaze); :func:`embedded_idle_offsets`
turns it into embedded-space motion deltas.  A generator for another profile maps the same track
with its own lid basis.

Determinism and continuity: every signal is a function of the layer's own frame counter (which
advances on every call, speech or idle) and of its seed, plus two smoothing filters whose state is
kept, so splitting a stretch of frames into calls of any size gives the same frames, and switching
between speech and idle never restarts the sway or the blink schedule.

Gaze: a slow vertical gaze (−1 up … +1 down) shows on the lids (looking down lowers the upper
lids a little, looking up raises lids and brows a little), and the eyes move in saccades:
fixations of 0.3–2 s separated by one-frame jumps of a few degrees (micro-saccades around the
point looked at), now and then a look away and back.  The embedded space has no iris keypoint;
the iris shift travels in the lid keypoints' depth offsets (x: upper lids, y: lower lids), which
the embedded warp renderer reads as gaze (it has no other use for lid depth).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from avatar_agent.motion.space import KP, LID_KEYPOINTS
from avatar_agent.motion.visemes import face_unit
from avatar_agent.types import DIM, N_KP, PITCH, ROLL, SCALE


@dataclass(frozen=True)
class IdleParams:
    """Idle-layer settings.

    Attributes:
        blink_interval: (min, max) seconds between blinks, drawn uniformly.
        blink_duration: seconds from lid start to fully open again (real blinks take
            100–400 ms; shorter than ~0.2 s a 25 fps video shows the eye shut in one frame at
            most, which a viewer or a face tracker easily misses).
        double_blink_p: probability that a blink is followed by a second one.
        double_blink_gap: seconds between the starts of the two blinks of a double blink.
        sway_deg: amplitude of slow head sway (pitch, yaw, roll) in degrees.
        drift_deg: standard deviation of a random head drift (pitch, yaw, roll) in degrees,
            added to the sway so that head motion never repeats (the sinusoids alone read as a
            loop after a while).
        drift_tau: correlation time of that drift in seconds.
        nod_deg: pitch amplitude of the nods that follow speech emphasis, degrees.
        speech_sway_gain: extra sway while speaking (1 = doubles at full loudness).
        breath_hz: breathing rate.
        breath_scale: relative scale change of a breath (the chest lifts the head slightly).
        breath_ty: vertical offset of a breath in crop units.
        gaze_lid: upper-lid shift at full down-gaze, as a fraction of the lid gap.
        gaze_brow: brow raise at full up-gaze, in face units (eye distances).
        saccade_interval: (min, max) seconds of a fixation between two saccades.
        saccade_micro: standard deviation of a micro-saccade's iris shift, face units.
        look_away_p: probability that a saccade looks away (or back, when looking away).
        look_away: (min, max) iris shift of a look away, face units.
        gaze_iris: vertical iris shift at full slow down-gaze, face units.
    """

    blink_interval: tuple[float, float] = (2.0, 6.0)
    blink_duration: float = 0.24
    double_blink_p: float = 0.15
    double_blink_gap: float = 0.30
    sway_deg: tuple[float, float, float] = (1.0, 1.6, 0.7)
    drift_deg: tuple[float, float, float] = (0.6, 1.0, 0.4)
    drift_tau: float = 2.5
    nod_deg: float = 3.0
    speech_sway_gain: float = 1.0
    breath_hz: float = 0.25
    breath_scale: float = 0.003
    breath_ty: float = 0.003
    gaze_lid: float = 0.12
    gaze_brow: float = 0.012
    saccade_interval: tuple[float, float] = (0.3, 2.0)
    saccade_micro: float = 0.006
    look_away_p: float = 0.2
    look_away: tuple[float, float] = (0.02, 0.035)
    gaze_iris: float = 0.012


@dataclass(frozen=True, slots=True)
class IdleTrack:
    """Idle signals for T consecutive frames.

    Attributes:
        blink: [T] lid closure 0 (open) … 1 (closed).
        pose: [T, 3] pitch, yaw, roll deltas in degrees.
        scale: [T] relative scale change (0 = none).
        ty: [T] vertical offset in crop units.
        gaze: [T] vertical gaze, −1 up … +1 down.
        iris: [T, 2] iris shift (x right, y down) in face units, or None (eyes fixed).
    """

    blink: np.ndarray
    pose: np.ndarray
    scale: np.ndarray
    ty: np.ndarray
    gaze: np.ndarray
    iris: np.ndarray | None = None


def blink_shape(tau: np.ndarray, duration: float) -> np.ndarray:
    """Lid closure of one blink ``tau`` s after it starts: fast close, brief hold, slower open.

    Closing takes 37 % of the blink, the lid stays shut for 13 %, reopening takes the rest
    (reopening is about twice as slow as closing in real blinks).
    """
    x = np.asarray(tau, dtype=np.float64) / duration
    t_close, t_hold = 0.37, 0.50

    def smooth(u: np.ndarray) -> np.ndarray:
        u = np.clip(u, 0.0, 1.0)
        return u * u * (3.0 - 2.0 * u)

    up = smooth(x / t_close)
    down = 1.0 - smooth((x - t_hold) / (1.0 - t_hold))
    out = np.where(x < t_close, up, np.where(x < t_hold, 1.0, down))
    return np.where((x < 0) | (x >= 1.0), 0.0, out)


@dataclass
class _IdleState:
    frame: int = 0
    blink_times: list[float] = field(default_factory=list)
    next_blink: float = 0.0
    level_fast: float = 0.0
    level_slow: float = 0.0
    drift_raw: np.ndarray = field(default_factory=lambda: np.zeros(3))
    iris: np.ndarray = field(default_factory=lambda: np.zeros(2))
    look: np.ndarray = field(default_factory=lambda: np.zeros(2))
    next_saccade: float = 0.5
    drift: np.ndarray = field(default_factory=lambda: np.zeros(3))


class IdleLayer:
    """Seeded idle motion with state carried across calls (see module docstring).

    Args:
        seed: seeds the blink schedule and the sway/gaze waveforms.
        fps: frames per second of the tracks.
        params: :class:`IdleParams`.
    """

    def __init__(self, seed: int = 0, fps: int = 25, params: IdleParams | None = None) -> None:
        if fps <= 0:
            raise ValueError(f"fps={fps} must be positive")
        self.fps = fps
        self.seed = seed
        self.params = params or IdleParams()
        lo, hi = self.params.blink_interval
        if not 0 < lo <= hi:
            raise ValueError(f"blink_interval={self.params.blink_interval} must be 0 < min <= max")
        self.reset()

    def reset(self) -> None:
        """Start over: frame 0, fresh blink schedule (same seed → same frames again)."""
        lo = self.params.blink_interval[0]
        rng = np.random.default_rng(self.seed)
        # Sway: 3 incommensurate sinusoids per axis (0.05–0.35 Hz) read as organic drift.
        self._sway_f = rng.uniform(0.05, 0.35, (3, 3))
        self._sway_ph = rng.uniform(0, 2 * np.pi, (3, 3))
        self._sway_a = rng.uniform(0.5, 1.0, (3, 3))
        self._sway_a /= self._sway_a.sum(1, keepdims=True)
        self._gaze_f = rng.uniform(0.03, 0.12, 2)
        self._gaze_ph = rng.uniform(0, 2 * np.pi, 2)
        self._breath_ph = rng.uniform(0, 2 * np.pi)
        self._blink_rng = np.random.default_rng([self.seed, 1])
        self._drift_rng = np.random.default_rng([self.seed, 2])
        self._saccade_rng = np.random.default_rng([self.seed, 3])
        self._state = _IdleState(next_blink=float(self._blink_rng.uniform(0.5, lo + 0.5)))

    @property
    def frame(self) -> int:
        """Frames produced so far (the layer's own timeline)."""
        return self._state.frame

    def _extend_blinks(self, until: float) -> None:
        p, st = self.params, self._state
        while st.next_blink <= until:
            t = st.next_blink
            st.blink_times.append(t)
            if self._blink_rng.random() < p.double_blink_p:
                st.blink_times.append(t + p.double_blink_gap)
            st.next_blink = t + float(self._blink_rng.uniform(*p.blink_interval))
        # Forget blinks that can no longer touch future frames.
        horizon = self._state.frame / self.fps - 2.0
        st.blink_times = [b for b in st.blink_times if b > horizon]

    def track(self, n: int, level: np.ndarray | None = None) -> IdleTrack:
        """The next ``n`` frames of idle signals.

        Args:
            n: number of frames.
            level: [n] speech loudness in [0, 1] (None or zeros in silence); drives nods and
                livelier sway while speaking.
        """
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        p, st = self.params, self._state
        lvl = np.zeros(n) if level is None else np.clip(np.asarray(level, dtype=np.float64), 0, 1)
        if lvl.shape != (n,):
            raise ValueError(f"level must have shape ({n},), got {lvl.shape}")
        t = (st.frame + np.arange(n)) / self.fps                                   # [n]
        self._extend_blinks(float(t[-1]) if n else 0.0)
        blink = np.zeros(n)
        for b in st.blink_times:
            blink = np.maximum(blink, blink_shape(t - b, p.blink_duration))

        # Speech envelope filters: fast (80 ms) minus slow (600 ms) = emphasis onsets → nods.
        a_fast = 1.0 - np.exp(-1.0 / (0.08 * self.fps))
        a_slow = 1.0 - np.exp(-1.0 / (0.6 * self.fps))
        fast, slow = np.empty(n), np.empty(n)
        for k in range(n):
            st.level_fast += a_fast * (lvl[k] - st.level_fast)
            st.level_slow += a_slow * (lvl[k] - st.level_slow)
            fast[k], slow[k] = st.level_fast, st.level_slow
        emphasis = np.maximum(fast - slow, 0.0)

        waves = np.sin(2 * np.pi * self._sway_f[None] * t[:, None, None] + self._sway_ph[None])
        sway = (waves * self._sway_a[None]).sum(-1) * np.asarray(p.sway_deg)[None]  # [n, 3]
        sway *= (1.0 + p.speech_sway_gain * slow)[:, None]
        # Head drift: an Ornstein-Uhlenbeck process per axis (unit variance), low-passed once
        # more (0.5 s) so it has no jitter; one draw per frame in order, so any split of the
        # frames into calls gives the same drift.
        a_d = 1.0 - np.exp(-1.0 / (p.drift_tau * self.fps))
        a_s = 1.0 - np.exp(-1.0 / (0.5 * self.fps))
        noise = self._drift_rng.standard_normal((n, 3)) * np.sqrt(a_d * (2.0 - a_d))
        drift = np.empty((n, 3))
        for k in range(n):
            st.drift_raw = (1.0 - a_d) * st.drift_raw + noise[k]
            st.drift = st.drift + a_s * (st.drift_raw - st.drift)
            drift[k] = st.drift
        pose = sway + drift * np.asarray(p.drift_deg)[None]
        pose[:, 0] += p.nod_deg * emphasis          # pitch: a short dip on each stressed onset
        pose[:, 2] += 0.3 * p.nod_deg * emphasis * np.sin(2 * np.pi * 0.17 * t + self._breath_ph)

        breath = np.sin(2 * np.pi * p.breath_hz * t + self._breath_ph)
        gaze = 0.6 * np.sin(2 * np.pi * self._gaze_f[0] * t + self._gaze_ph[0]) + \
            0.4 * np.sin(2 * np.pi * self._gaze_f[1] * t + self._gaze_ph[1])
        iris = self._saccades(t) + (p.gaze_iris * gaze)[:, None] * np.array([0.0, 1.0])
        st.frame += n
        return IdleTrack(blink=blink.astype(np.float32), pose=pose.astype(np.float32),
                         scale=(p.breath_scale * breath).astype(np.float32),
                         ty=(p.breath_ty * breath).astype(np.float32),
                         gaze=gaze.astype(np.float32), iris=iris.astype(np.float32))

    def _saccades(self, t: np.ndarray) -> np.ndarray:
        """Iris shift [n, 2] at times ``t``: fixations held, one-frame jumps between them."""
        p, st, rng = self.params, self._state, self._saccade_rng
        out = np.empty((t.shape[0], 2))
        for k, tk in enumerate(t):
            while tk >= st.next_saccade:
                if rng.random() < p.look_away_p:
                    if np.any(st.look):                             # look back
                        st.look = np.zeros(2)
                    else:                                           # look away, mostly sideways
                        a = rng.uniform(0, 2 * np.pi)
                        st.look = rng.uniform(*p.look_away) * np.array([np.cos(a),
                                                                          0.5 * np.sin(a)])
                st.iris = st.look + rng.normal(0.0, p.saccade_micro, 2)
                st.next_saccade += float(rng.uniform(*p.saccade_interval))
            out[k] = st.iris
        return out


def embedded_idle_offsets(track: IdleTrack, kp_canonical: np.ndarray, rest_motion: np.ndarray,
                          params: IdleParams | None = None) -> np.ndarray:
    """Embedded-space motion deltas [T, 70] for an idle track, to add to a motion sequence.

    Blinks bring each upper lid 90 % and the lower lid 10 % of the way across that eye's open gap
    at rest (so a blink closes the eye whatever its size); gaze moves the upper lids and brows;
    pose deltas add to pitch/yaw/roll; breathing scales and shifts.
    """
    p = params or IdleParams()
    kp = np.asarray(kp_canonical, dtype=np.float64)
    rest = np.asarray(rest_motion, dtype=np.float64)
    pts = kp + rest[:63].reshape(N_KP, 3)
    u = face_unit(kp)
    n = track.blink.shape[0]
    out = np.zeros((n, DIM))
    gaze_down = np.clip(track.gaze, 0, 1)
    gaze_up = np.clip(-track.gaze, 0, 1)
    for up, lo in (("upper_lid_l", "lower_lid_l"), ("upper_lid_r", "lower_lid_r")):
        gap = max(pts[KP[lo], 1] - pts[KP[up], 1], 0.0)
        close = track.blink * gap
        # Gaze fades out as the lid closes, so blink + down-gaze never pushes the lid past shut.
        gaze_shift = p.gaze_lid * gap * (gaze_down - 0.5 * gaze_up)
        out[:, 3 * KP[up] + 1] = 0.9 * close + (1.0 - track.blink) * gaze_shift
        out[:, 3 * KP[lo] + 1] = -0.1 * close
    for name in ("brow_inner_l", "brow_outer_l", "brow_inner_r", "brow_outer_r"):
        # Brows dip slightly with a blink (orbicularis pulls them) and rise on up-gaze.
        out[:, 3 * KP[name] + 1] = -p.gaze_brow * u * gaze_up + 0.01 * u * track.blink
    if track.iris is not None:
        # the iris shift rides on the lids' depth offsets (see the module docstring)
        for name in ("upper_lid_l", "upper_lid_r"):
            out[:, 3 * KP[name] + 2] = track.iris[:, 0] * u
        for name in ("lower_lid_l", "lower_lid_r"):
            out[:, 3 * KP[name] + 2] = track.iris[:, 1] * u
    out[:, PITCH:ROLL + 1] = track.pose
    out[:, SCALE] = rest[SCALE] * track.scale
    out[:, 65] = track.ty
    return out.astype(np.float32)


EYE_DIMS = np.array([3 * k + a for k in LID_KEYPOINTS for a in (1, 2)])
"""Motion dims of the lids (y: opening, z: the gaze they carry)."""


def impose_idle_eyes(motion: np.ndarray, track: IdleTrack, kp_canonical: np.ndarray,
                     rest_motion: np.ndarray, expression: np.ndarray | None = None) -> None:
    """In place: the lids of ``motion`` [n, 70] show the idle track's blinks and gaze on the rest
    pose plus ``expression`` [n, 63] (an emotion's lid offsets), whatever they showed before.

    For a speech generator whose own blinks are faint (the tiny MoDA learned them from a random
    schedule it cannot predict from audio, so it smears them): the idle layer's timeline then
    runs through speech too.
    """
    rest = np.asarray(rest_motion, dtype=np.float64)
    off = embedded_idle_offsets(track, kp_canonical, rest)                    # [n, 70]
    val = rest[EYE_DIMS][None] + off[:, EYE_DIMS]
    if expression is not None:
        val = val + np.asarray(expression, dtype=np.float64)[:, EYE_DIMS]
    motion[:, EYE_DIMS] = val
