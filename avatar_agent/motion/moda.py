"""MoDA motion generation: audio features → DiT sampler → 70-d motion.

:class:`MoDAMotion` is the streaming :class:`~avatar_agent.types.MotionGenerator`: per hop it
samples a window of W frames starting at the first new frame (the audio after it is lookahead),
conditioned on the last emitted frame (first-frame continuity, as the release chains its
segments), and emits the new frames.  Features come from any callable ``audio(float32 16 kHz) ->
[T, blocks, dim]`` (HuBERT for the official profile, mel features for the embedded one).  The
release's offline path (80-frame segments, lip post-processing) is kept as a test reference in
tests/reference/moda_release.py; loading this project's own exports is in
:mod:`avatar_agent.motion.moda_load`.

Normalised ("model") space vs raw space: raw motion is what renderers consume; model space
divides scale and t by the source's rescale ratio ``rr = (s_src + 1e-5)/(mean_scale + 1e-5)`` and
normalises with ``(x − mean)/(std + 1e-5)``.
"""

from __future__ import annotations

import copy

from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

from avatar_agent.motion import space
from avatar_agent.motion.compose import SpeechAndIdle
from avatar_agent.motion.emotion import emotion_label
from avatar_agent.motion.emotion import EmotionLayer
from avatar_agent.motion.idle import impose_idle_eyes
from avatar_agent.nn.hubert import HOP
from avatar_agent.nn.moda import DiTRunner, MoDADiT, MoDAParams, TracedDiT
from avatar_agent.nn.sampling import Conditions, Guidance, guided_velocity, sample_flow
from avatar_agent.types import EMOTION_NONE, MOTION_FPS, Avatar, Profile, SpeechChunk

if TYPE_CHECKING:
    from avatar_agent.motion.procedural import ProceduralMotion

OVERLAP = 16
"""Frames the default hop leaves to a window's look-ahead (the release's segment overlap)."""
SMOOTH_DIMS = slice(63, 70)

Features = Callable[[np.ndarray], "torch.Tensor | np.ndarray"]


@runtime_checkable
class StreamFeatures(Protocol):
    """Features with per-session state (live HuBERT with remembered context,
    :class:`~avatar_agent.nn.hubert.StreamingHubert`): told where each chunk's audio sits."""

    def __call__(self, audio: np.ndarray) -> "torch.Tensor | np.ndarray":
        """Stateless features of ``audio``."""
        ...

    def at(self, audio: np.ndarray, start: int) -> "torch.Tensor | np.ndarray":
        """Features of ``audio`` starting at sample ``start`` of the session's audio timeline."""
        ...

    def reset(self) -> None:
        """Forget the session's state."""
        ...

    def fork(self) -> "StreamFeatures":
        """The same network with fresh state, for another session."""
        ...


# --------------------------------------------------------------------------------------------
# Motion-space helpers (numpy, raw ↔ model space)
# --------------------------------------------------------------------------------------------


def rescale_ratio(source_scale: float, mean: np.ndarray) -> float:
    """``rr = (s_src + 1e-5)/(mean[63] + 1e-5)``: maps model-space scale/t to this source."""
    return float((np.float32(source_scale) + np.float32(1e-5)) / (mean[space.SCALE] + np.float32(1e-5)))


def to_model_space(raw: np.ndarray, mean: np.ndarray, std: np.ndarray, rr: float) -> np.ndarray:
    """Raw motion [..., 70] → normalised model space (scale and t divided by rr first)."""
    m = np.array(raw, dtype=np.float32, copy=True)
    m[..., 63:67] = m[..., 63:67] / np.float32(rr)
    return space.normalise(m, mean, std).astype(np.float32)


def from_model_space(norm: np.ndarray, mean: np.ndarray, std: np.ndarray, rr: float) -> np.ndarray:
    """Inverse of :func:`to_model_space`."""
    m = space.denormalise(np.asarray(norm, np.float32), mean, std).astype(np.float32)
    m[..., 63:67] = m[..., 63:67] * np.float32(rr)
    return m


