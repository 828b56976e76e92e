"""Rectified-flow sampling with multi-condition classifier-free guidance (pure functions).

Sampler (identical to the MoDA release's ``schedulers/flow_matching.py``): timesteps ``linspace(1000, 1, steps)``
(float32; for 10 steps [1000, 889, ..., 112, 1]); per step ``σ = t/1000``,
``σ' = max(σ − (1 − 0.001)/(steps − 1), 0)`` and the Euler update ``x ← x + v·(σ' − σ)`` in float32.
t = 1000 is pure noise, the result is x0 in normalised motion space.

Guidance, paper eq. 8: ``v̂ = (1 + Σ_c λ_c)·v(C) − Σ_c λ_c·v(C | c = ∅)``: one scale per condition
c, each with its own pass in which only c is dropped.  Here the conditions are ``audio`` (replaced
by the null audio feature) and ``emotion`` (replaced by the null class), plus ``joint``: one pass
with *both* dropped.  The release's single-scale CFG ``v_u + s·(v_c − v_u)`` is eq. 8 with the one
joint condition and ``λ_joint = s − 1`` (its unconditional half drops audio and emotion together);
:meth:`Guidance.release` builds exactly that and the release form is evaluated verbatim.
All passes run as one batched forward: ``[dropped passes…; conditional]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from avatar_agent.nn.moda import DiTRunner, MoDADiT

N_TRAIN_TIMESTEPS = 1000
SIGMA_MIN = 1.0 / N_TRAIN_TIMESTEPS


def timesteps(steps: int = 10) -> torch.Tensor:
    """The release's timestep grid: ``linspace(1000, 1, steps)`` float32 [steps]."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    return torch.linspace(float(N_TRAIN_TIMESTEPS), 1.0, steps, dtype=torch.float32)


def next_sigma(t: float, steps: int) -> torch.Tensor:
    """σ after the Euler step from timestep t: ``max(t/1000 − (1 − 0.001)/(steps − 1), 0)``."""
    sigma = torch.tensor(t, dtype=torch.float32) / N_TRAIN_TIMESTEPS
    return torch.clamp(sigma - (1.0 - SIGMA_MIN) / (steps - 1), min=0.0)


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float, steps: int) -> torch.Tensor:
    """One Euler step of the release sampler from timestep t (see module docstring)."""
    sigma = torch.tensor(t, dtype=torch.float32) / N_TRAIN_TIMESTEPS
    sigma_next = next_sigma(t, steps)
    return (x.float() + v.float() * (sigma_next - sigma).to(x.device)).to(x.dtype)


