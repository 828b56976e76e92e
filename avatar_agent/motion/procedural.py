"""Procedural motion for the embedded profile: classical lip-sync plus the idle layer, no weights.

Per video frame (25 fps):

1. **Loudness.**  The speech-band (300–3400 Hz) level in dB is compared with a running peak
   (instant attack, 3 dB/s decay, never below −40 dBFS so noise is not amplified) and mapped to a
   loudness 0..1; below a gate (35 dB under the peak, or −62 dBFS) it is 0.  Loudness is smoothed
   with a fast attack (25 ms) and slower release (70 ms): jaws open quickly and close softly.
2. **Audio-only articulation.**  open = jaw estimate: √(amplitude / running peak) · (F1 − 200 Hz)
   / 500 Hz — the first formant rises as the jaw lowers (≈ 300 Hz for i/u, 700–800 Hz for a), so
   loud *open* vowels open the mouth and loud closed ones (i, u, nasals) much less, where plain
   loudness would open all alike; a sharp level drop (≥ 6 dB under the last 120 ms
   while still speaking) reads as a lip closure (p, b, m) and closes the mouth; the low/high band
   ratio reads as rounding (energy below 1 kHz: u, o, w) or spreading (energy above 1.5 kHz: i, e),
   and high-band noise with little voicing as a fricative (slight spread, small opening).
3. **Phoneme articulation** (when the chunk carries TTS phonemes): visemes with Cohen–Massaro
   coarticulation (motion/visemes.py); the audio loudness still scales the opening so stressed
   syllables open wider.
4. **Composition.**  exp = rest expression (mouth closed) + articulation basis · articulation +
   emotion offsets + idle lids/brows; pose/scale/t = rest + idle sway, nods, breathing.
5. **Continuity.**  All filters keep their state across calls, so streaming equals the offline
   result; any difference between ``prev`` and what the generator last produced (another
   generator's frame, an interruption) is added to the new frames and decays geometrically
   (expression: 60 ms while speaking, 300 ms when idling; head pose: 300 ms), so the first frame
   continues from ``prev`` and a mismatch fades out the same way whatever the chunking.

Every offset is a multiple of the face's eye distance measured on ``kp_canonical``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from avatar_agent.audio.features import (AudioInputError, FrameFeatures, check_audio,
                                         frame_features)
from avatar_agent.motion.emotion import emotion_label, emotion_table
from avatar_agent.motion.idle import IdleLayer, IdleParams, IdleTrack, embedded_idle_offsets
from avatar_agent.motion.space import JAW_KEYPOINTS, KP, LIP_KEYPOINTS, lip_opening
from avatar_agent.motion.visemes import (GAP_PER_OPEN, N_PARAMS, OPEN, PRESS, ROUND, SPREAD,
                                         articulation_basis, articulation_to_exp,
                                         articulation_track, face_unit)
from avatar_agent.types import (DIM, EMOTION_NONE, EXP, MOTION_FPS, N_KP, SAMPLE_RATE, SCALE, Avatar,
                                Phoneme, Profile, SpeechChunk)


class MotionInputError(ValueError):
    """Bad input to the motion generator (wrong profile, shapes, not prepared)."""


class NotPrepared(MotionInputError, AttributeError):
    """A per-avatar property read before ``prepare(avatar)``."""


@dataclass(frozen=True)
class ProceduralParams:
    """Lip-sync settings (times in seconds, levels in dB).

    Attributes:
        attack: loudness smoothing time constant while rising.
        release: loudness smoothing time constant while falling.
        range_db: level span mapped to loudness 0..1, ending 2 dB under the running peak.
        gate_db: levels more than this under the running peak are silence.
        floor_dbfs: absolute silence gate.
        peak_decay_db_s: how fast the running peak forgets a loud passage.
        closure_drop_db: a level drop (vs. the last 120 ms) beyond which a lip closure starts.
        closure_span_db: extra drop over which the closure becomes complete.
        round_db: (start, span) of the low/high band ratio mapped to rounding.
        spread_db: (start, span): ratios below start map to spreading.
        open_gain: opening at full loudness and F1 = ``jaw_f1_hz`` span above its base
            (audio-only).
        jaw_f1_hz: (base, span) of the first formant mapped to jaw opening 0..1 (audio-only).
        jaw_floor: share of the opening that loudness gives without a formant (whisper, noisy
            speech still part the lips).
        phoneme_level_mix: with phonemes, open = viseme_open · (1 − mix + mix · loudness).
        heard_audio_mix: with phonemes a recogniser heard (not a TTS's own), the mouth is this
            share of the audio-only articulation and the rest visemes: two independent, noisy
            estimates of the same mouth (wrong phone labels; loudness and formant
            ambiguities), so their mean errs less than either.  It also opens the mouth at
            speech onset when the first phones heard are still closed ones.
        seam_speech: decay time of a ``prev`` mismatch in the expression while speaking (short:
            lips must follow the audio).
        seam_idle: decay time of a ``prev`` mismatch in the expression while idle (lids, brows).
        seam_idle_mouth: the same for lip and jaw keypoints (an interrupted word closes in
            about a fifth of a second, like a natural mouth closure).
        seam_pose: decay time of a ``prev`` mismatch in pose, scale and translation (long: a
            head that jumps reads as a glitch).
        emotion_tau: time constant of emotion changes.
    """

    attack: float = 0.025
    release: float = 0.07
    range_db: float = 24.0
    gate_db: float = 35.0
    floor_dbfs: float = -62.0
    peak_decay_db_s: float = 3.0
    closure_drop_db: float = 6.0
    closure_span_db: float = 8.0
    round_db: tuple[float, float] = (7.0, 10.0)
    spread_db: tuple[float, float] = (6.0, 7.0)
    open_gain: float = 0.85
    jaw_f1_hz: tuple[float, float] = (200.0, 500.0)
    jaw_floor: float = 0.15
    phoneme_level_mix: float = 0.7
    heard_audio_mix: float = 0.5
    seam_speech: float = 0.06
    seam_idle: float = 0.3
    seam_idle_mouth: float = 0.1
    seam_pose: float = 0.3
    emotion_tau: float = 0.3


@dataclass(frozen=True)
class _Face:
    """Everything derived from the avatar once in prepare()."""

    kp: np.ndarray          # [21, 3] canonical keypoints
    unit: float             # eye distance
    basis: np.ndarray       # [5, 63] articulation basis
    emotions: np.ndarray    # [9, 63] emotion offsets at intensity 1
    rest: np.ndarray        # [70] rest pose, mouth closed
    mouth_dims: np.ndarray  # exp indices of lip and jaw keypoints


@dataclass
class _State:
    peak_db: float = -22.0
    history_db: list[float] = field(default_factory=lambda: [-100.0] * 3)
    level: float = 0.0
    jaw: float = 0.0
    presence: float = 0.0
    close: float = 0.0
    spread: float = 0.0
    round: float = 0.0
    emotion: np.ndarray | None = None
    emotion_label: int = EMOTION_NONE
    emotion_intensity: float = 1.0
    last_target: np.ndarray | None = None
    last_audio_exp: np.ndarray | None = None
    last_level: float = 0.0
    last_presence: float = 0.0
    last_art_exp: np.ndarray | None = None
    phonemes: list[Phoneme] = field(default_factory=list)


class ProceduralMotion:
    """MotionGenerator (profile "embedded", 25 fps): energy/viseme lip-sync + idle layer.

    Args:
        params: :class:`ProceduralParams`.
        seed: seeds the idle layer (blinks, sway); same seed + same calls → same motion.
        idle_params: :class:`IdleParams` for the idle layer.
    """

    profile: Profile = "embedded"
    fps = MOTION_FPS
    min_hop_ms = 0

    def __init__(self, params: ProceduralParams | None = None, seed: int = 0,
                 idle_params: IdleParams | None = None) -> None:
        self.params = params or ProceduralParams()
        self.seed = seed
        self.idle_params = idle_params or IdleParams()
        self._spf = SAMPLE_RATE // self.fps
        self._face: _Face | None = None
        self._idle = IdleLayer(seed, self.fps, self.idle_params)
        self._st = _State()

    # ------------------------------------------------------------------ binding

    def prepare(self, avatar: Avatar) -> None:
        """Bind to an embedded-profile avatar and reset all state."""
        if avatar.profile != "embedded":
            raise MotionInputError(f"ProceduralMotion drives the 'embedded' profile, the avatar is "
                                   f"{avatar.profile!r}; prepare it with the embedded renderer")
        kp = np.asarray(avatar.kp_canonical, dtype=np.float64)
        rest = np.asarray(avatar.rest_motion, dtype=np.float64)
        if kp.shape != (N_KP, 3) or rest.shape != (DIM,):
            raise MotionInputError(f"avatar needs kp_canonical [21, 3] and rest_motion [70], got "
                                   f"{kp.shape} and {rest.shape}")
        if not (np.all(np.isfinite(kp)) and np.all(np.isfinite(rest))):
            raise MotionInputError("avatar kp_canonical/rest_motion hold NaN or inf")
        unit = face_unit(kp)
        basis = articulation_basis(kp).astype(np.float64)                          # [5, 63]
        # The rest pose keeps the portrait's own expression but with the mouth closed: silence
        # must show a closed mouth even when the photo was taken mid-word.
        rest = rest.copy()
        gap = float(lip_opening(rest, kp))
        if gap > 0:
            rest[EXP] -= gap / (GAP_PER_OPEN * unit) * basis[OPEN]
        if rest[SCALE] <= 0:
            raise MotionInputError(f"avatar rest_motion scale {rest[SCALE]} must be positive")
        mouth = np.array([3 * k + a for k in LIP_KEYPOINTS + JAW_KEYPOINTS for a in range(3)])
        self._face = _Face(kp=kp, unit=unit, basis=basis,
                           emotions=emotion_table(kp, rest).astype(np.float64), rest=rest,
                           mouth_dims=mouth)
        self.reset()

    def fork(self, seed: int) -> "ProceduralMotion":
        """Another session's generator (same parameters, its own seed, no avatar)."""
        return ProceduralMotion(self.params, seed=seed, idle_params=self.idle_params)

    def idle_track(self, n: int) -> IdleTrack:
        """The idle layer's next ``n`` frames (advancing its timeline), for a speech generator
        that shows this generator's blinks and gaze on its own motion."""
        return self._idle.track(n)

    def reset(self) -> None:
        """Forget all streaming state (filters, idle timeline, emotion); keeps the avatar."""
        self._idle = IdleLayer(self.seed, self.fps, self.idle_params)
        self._st = _State()

    @property
    def rest_pose(self) -> np.ndarray:
        """The motion [70] the generator relaxes to in silence (portrait pose, mouth closed)."""
        if self._face is None:       # also an AttributeError: a runtime Protocol check says "missing"
            raise NotPrepared("rest_pose: call prepare(avatar) first")
        return self._face.rest.astype(np.float32)

    def _require(self) -> _Face:
        if self._face is None:
            raise MotionInputError("call prepare(avatar) before generating motion")
        return self._face

    def set_emotion(self, emotion: int | str = EMOTION_NONE, intensity: float = 1.0) -> None:
        """Emotion used by :meth:`idle` (and by :meth:`generate` until it is given another)."""
        label = emotion_label(emotion)
        if not np.isfinite(intensity) or not 0.0 <= intensity <= 1.0:
            raise MotionInputError(f"intensity={intensity} must be within [0, 1]")
        self._st.emotion_label, self._st.emotion_intensity = label, float(intensity)

    # ------------------------------------------------------------------ MotionGenerator

    def generate(self, chunk: SpeechChunk, prev: np.ndarray, emotion: int = EMOTION_NONE,
                 intensity: float = 1.0) -> np.ndarray:
        """Motion for the chunk's new audio: float32 [n_new / 640, 70], continuing from ``prev``."""
        self._require()
        self.set_emotion(emotion, intensity)
        if chunk.n_new % self._spf:
            raise MotionInputError(f"chunk.n_new={chunk.n_new} must be a multiple of {self._spf} "
                                   f"samples (one {self.fps} fps video frame)")
        audio = check_audio(chunk.audio, "chunk.audio")
        n = chunk.n_new // self._spf
        if chunk.left + chunk.n_new > audio.shape[0]:
            raise MotionInputError("chunk.audio is shorter than left + n_new")
        if n == 0:
            return np.zeros((0, DIM), np.float32)
        feats = frame_features(audio, self.fps, left=chunk.left)
        t0 = chunk.start / SAMPLE_RATE
        times = t0 + (np.arange(n) + 0.5) / self.fps
        # Visemes drive the mouth only for chunks that carry phonemes (TTS); remembered ones
        # supply carry-over from the previous chunk.
        known = self._remember(chunk.phonemes, t0)
        phon = known if chunk.phonemes else []
        return self._run(feats, n, times, phon, prev, speech=chunk.speech)

    def idle(self, n: int, prev: np.ndarray, t0: float) -> np.ndarray:
        """n idle frames relaxing from ``prev`` to the rest pose (mouth closes, sway continues).

        ``t0`` is accepted for the protocol; the idle layer runs on its own frame counter so the
        sway and blink schedule continue seamlessly across speech and idle calls.
        """
        self._require()
        if n < 0:
            raise MotionInputError(f"n={n} must be >= 0")
        if n == 0:
            return np.zeros((0, DIM), np.float32)
        return self._run(None, n, None, [], prev, speech=False)

    def articulate(self, chunk: SpeechChunk, motion: np.ndarray, emotion: int = EMOTION_NONE,
                   intensity: float = 1.0, emotion_exp: np.ndarray | None = None) -> np.ndarray:
        """This generator's mouth on another generator's speech motion for ``chunk``.

        For the tiny MoDA (audio features only, taught by this generator on synthetic speech):
        the lip and jaw keypoints are replaced by this generator's articulation — the viseme
        track when the chunk carries phonemes (TTS: rounding, spreading, p/b/m closure, f/v tuck,
        the same coarticulated track as :meth:`generate`), else the audio-only articulation (jaw
        from loudness × first formant, closures, rounding/spreading from the spectrum) — plus the
        emotion's mouth offsets; the rest of the face and the head keep the given motion.  Why:
        on real speakers the model's own mouth follows their mouth opening barely better than
        the loudness does (and its small off-basis lip motions blur what a tracker reads), while
        the jaw estimate follows it clearly better (bench/lipsync_real.py).

        Advances the lip-sync filters (loudness, jaw, closures) like :meth:`generate`; does not
        touch the idle layer's timeline.  ``emotion_exp`` [n, 63]: the emotion offsets the caller
        already applied to ``motion`` (their mouth part is kept); None = this generator's preset
        for ``emotion`` at ``intensity``.  Returns float32 [n, 70].
        """
        face = self._require()
        m = np.array(motion, dtype=np.float64)
        n = chunk.n_new // self._spf
        if m.shape != (n, DIM):
            raise MotionInputError(f"motion must be [{n}, {DIM}] for a chunk of {n} frames, got "
                                   f"{m.shape}")
        if n == 0:
            return m.astype(np.float32)
        audio = check_audio(chunk.audio, "chunk.audio")
        if chunk.left + chunk.n_new > audio.shape[0]:
            raise MotionInputError("chunk.audio is shorter than left + n_new")
        feats = frame_features(audio, self.fps, left=chunk.left)
        t0 = chunk.start / SAMPLE_RATE
        times = t0 + (np.arange(n) + 0.5) / self.fps
        known = self._remember(chunk.phonemes, t0)
        art, level, presence = self._audio_articulation(feats, n, chunk.speech)
        basis = face.basis.astype(np.float32)
        exp = articulation_to_exp(art.astype(np.float32), basis)
        if chunk.phonemes:
            mix = self.params.phoneme_level_mix
            vis = articulation_track(known, times).astype(np.float64)
            vis[:, OPEN] *= (1.0 - mix) * presence + mix * level
            h = self._heard_mix(chunk.phonemes)
            exp = (1.0 - h) * articulation_to_exp(vis.astype(np.float32), basis) + h * exp
        if emotion_exp is None:
            emo = face.emotions[emotion_label(emotion)] * float(np.clip(intensity, 0.0, 1.0))
            emo = np.broadcast_to(emo, (n, emo.shape[0]))
        else:
            emo = np.asarray(emotion_exp, np.float64)
            if emo.shape not in ((n, 63), (63,)):
                raise MotionInputError(f"emotion_exp must be [{n}, 63] or [63], got {emo.shape}")
            emo = np.broadcast_to(emo, (n, 63))
        d = face.mouth_dims
        m[:, d] = face.rest[d][None] + exp[:, d] + emo[:, d]
        self._clamp_anatomy(m, face.kp)
        return m.astype(np.float32)

    def generate_utterance(self, audio: np.ndarray, phonemes: tuple[Phoneme, ...] | list[Phoneme]
                           | None = None, seed: int = 0, emotion: int = EMOTION_NONE,
                           intensity: float = 1.0) -> np.ndarray:
        """Offline: motion [T = len(audio) // 640, 70] for a whole utterance, from fresh state.

        Deterministic for a given seed; equal to streaming :meth:`generate` over the same audio
        (with ≥ 256 samples of left context and lookahead per chunk).  Phoneme times are seconds
        from the start of ``audio``.  Does not disturb the streaming state.
        """
        self._require()
        a = check_audio(audio, "audio")
        other = ProceduralMotion(self.params, seed, self.idle_params)
        other._face = self._face
        other.set_emotion(emotion, intensity)
        n = a.shape[0] // self._spf
        if n == 0:
            return np.zeros((0, DIM), np.float32)
        feats = frame_features(a, self.fps)
        times = (np.arange(n) + 0.5) / self.fps
        return other._run(feats, n, times, list(phonemes or ()), None, speech=True)

    # ------------------------------------------------------------------ internals

    def _heard_mix(self, phonemes: tuple[Phoneme, ...] | list[Phoneme]) -> float:
        """The audio-only articulation's share for these phonemes (0 for a TTS's own)."""
        return self.params.heard_audio_mix if any(p.heard for p in phonemes) else 0.0

    def _remember(self, phonemes: tuple[Phoneme, ...], t0: float) -> list[Phoneme]:
        """Phonemes of this chunk plus recent ones from earlier chunks (for carry-over).

        The chunk's phonemes are the newest word on the span they cover: a remembered one that
        starts inside it and is not among them is dropped.  TTS phonemes never change, so this
        only matters for live recognition, whose last phones may be relabelled or re-timed once
        more audio is heard (audio/recognizer.py).
        """
        st = self._st
        if phonemes:
            lo, hi = min(p.start for p in phonemes), max(p.end for p in phonemes)
            keep = {(p.symbol, round(p.start, 4)) for p in phonemes}
            st.phonemes = [p for p in st.phonemes if not lo <= p.start < hi
                           or (p.symbol, round(p.start, 4)) in keep]
        known = {(p.symbol, round(p.start, 4)) for p in st.phonemes}
        for p in phonemes:
            if (p.symbol, round(p.start, 4)) not in known:
                st.phonemes.append(p)
        st.phonemes = [p for p in st.phonemes if p.end > t0 - 1.0]
        st.phonemes.sort(key=lambda p: p.start)
        return list(st.phonemes)

    def _audio_articulation(self, feats: FrameFeatures | None, n: int, speech: bool
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Causal loudness → articulation [n, 5], loudness [n], speech presence [n] (state kept)."""
        p, st = self.params, self._st
        dt = 1.0 / self.fps
        a_att = 1.0 - np.exp(-dt / p.attack)
        a_rel = 1.0 - np.exp(-dt / p.release)
        a_shape = 1.0 - np.exp(-dt / 0.05)
        art = np.zeros((n, N_PARAMS))
        level = np.zeros(n)
        presence = np.zeros(n)
        a_pres = 1.0 - np.exp(-dt / 0.12)
        for k in range(n):
            if feats is not None:
                db = float(feats.energy_db[k])
                lh, fric = float(feats.low_high_db[k]), float(feats.fricative_db[k])
                f1 = float(feats.f1[k])
            else:
                db, lh, fric, f1 = -100.0, 0.0, 0.0, 0.0
            st.peak_db = max(db, st.peak_db - p.peak_decay_db_s * dt, -40.0)
            active = speech and db > max(st.peak_db - p.gate_db, p.floor_dbfs)
            top = st.peak_db - 2.0
            raw = np.clip((db - (top - p.range_db)) / p.range_db, 0, 1) if active else 0.0
            drop = max(st.history_db) - db
            close = np.clip((drop - p.closure_drop_db) / p.closure_span_db, 0, 1) if active else 0.0
            st.history_db = st.history_db[1:] + [db]
            voiced = raw > 0.2 and fric < -5.0
            rnd = np.clip((lh - p.round_db[0]) / p.round_db[1], 0, 1) if voiced else 0.0
            spr = np.clip((p.spread_db[0] - lh) / p.spread_db[1], 0, 1) if voiced else 0.0
            if active and not voiced:
                spr = max(spr, 0.5 * np.clip((fric + 5.0) / 15.0, 0, 1))
            st.level += (a_att if raw > st.level else a_rel) * (raw - st.level)
            # Jaw: amplitude relative to the peak, compressed (√, i.e. −12 dB → ½), times how
            # open the vowel is by its first formant (0 where none was found: closures, noise).
            jaw = 0.0
            if active:
                vowel = np.clip((f1 - p.jaw_f1_hz[0]) / p.jaw_f1_hz[1], 0, 1.2)
                vowel = p.jaw_floor + (1.0 - p.jaw_floor) * vowel
                jaw = min(10.0 ** ((db - top) / 40.0), 1.0) * vowel
            # One short time constant both ways: the estimate is already a 40 ms average, and the
            # slower release of `level` made the mouth trail real speakers' by a frame.
            st.jaw += a_att * (jaw - st.jaw)
            # Presence: 1 while the gate is open, released over ~120 ms; gates viseme opening.
            st.presence = 1.0 if active else st.presence + a_pres * (0.0 - st.presence)
            presence[k] = st.presence
            if not active and st.level > 0.05:
                # Hold a closure until the opening has faded: releasing both together would
                # briefly re-open the mouth after a word that ends on a closure.
                close = st.close
            st.close += (a_att if close > st.close else a_rel) * (close - st.close)
            st.round += a_shape * (rnd - st.round)
            st.spread += a_shape * (spr - st.spread)
            level[k] = st.level
            art[k, OPEN] = p.open_gain * st.jaw
            art[k, SPREAD] = 0.8 * st.spread
            art[k, ROUND] = 0.8 * st.round
            art[k, PRESS] = st.close
        return art, level, presence

    def _clamp_anatomy(self, motion: np.ndarray, kp: np.ndarray) -> None:
        """In place: lids and inner lips may meet but never cross (emotion + blink, press + ...)."""
        for upper, lower in (("upper_lid_l", "lower_lid_l"), ("upper_lid_r", "lower_lid_r"),
                             ("upper_lip_inner", "lower_lip_inner")):
            iu, il = 3 * KP[upper] + 1, 3 * KP[lower] + 1
            gap = (kp[KP[lower], 1] + motion[:, il]) - (kp[KP[upper], 1] + motion[:, iu])
            over = np.minimum(gap, 0.0)
            # Split the overlap: both move halfway to the meeting line.
            motion[:, iu] += 0.5 * over
            motion[:, il] -= 0.5 * over

    def _run(self, feats: FrameFeatures | None, n: int, times: np.ndarray | None,
             phonemes: list[Phoneme], prev: np.ndarray | None, speech: bool) -> np.ndarray:
        """Compose n frames: articulation + emotion + idle on the rest pose, then the seam."""
        p, st, face = self.params, self._st, self._require()
        art, level, presence = self._audio_articulation(feats, n, speech)
        mix = p.phoneme_level_mix
        basis = face.basis.astype(np.float32)
        exp_audio = articulation_to_exp(art.astype(np.float32), basis)              # [n, 63]
        exp = exp_audio
        # What the mouth "should" have been one frame earlier under this call's knowledge, for the
        # seam: new phonemes may change it (anticipatory coarticulation), and switching between
        # the phoneme and audio paths (speech ↔ idle, TTS ↔ mic) changes it.
        before_exp = st.last_audio_exp
        if phonemes and times is not None:
            vis = articulation_track(phonemes, times).astype(np.float64)           # [n, 5]
            vis[:, OPEN] *= (1.0 - mix) * presence + mix * level
            exp = articulation_to_exp(vis.astype(np.float32), basis)
            v1 = articulation_track(phonemes, times[:1] - 1.0 / self.fps).astype(np.float64)
            v1[:, OPEN] *= (1.0 - mix) * st.last_presence + mix * st.last_level
            before_exp = articulation_to_exp(v1.astype(np.float32), basis)[0]
            h = self._heard_mix(phonemes)
            if h:
                exp = (1.0 - h) * exp + h * exp_audio
                if st.last_audio_exp is not None:
                    before_exp = (1.0 - h) * before_exp + h * st.last_audio_exp
        correction = np.zeros(63)
        if st.last_art_exp is not None and before_exp is not None:
            correction = before_exp - st.last_art_exp

        # Emotion: first use jumps to the target; changes glide with emotion_tau.
        target_emo = face.emotions[st.emotion_label] * st.emotion_intensity
        if st.emotion is None:
            st.emotion = target_emo.copy()
        a_emo = 1.0 - np.exp(-1.0 / (p.emotion_tau * self.fps))
        emo = np.empty((n, 63))
        for k in range(n):
            st.emotion += a_emo * (target_emo - st.emotion)
            emo[k] = st.emotion

        track = self._idle.track(n, level)
        target = np.repeat(face.rest[None], n, 0)                                  # [n, 70]
        target[:, EXP] += exp + emo
        target += embedded_idle_offsets(track, face.kp, face.rest, self.idle_params)
        self._clamp_anatomy(target, face.kp)

        out = target.copy()
        if prev is not None:
            prev = np.asarray(prev, dtype=np.float64)
            if prev.shape != (DIM,) or not np.all(np.isfinite(prev)):
                raise MotionInputError(f"prev must be a finite motion frame [{DIM}], got "
                                       f"shape {prev.shape}")
            if st.last_target is not None:
                before = st.last_target.copy()
                before[EXP] += correction
            else:
                before = target[0]
            tau = np.full(DIM, p.seam_pose)
            tau[EXP] = p.seam_speech if speech else p.seam_idle
            if not speech:
                tau[face.mouth_dims] = p.seam_idle_mouth
            r = np.exp(-1.0 / (tau * self.fps))                                     # [70]
            out += (prev - before)[None] * r[None] ** np.arange(1, n + 1)[:, None]
        st.last_target = target[-1].copy()
        st.last_level, st.last_presence = float(level[-1]), float(presence[-1])
        st.last_art_exp = exp[-1].astype(np.float64)
        st.last_audio_exp = exp_audio[-1].astype(np.float64)
        return out.astype(np.float32)


__all__ = ["ProceduralMotion", "ProceduralParams", "MotionInputError", "AudioInputError"]
