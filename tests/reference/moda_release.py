"""The MoDA release's offline audio → motion path, kept as a test reference (no product code runs it).

It reproduces the release CLI (``talking_head_diffusion.py``, ``moda_test.py``): 80-frame segments with stride 64, 16-frame
linear crossfade, 3-frame pose smoothing (dims 63-69), silence tail + lip modulation,
denormalisation with ``mean.pt`` statistics (``std + 1e-5``) and the source's rescale ratio.  The
conformance tests compare it with the release's recorded outputs, and the streaming
:class:`avatar_agent.motion.moda.MoDAMotion` with it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from avatar_agent.motion import space
from avatar_agent.motion.emotion import emotion_label
from avatar_agent.motion.moda import (OVERLAP, Features, from_model_space, rescale_ratio,
                                      smooth_pose, to_model_space)
from avatar_agent.nn.moda import MoDADiT
from avatar_agent.nn.sampling import Conditions, Guidance, sample
from avatar_agent.types import EMOTION_NONE

SEGMENT = 80
STRIDE = 64
LIP_KEYPOINTS = (6, 12, 14, 17, 19, 20)
"""LivePortrait implicit keypoints modulated by the release's lip post-processing."""

SegmentSampler = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def headpose_degrees(logits: np.ndarray) -> np.ndarray:
    """LivePortrait's 66-bin head-pose logits → degrees: ``Σ softmax·i·3 − 97.5``."""
    z = np.asarray(logits, dtype=np.float32)
    p = np.exp(z - z.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return (p * (np.arange(z.shape[-1], dtype=np.float32) * 3)).sum(-1) - 97.5


def source_motion(exp: np.ndarray, scale: float, t: np.ndarray, pitch: float, yaw: float,
                  roll: float) -> np.ndarray:
    """Raw 70-d motion of a source image (tz zeroed, as the release does)."""
    m = np.zeros(space.DIM, np.float32)
    m[space.EXP] = np.asarray(exp, np.float32).reshape(63)
    m[space.SCALE] = scale
    m[64:66] = np.asarray(t, np.float32).reshape(-1)[:2]
    m[space.POSE] = (pitch, yaw, roll)
    return m


def modulate_lip(motion: np.ndarray, ref: np.ndarray, alpha: float = 5.0) -> np.ndarray:
    """The release's lip emphasis in model space: push lip keypoints away from a reference frame.

    ``δ = exp_L − ref_L``; ``d = Σ δ²`` per frame; ``w = (sigmoid(α·d) − 0.5)/(0.1·max d + 0.05)``;
    ``exp_L ← ref_L + δ·(1 + w)`` for L = keypoints 6, 12, 14, 17, 19, 20.
    """
    m = np.array(motion, dtype=np.float32, copy=True)                            # [T, 70]
    idx = np.array([3 * k + a for k in LIP_KEYPOINTS for a in range(3)])         # [18]
    ref_l = np.asarray(ref, np.float32)[idx]                                     # [18]
    delta = m[:, idx] - ref_l                                                    # [T, 18]
    d = (delta ** 2).sum(-1)                                                     # [T]
    w = (1.0 / (1.0 + np.exp(-alpha * d)) - 0.5) / (0.1 * d.max() + 0.05)       # [T]
    m[:, idx] = ref_l + delta * (1.0 + w[:, None])
    return m.astype(np.float32)


def segment_plan(n_frames: int, seg: int = SEGMENT, stride: int = STRIDE) -> tuple[int, int]:
    """(number of segments, zero-padded frames at the end) for a clip of n_frames."""
    if n_frames < 1:
        raise ValueError(f"need at least one frame of audio features, got {n_frames}")
    n_seg = 1 if n_frames <= seg else math.ceil((n_frames - seg) / stride) + 1
    return n_seg, seg + stride * (n_seg - 1) - n_frames


def make_segment_sampler(model: MoDADiT, identity: torch.Tensor, emotion: int,
                         null_audio: torch.Tensor, guidance: Guidance, steps: int = 10,
                         noise: Callable[[int], torch.Tensor] | None = None,
                         generator: torch.Generator | None = None,
                         final_step: bool = True) -> SegmentSampler:
    """``(segment index, prev [1,1,70], audio [1,N,U,L,D]) -> x0 [1,N,70]`` with the DiT sampler.

    ``noise(i)`` gives segment i's initial latents; otherwise ``randn`` from ``generator``.
    ``final_step``: see :func:`avatar_agent.nn.sampling.sample_flow`.
    """
    p = model.params
    dev = next(model.parameters()).device
    emo = torch.tensor([emotion_label(emotion)], device=dev)

    def run(i: int, prev: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        n = audio.shape[1]
        x = noise(i) if noise is not None else torch.randn((1, n, p.motion_dim), generator=generator)
        cond = Conditions(prev=prev.to(dev), audio=audio.to(dev), emotion=emo,
                          identity=identity.reshape(1, -1).to(dev), null_audio=null_audio.to(dev))
        return sample(model, cond, x.to(dev), guidance, steps, final_step=final_step).cpu()

    return run


def generate_long(audio: torch.Tensor, prev: torch.Tensor, sampler: SegmentSampler,
                  seg: int = SEGMENT, stride: int = STRIDE,
                  trace: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
    """The release's chunked generation over a whole clip, in model space.

    Args:
        audio: [T, U, L, D] per-frame features.
        prev: [1, 1, 70] normalised motion of the frame before the clip (source motion).
        sampler: see :func:`make_segment_sampler`.
        trace: optional; gets ``prev`` (fed per segment) and ``raw`` (per-segment x0 before smoothing).

    Returns:
        [T, 70] normalised motion.
    """
    n = audio.shape[0]
    overlap = min(OVERLAP, seg - OVERLAP)
    n_seg, pad = segment_plan(n, seg, stride)
    if pad:
        audio = torch.cat([audio, audio.new_zeros((pad,) + tuple(audio.shape[1:]))])   # zero audio
    alpha = (torch.arange(overlap, dtype=torch.float32) / overlap)[:, None]     # [16, 1]
    out: torch.Tensor | None = None
    for i in range(n_seg):
        a = audio[i * stride : i * stride + seg][None]                          # [1, N, U, L, D]
        x = sampler(i, prev, a)                                                  # [1, N, 70]
        if trace is not None:
            trace.setdefault("prev", []).append(prev.clone())
            trace.setdefault("raw", []).append(x.clone())
        x = smooth_pose(x)
        prev = x[:, stride - 1 : stride]                                         # frame before next start
        x = x[0]                                                                 # [N, 70]
        if i == n_seg - 1 and pad > 0:
            x = x[: seg - pad]
        if out is None:
            out = x
        else:
            out[-overlap:] = out[-overlap:] * (1 - alpha) + x[:overlap] * alpha
            out = torch.cat([out, x[overlap:]])
    assert out is not None
    return smooth_pose(out)


class OfflineMoDA:
    """The release CLI's audio → motion path for one source image (official profile).

    Args:
        model: the release DiT with weights.
        features: HuBERT feature extractor (``nn.hubert.HubertFeatures``).
        mean, std: motion statistics (``nn.weights.load_mean_std``).
        null_audio: CFG null audio feature [1,1,1,1,768] (the release draws it at random).
        cfg_scale: release CFG scale (CLI default 1.2).
    """

    def __init__(self, model: MoDADiT, features: Features, mean: np.ndarray, std: np.ndarray,
                 null_audio: torch.Tensor, cfg_scale: float = 1.2, steps: int = 10) -> None:
        self.model, self.features, self.mean, self.std = model, features, mean, std
        self.null_audio, self.guidance, self.steps = null_audio, Guidance.release(cfg_scale), steps

    def generate(self, audio: np.ndarray, source: np.ndarray, kp_canonical: np.ndarray,
                 emotion: int = EMOTION_NONE, generator: torch.Generator | None = None) -> np.ndarray:
        """Raw motion [T, 70] for 16 kHz audio; ``source`` = raw source motion [70] (tz ignored)."""
        from avatar_agent.nn.hubert import check_audio, release_driving_audio

        wav, add = release_driving_audio(check_audio(audio))
        feats = torch.as_tensor(self.features(wav)).float()                      # [T, L, D]
        feats = feats[:, None]                                                   # [T, 1, L, D]
        src = np.array(source, np.float32, copy=True)
        src[66] = 0.0
        rr = rescale_ratio(src[space.SCALE], self.mean)
        prev = torch.from_numpy(to_model_space(src, self.mean, self.std, rr)).reshape(1, 1, -1)
        sampler = make_segment_sampler(self.model, torch.as_tensor(kp_canonical).float(), emotion,
                                       self.null_audio, self.guidance, self.steps, generator=generator)
        norm = generate_long(feats, prev, sampler).numpy()
        return release_postprocess(norm, add, self.mean, self.std, rr)


def release_postprocess(norm: np.ndarray, add_frames: int, mean: np.ndarray, std: np.ndarray,
                        rr: float) -> np.ndarray:
    """Lip modulation against a frame inside the silence tail, drop the tail, back to raw space."""
    ref = norm[-max(add_frames * 3 // 4, 1)]
    m = modulate_lip(norm, ref)
    if add_frames:
        m = m[:-add_frames]
    return from_model_space(m, mean, std, rr)