def sample_flow(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_init: torch.Tensor,
                steps: int = 10, trace: dict[str, list[torch.Tensor]] | None = None,
                final_step: bool = True,
                after_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
    """Integrate the flow from noise ``x_init`` (σ = 1) to x0.

    Args:
        velocity: ``(x_t [B,N,D], t [B] float32) -> v [B,N,D]`` (already guided).
        x_init: initial latents, standard normal.
        steps: number of Euler steps (10 in the release).
        trace: if given, gets lists ``velocity`` and ``latents`` (after each step).
        final_step: take the grid's last step (t = 1: σ 0.001 → 0, 0.1 % of the path).  The
            release does; skipping it saves one network evaluation for a change of 0.001·v, which
            matters when a few steps must fit a real-time budget.
        after_step: ``(x, σ') -> x`` applied after each Euler step, with σ' the noise level just
            reached (a 0-d tensor on x's device); e.g. inpainting resets known frames to
            ``σ'·ε + (1 − σ')·x_known`` (see :meth:`avatar_agent.motion.moda.MoDAMotion._sample`).
    """
    x = x_init
    grid = timesteps(steps).tolist()
    for t in grid if final_step else grid[:-1]:
        tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        v = velocity(x, tt)
        x = euler_step(x, v, t, steps)
        if after_step is not None:
            x = after_step(x, next_sigma(t, steps).to(x.device))
        if trace is not None:
            trace.setdefault("velocity", []).append(v)
            trace.setdefault("latents", []).append(x)
    return x


@dataclass(frozen=True)
class Guidance:
    """Per-condition CFG scales λ (paper eq. 8); all zero = no guidance (one pass).

    Attributes:
        audio: λ for the pass with only the audio dropped (null feature).
        emotion: λ for the pass with only the emotion dropped (null class).
        joint: λ for the pass with audio and emotion both dropped (the release's CFG:
            ``joint = cfg_scale − 1``).
    """

    audio: float = 0.0
    emotion: float = 0.0
    joint: float = 0.0

    @classmethod
    def release(cls, cfg_scale: float = 1.2) -> "Guidance":
        """The release's ``v_u + s·(v_c − v_u)`` with s = cfg_scale (1.2 in its CLI)."""
        return cls(joint=cfg_scale - 1.0)


@dataclass
class Conditions:
    """Everything the DiT is conditioned on, for a batch of B windows of N frames.

    Attributes:
        prev: [B, 1, motion_dim] normalised previous motion frame (broadcast over N).
        audio: [B, N, U, L, D] audio features.
        emotion: [B] int64 emotion labels (null class = ``params.n_emotions``).
        identity: [B, id_dim] canonical keypoints.
        null_audio: the dropped-audio feature, broadcastable to ``audio`` (e.g. [1,1,1,1,D]).
    """

    prev: torch.Tensor
    audio: torch.Tensor
    emotion: torch.Tensor
    identity: torch.Tensor
    null_audio: torch.Tensor


def guided_velocity(model: DiTRunner, cond: Conditions, guidance: Guidance
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``velocity(x, t)`` closure applying eq. 8 with one batched forward per call."""
    null_emo = torch.full_like(cond.emotion, model.params.null_emotion)
    null_audio = cond.null_audio.to(cond.audio).expand_as(cond.audio)
    # (λ, audio, emotion) of each dropped pass, in batch order before the conditional pass.
    passes = [(lam, a, e) for lam, a, e in (
        (guidance.joint, null_audio, null_emo),
        (guidance.audio, null_audio, cond.emotion),
        (guidance.emotion, cond.audio, null_emo),
    ) if lam != 0.0]
    k = len(passes) + 1
    audio = torch.cat([a for _, a, _ in passes] + [cond.audio])                  # [k·B, N, U, L, D]
    emotion = torch.cat([e for _, _, e in passes] + [cond.emotion])              # [k·B]
    identity = cond.identity.repeat(k, *([1] * (cond.identity.dim() - 1)))       # [k·B, id]
    prev = cond.prev.repeat(k, 1, 1)                                             # [k·B, 1, D]

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xk = x.repeat(k, 1, 1)                                                   # [k·B, N, D]
        motion = torch.cat([prev.expand(-1, x.shape[1], -1), xk], dim=-1)        # [k·B, N, 2D]
        v = model(motion, t.repeat(k), audio, emotion, identity).chunk(k)        # k × [B, N, D]
        v_c = v[-1]
        if k == 1:
            return v_c
        if k == 2 and guidance.audio == 0.0 and guidance.emotion == 0.0:
            # The release's form, evaluated verbatim for bit-level agreement.
            return v[0] + (1.0 + guidance.joint) * (v_c - v[0])
        out = v_c
        for (lam, _, _), v_drop in zip(passes, v[:-1], strict=True):
            out = out + lam * (v_c - v_drop)
        return out

    return velocity


@torch.no_grad()
def sample(model: MoDADiT, cond: Conditions, x_init: torch.Tensor, guidance: Guidance = Guidance(),
           steps: int = 10, trace: dict[str, list[torch.Tensor]] | None = None,
           final_step: bool = True) -> torch.Tensor:
    """Sample normalised motion x0 [B, N, motion_dim] from ``x_init`` (noise) under ``cond``
    (``final_step``: see :func:`sample_flow`)."""
    return sample_flow(guided_velocity(model, cond, guidance), x_init, steps, trace, final_step)