def smooth_pose(motion: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Centred moving mean over frames of dims 63..69 (scale, t, pose); ends use a truncated window.

    motion [..., T, 70]; the mean is computed from an unsmoothed copy; exp is untouched.
    """
    half = window // 2
    src = motion[..., SMOOTH_DIMS].clone()                                       # [..., T, 7]
    out = motion.clone()
    n = motion.shape[-2]
    if n > 2 * half:   # full windows at once: 5× faster; bit-equal to per-frame means for 3
        out[..., half:n - half, SMOOTH_DIMS] = src.unfold(-2, window, 1).mean(-1)
    for i in [*range(min(half, n)), *range(max(half, n - half), n)]:             # the ends
        lo, hi = max(0, i - half), min(n, i + half + 1)
        out[..., i, SMOOTH_DIMS] = src[..., lo:hi, :].mean(dim=-2)
    return out


# --------------------------------------------------------------------------------------------
# Streaming generator
# --------------------------------------------------------------------------------------------


class MoDAMotion:
    """Streaming :class:`~avatar_agent.types.MotionGenerator` around a MoDA DiT.

    Per :meth:`generate` call the chunk's whole audio (left context + new + lookahead) goes through
    ``features``; then windows of W frames starting at the first not-yet-emitted frame are sampled
    (audio beyond the chunk is zero, as the release pads its last segment), each conditioned on the
    previous emitted frame, and at most ``hop`` frames of each window are emitted.

    Window seams: each window is conditioned on the last emitted frame (the release's first-frame
    continuity), which keeps position continuous but not velocity — consecutive windows start from
    fresh noise.  So the frames a window predicted *beyond* what it emitted are kept, and the next
    window's first ``crossfade`` frames are blended linearly from them into its own prediction:
    head pose/scale/translation over the whole crossfade, expression only over frames whose audio
    the earlier window actually had (its lookahead), because past that it saw zero-padded audio.

    Args:
        model: the DiT (any preset), or a faster runner of it
            (:class:`~avatar_agent.nn.moda.TracedDiT`, :class:`~avatar_agent.nn.moda_onnx.OnnxDiT`).
        features: ``audio(float32 16 kHz [S]) -> [S // 640, blocks, dim]``.
        mean, std: motion statistics of the model's training data.
        profile: "official" or "embedded".
        null_audio: CFG null audio feature broadcastable to [1, W, U, L, D] (default zeros).
        guidance: CFG scales (default: the release's single scale 1.2).
        window: W frames per sampled window (default ``params.seq_len``).
        hop: max frames emitted per window (default W − 16 for W > 32, else 3/4 of W).
        steps: Euler steps.
        final_step: take the sampler grid's last, 0.1 % step (the release does; see
            :func:`avatar_agent.nn.sampling.sample_flow`).
        feature_context: frames of left context the features need (None = all the chunk has:
            HuBERT's receptive field is the whole input; 1 for frame-local mel features, which
            then skip the rest of the left context).
        crossfade: frames blended across window seams (0 = off).
        min_hop_ms: the shortest chunk hop this generator is meant for (one DiT window per hop);
            the agent raises ``chunker.hop_ms`` to it.
        context: frames already shown that each window re-uses as pinned context
            (inpainting, see :meth:`_sample`): new frames then sit ``context`` frames into the
            window instead of at its prev-conditioned start, with the audio before them in view.
            Short live hops need it: emitting only a window's first frames every 160 ms lets
            the continuity condition dominate (the mouth lags and stays open in pauses).
        relative: model space is relative to a reference pose (the avatar's rest, or the one given
            to :meth:`prepare`), no rescale ratio — how the embedded tiny model is trained.
        identity: a fixed identity condition [63] used instead of the avatar's keypoints
            (relative models are trained identity-agnostic).
        device: torch device for the DiT.
        seed: seed of the noise generator (reproducible sessions).
    """

    fps = MOTION_FPS

    def __init__(self, model: DiTRunner, features: Features, mean: np.ndarray,
                 std: np.ndarray, *, profile: Profile = "official",
                 null_audio: torch.Tensor | None = None,
                 guidance: Guidance = Guidance.release(1.2), window: int | None = None,
                 hop: int | None = None, steps: int = 10, final_step: bool = True,
                 feature_context: int | None = None, crossfade: int = 0, min_hop_ms: int = 0,
                 context: int = 0,
                 relative: bool = False, identity: np.ndarray | None = None,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        p = model.params
        if isinstance(model, MoDADiT):
            model = model.eval().to(device)
        self.model, self.features, self.profile = model, features, profile
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if self.mean.shape != (p.motion_dim,) or self.std.shape != (p.motion_dim,):
            raise ValueError(f"mean/std must be [{p.motion_dim}], got {self.mean.shape}/{self.std.shape}")
        self.window = window or p.seq_len
        self.hop = hop or (self.window - OVERLAP if self.window > 2 * OVERLAP
                           else max(1, self.window * 3 // 4))
        if not 1 <= self.hop <= self.window:
            raise ValueError(f"hop must be in 1..window={self.window}, got {self.hop}")
        if not 0 <= crossfade < self.window:
            raise ValueError(f"crossfade must be in 0..window-1={self.window - 1}, got {crossfade}")
        self.null_audio = (null_audio if null_audio is not None
                           else torch.zeros(1, 1, 1, 1, p.audio_dim)).float()
        self.guidance, self.steps = guidance, steps
        self.crossfade, self.min_hop_ms = crossfade, min_hop_ms
        self.final_step, self.feature_context = final_step, feature_context
        self.relative = relative
        if not 0 <= context < self.window:
            raise ValueError(f"context must be in 0..window-1={self.window - 1}, got {context}")
        self.context = context
        self._hist: torch.Tensor | None = None          # model-space frames shown, newest last
        self._hist_end = -1                             # source frame index after them
        self.fixed_identity = None if identity is None else np.asarray(identity, np.float32).reshape(-1)
        if self.fixed_identity is not None and self.fixed_identity.size != p.id_dim:
            raise ValueError(f"identity must have {p.id_dim} values, got {self.fixed_identity.size}")
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.identity: torch.Tensor | None = None
        self.rest: np.ndarray | None = None
        self.rr = 1.0
        # Seam state: model-space frames predicted past the last emitted one, the source frame
        # index they start at and how many of them had real audio.
        self._ahead: torch.Tensor | None = None
        self._ahead_at = -1
        self._ahead_real = 0

    @property
    def params(self) -> MoDAParams:
        """The DiT's hyper-parameters."""
        return self.model.params

    def prepare(self, avatar: Avatar, reference: np.ndarray | None = None) -> None:
        """Bind to an avatar: identity = canonical keypoints (or the fixed identity), rr from the
        rest pose's scale; ``reference`` replaces ``avatar.rest_motion`` as the rest pose (e.g.
        the idle layer's mouth-closed rest, which relative models were trained around)."""
        if avatar.profile != self.profile:
            raise ValueError(f"avatar profile {avatar.profile!r} does not match the motion "
                             f"generator's {self.profile!r}")
        kp = np.asarray(avatar.kp_canonical, np.float32).reshape(-1)
        if kp.size != self.params.id_dim:
            raise ValueError(f"avatar.kp_canonical has {kp.size} values, the model needs "
                             f"{self.params.id_dim}")
        if self.fixed_identity is not None:
            kp = self.fixed_identity
        self.identity = torch.from_numpy(kp.copy())
        rest = avatar.rest_motion if reference is None else reference
        self.rest = np.asarray(rest, np.float32).reshape(space.DIM).copy()
        self.rr = 1.0 if self.relative else rescale_ratio(self.rest[space.SCALE], self.mean)
        self._ahead, self._hist = None, None
        if isinstance(self.model, TracedDiT) and not self.model.traced:
            self._warm_up()

    @torch.no_grad()
    def _warm_up(self) -> None:
        """Trace the window shape now (≈1 s once per process) rather than in the first speech hop,
        which would then miss its frames' deadlines.  Uses its own noise: sessions stay seeded."""
        p = self.params
        state = self.generator.get_state()
        self._sample(torch.zeros(p.motion_dim),
                     torch.zeros(self.window, p.audio_unit_len, p.audio_blocks, p.audio_dim),
                     EMOTION_NONE)
        self.generator.set_state(state)

    def _to_model(self, raw: np.ndarray) -> np.ndarray:
        assert self.rest is not None
        if self.relative:
            raw = np.asarray(raw, np.float32) - self.rest
        return to_model_space(raw, self.mean, self.std, self.rr)

    def _from_model(self, norm: np.ndarray) -> np.ndarray:
        assert self.rest is not None
        raw = from_model_space(norm, self.mean, self.std, self.rr)
        return raw + self.rest if self.relative else raw

    def _features(self, audio: np.ndarray, start: int) -> torch.Tensor:
        p = self.params
        if isinstance(self.features, StreamFeatures):
            f = torch.as_tensor(self.features.at(audio, start)).float()          # [T, L, D]
        else:
            f = torch.as_tensor(self.features(audio)).float()
        if f.dim() == 3:
            f = f[:, None]                                                       # [T, 1, L, D]
        if tuple(f.shape[1:]) != (p.audio_unit_len, p.audio_blocks, p.audio_dim):
            raise ValueError(f"features gave {tuple(f.shape)}, the model needs "
                             f"[T, {p.audio_blocks}, {p.audio_dim}]")
        return f

    def _blend_seam(self, x: torch.Tensor, frame: int) -> torch.Tensor:
        """Crossfade window x [W, 70] (first frame = source frame ``frame``) from the previous
        window's look-ahead prediction, if that prediction continues exactly here."""
        ahead = self._ahead
        if ahead is None or self.crossfade == 0 or frame != self._ahead_at:
            return x                       # idle, an interruption or a jump in between: no seam
        k = min(self.crossfade, ahead.shape[0], x.shape[0])
        w = (torch.arange(1, k + 1, dtype=torch.float32) / (self.crossfade + 1))[:, None]  # [k, 1]
        x = x.clone()
        x[:k, SMOOTH_DIMS] = (1 - w) * ahead[:k, SMOOTH_DIMS] + w * x[:k, SMOOTH_DIMS]
        e = min(k, self._ahead_real)
        x[:e, :63] = (1 - w[:e]) * ahead[:e, :63] + w[:e] * x[:e, :63]
        return x

    def _sample(self, prev: torch.Tensor, audio: torch.Tensor, emotion: int,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """One window x0 [W, 70] (model space) from fresh noise.

        ``context`` [k, 70]: known frames pinned at the window's start by replacement
        ("inpainting"): after every Euler step they are reset to ``σ·ε + (1 − σ)·context`` — the
        rectified-flow interpolant at the new σ, with their own initial noise ε — so the frames
        after them are generated consistent with what was already shown.
        """
        assert self.identity is not None
        p, dev = self.params, self.device
        cond = Conditions(prev=prev.reshape(1, 1, -1).to(dev), audio=audio[None].to(dev),
                          emotion=torch.tensor([emotion], device=dev),
                          identity=self.identity.reshape(1, -1).to(dev),
                          null_audio=self.null_audio.to(dev))
        velocity = guided_velocity(self.model, cond, self.guidance)
        x = torch.randn((1, audio.shape[0], p.motion_dim), generator=self.generator).to(dev)
        pin = None
        if context is not None and context.shape[0]:
            k = context.shape[0]
            ctx, eps = context.to(dev)[None], x[:, :k].clone()

            def pin(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                x[:, :k] = sigma * eps + (1 - sigma) * ctx
                return x

        x = sample_flow(velocity, x, self.steps, final_step=self.final_step, after_step=pin)
        return x[0].cpu()

    @torch.no_grad()
    def generate(self, chunk: SpeechChunk, prev: np.ndarray, emotion: int = EMOTION_NONE,
                 intensity: float = 1.0) -> np.ndarray:
        """Raw motion [n_new / 640, 70] for the chunk's new audio, continuing from ``prev`` [70].

        ``intensity`` scales the expression's deviation from the avatar's rest expression.
        """
        if self.identity is None or self.rest is None:
            raise RuntimeError("MoDAMotion.generate called before prepare(avatar)")
        emotion = emotion_label(emotion)
        n_new = chunk.n_new // HOP
        if n_new < 1:
            raise ValueError(f"chunk has {chunk.n_new} new samples, less than one frame ({HOP})")
        if chunk.audio.size < chunk.left + chunk.n_new:
            raise ValueError("chunk.audio is shorter than left + n_new")
        # Drop the partial frame at the start so video frames align with the first new sample,
        # and any left context neither the features nor the motion context need.
        skip, first = chunk.left % HOP, chunk.left // HOP
        if self.feature_context is not None and first > self.feature_context + self.context:
            keep = self.feature_context + self.context
            skip, first = skip + (first - keep) * HOP, keep
        feats = self._features(chunk.audio[skip:], chunk.start - chunk.left + skip)  # [F, U, L, D]
        if feats.shape[0] < first + n_new:
            raise ValueError(f"features gave {feats.shape[0]} frames for a chunk needing "
                             f"{first + n_new} (left context + new audio); the feature callable "
                             "must return one frame per 640 samples")
        real = min(feats.shape[0], (chunk.audio.size - skip) // HOP)            # frames with audio
        frame0 = chunk.start // HOP
        # Motion history (model space): our own last frames when this chunk continues them,
        # else just the frame the agent showed last (after idle, an interruption, a swap).
        if self._hist is not None and self._hist_end == frame0:
            hist = self._hist
        else:
            prev = np.asarray(prev, np.float32).reshape(space.DIM)
            hist = torch.from_numpy(self._to_model(prev)).reshape(1, -1)
        out: list[torch.Tensor] = []
        done = 0
        while done < n_new:
            # Window = [k context frames already shown | new frames | lookahead | zero padding],
            # conditioned on the frame before the context (MoDA's first-frame continuity).  Only
            # a call's first window takes context: inside a long chunk the windows chain on their
            # last frame as the release does, and emit their early frames, whose future audio
            # is in view (frames deep in a window lag the audio).
            k = min(self.context, hist.shape[0] - 1, first + done) if done == 0 else 0
            take = min(self.hop, n_new - done, self.window - k)
            a = feats[first + done - k : first + done - k + self.window]         # [≤W, U, L, D]
            if a.shape[0] < self.window:
                a = torch.cat([a, a.new_zeros((self.window - a.shape[0],) + tuple(a.shape[1:]))])
            ctx = hist[hist.shape[0] - k :] if k else None
            x = smooth_pose(self._sample(hist[-k - 1], a, emotion, ctx)[None])[0]  # [W, 70]
            new = self._blend_seam(x[k:], frame0 + done)
            out.append(new[:take])
            hist = torch.cat([hist, new[:take]])[-(self.context + 1):]
            done += take
            self._ahead, self._ahead_at = new[take:], frame0 + done
            self._ahead_real = max(0, real - (first + done))
        self._hist, self._hist_end = hist, frame0 + n_new
        raw = self._from_model(torch.cat(out).numpy())                           # [n_new, 70]
        if intensity != 1.0:
            rest = self.rest[space.EXP]
            raw[:, space.EXP] = rest + np.float32(intensity) * (raw[:, space.EXP] - rest)
        return raw

    @property
    def rest_pose(self) -> np.ndarray:
        """The rest pose bound by :meth:`prepare` (speech motion is generated around it)."""
        if self.rest is None:   # an AttributeError: isinstance(gen, MotionGenerator) asks
            raise AttributeError("MoDAMotion.rest_pose: call prepare(avatar) first")
        return self.rest

    def set_emotion(self, emotion: int, intensity: float = 1.0) -> None:
        """Nothing to keep: the DiT gets the emotion with each :meth:`generate` call."""

    def fork(self, seed: int) -> "MoDAMotion":
        """A generator for another session: the same (traced) network and settings, no avatar,
        no history, its own noise seed."""
        new = copy.copy(self)
        new.generator = torch.Generator().manual_seed(seed)
        new.identity, new.rest, new.rr = None, None, 1.0
        if isinstance(self.features, StreamFeatures):
            new.features = self.features.fork()
        new.reset()
        return new

    def reset(self) -> None:
        """Forget the frames shown and the seam prediction (after an interruption)."""
        self._hist, self._hist_end = None, -1
        self._ahead, self._ahead_at, self._ahead_real = None, -1, 0
        if isinstance(self.features, StreamFeatures):
            self.features.reset()

    def idle(self, n: int, prev: np.ndarray, t0: float) -> np.ndarray:
        """``prev`` held: the bare generator has no idle motion.  Products wrap it in
        :class:`~avatar_agent.motion.compose.SpeechAndIdle`, whose idle layer serves silence."""
        return np.repeat(np.asarray(prev, np.float32).reshape(1, space.DIM), n, axis=0)


class EmbeddedMoDA(SpeechAndIdle):
    """The embedded profile's MoDA: a trained tiny DiT for speech, the procedural idle layer for
    silence (blinks, sway, breathing, emotion) — one :class:`~avatar_agent.types.MotionGenerator`.
    The composition is :class:`~avatar_agent.motion.compose.SpeechAndIdle`'s, which the official
    profile uses with :class:`~avatar_agent.motion.compose.LivePortraitIdle`.

    Args:
        moda: a streaming MoDA generator (profile "embedded").
        idle: a generator whose ``idle`` (and ``rest_pose``/``set_emotion``) serve silence.
    """

    profile: Profile = "embedded"
    fps = MOTION_FPS
    idle_gen: ProceduralMotion  # generate() also uses its idle_track() and articulate()

    def __init__(self, moda: MoDAMotion, idle: Any) -> None:
        self.moda, self.idle_gen = moda, idle
        self.min_hop_ms = moda.min_hop_ms

    @property
    def rest_pose(self) -> np.ndarray:
        """Where silence relaxes to (the idle generator's rest: portrait pose, mouth closed)."""
        return self.idle_gen.rest_pose

    def prepare(self, avatar: Avatar) -> None:
        """Bind both generators to the avatar; speech motion is generated around the idle
        layer's rest pose (portrait pose, mouth closed), where silence relaxes to."""
        self.idle_gen.prepare(avatar)
        self.moda.prepare(avatar, reference=self.idle_gen.rest_pose)
        # The DiT speaks emotion-free; the emotion is a layer on top (the DiT learned older, weaker
        # presets, so its own emotion would fade the brows while speaking).
        self._emotion = EmotionLayer(avatar.kp_canonical, self.idle_gen.rest_pose)
        self._kp = np.asarray(avatar.kp_canonical, np.float64)
        self._emo = (EMOTION_NONE, 1.0)

    def set_emotion(self, emotion: int, intensity: float = 1.0) -> None:
        """Emotion of idle frames (speech gets it per chunk)."""
        self.idle_gen.set_emotion(emotion, intensity)
        self._emo = (emotion, intensity)

    def generate(self, chunk: SpeechChunk, prev: np.ndarray, emotion: int = EMOTION_NONE,
                 intensity: float = 1.0) -> np.ndarray:
        """Speech motion from the DiT, continuing from ``prev``, with the idle generator's
        lip-sync imposed on its mouth (``articulate``: visemes when the chunk carries phonemes,
        else the jaw follows loudness × first formant)."""
        motion = self.moda.generate(chunk, self._emotion.strip(prev), EMOTION_NONE, 1.0)
        emo = self._emotion.frames(len(motion), emotion, intensity)
        motion[:, space.EXP] += emo
        # the idle layer's blinks and gaze go on while speaking (the DiT's own are faint)
        impose_idle_eyes(motion, self.idle_gen.idle_track(len(motion)), self._kp,
                         self.idle_gen.rest_pose, emo)
        self._emo = (emotion, intensity)
        return self.idle_gen.articulate(chunk, motion, emotion, intensity, emotion_exp=emo)

    def idle(self, n: int, prev: np.ndarray, t0: float) -> np.ndarray:
        """Silence from the idle layer, relaxing from ``prev``."""
        out = self.idle_gen.idle(n, prev, t0)
        self._emotion.frames(n, *self._emo)          # the layer glides as the idle frames do
        return out
