"""Keypoint math around the LivePortrait networks (LivePortrait ``src/utils/camera.py``; MoDA ``motion_processer.py``).

Torch versions of the conventions in :mod:`avatar_agent.motion.space` (same rotation, same
transform without tz), written with the release's operation order so float32 results match the
conformance fixtures, plus the eye/lip retargeting ratios.  The adapters from the 70-d motion
layout (MoDA's absolute drive, kp-info → motion) live with the renderer in
:mod:`avatar_agent.render.liveportrait`: nn/ knows no plug-in.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NUM_BINS = 66


def headpose_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """66-bin head-pose logits [B, 66] → degrees [B]: Σ softmax·i·3 − 97.5 (range ±97.5°)."""
    if logits.ndim != 2 or logits.shape[1] != NUM_BINS:
        raise ValueError(f"head-pose logits must be [B, {NUM_BINS}], got {tuple(logits.shape)}")
    idx = torch.arange(NUM_BINS, dtype=logits.dtype, device=logits.device)
    p = torch.softmax(logits, dim=1)                                 # B×66
    return torch.sum(p * idx, dim=1) * 3 - 97.5                      # B


def rotation_matrix(pitch: torch.Tensor, yaw: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """R = (Rz(roll)·Ry(yaw)·Rx(pitch))ᵀ for angles in degrees ([B] or [B, 1]); [B, 3, 3].

    Same convention as :func:`avatar_agent.motion.space.rotation_matrix`; keypoints rotate as
    ``x @ R``.
    """
    x, y, z = (a.reshape(-1, 1) / 180 * math.pi for a in (pitch, yaw, roll))  # B×1 radians
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    b = x.shape[0]
    rx = torch.cat([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], 1)
    ry = torch.cat([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], 1)
    rz = torch.cat([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], 1)
    rot = rz.reshape(b, 3, 3) @ ry.reshape(b, 3, 3) @ rx.reshape(b, 3, 3)
    return rot.permute(0, 2, 1)                                      # B×3×3


def transform_keypoints(kp: torch.Tensor, rot: torch.Tensor, exp: torch.Tensor,
                        scale: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x = scale·(kp @ R + exp) + [tx, ty, 0]; tz is ignored (spec §8.6).

    Args: kp, exp [B, 21, 3] (or [B, 63]); rot [B, 3, 3]; scale [B, 1] or [B]; t [B, 3].
    """
    b = rot.shape[0]
    x = kp.reshape(b, -1, 3) @ rot + exp.reshape(b, -1, 3)          # B×21×3
    x = x * scale.reshape(b, 1, 1)
    return torch.cat([x[..., :2] + t.reshape(b, 1, 3)[..., :2], x[..., 2:]], dim=-1)


def refine_motion_output(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's ``get_kp_info`` refinement: pose logits → degrees [B, 1]; kp, exp → [B, 21, 3].

    Outputs are float32 (the release casts fp16 autocast results back).
    """
    b = raw["kp"].shape[0]
    info = {k: v.float() for k, v in raw.items()}
    for k in ("pitch", "yaw", "roll"):
        info[k] = headpose_to_degrees(info[k])[:, None]              # B×1
    info["kp"] = info["kp"].reshape(b, -1, 3)                        # B×21×3
    info["exp"] = info["exp"].reshape(b, -1, 3)                      # B×21×3
    return info


def source_keypoints(info: dict[str, torch.Tensor]) -> torch.Tensor:
    """x_s = transform of the refined motion-extractor output of the source [B, 21, 3]."""
    rot = rotation_matrix(info["pitch"], info["yaw"], info["roll"])
    return transform_keypoints(info["kp"], rot, info["exp"], info["scale"], info["t"])


# --------------------------------------------------------------------------------------------
# Eye / lip retargeting ratios (203-point LivePortrait landmarks, spec §4)
# --------------------------------------------------------------------------------------------

def _dist(p: np.ndarray, i: int, j: int) -> np.ndarray:
    return np.linalg.norm(p[..., i, :2] - p[..., j, :2], axis=-1)


def eye_ratios(lmk203: np.ndarray) -> np.ndarray:
    """(left, right) eye-open ratios [..., 2] from 203-point landmarks [..., 203, 2]."""
    p = np.asarray(lmk203, dtype=np.float64)
    left = _dist(p, 6, 18) / (_dist(p, 0, 12) + 1e-6)
    right = _dist(p, 30, 42) / (_dist(p, 24, 36) + 1e-6)
    return np.stack([left, right], axis=-1)


def lip_ratio(lmk203: np.ndarray) -> np.ndarray:
    """Mouth-open ratio [...] from 203-point landmarks [..., 203, 2]."""
    p = np.asarray(lmk203, dtype=np.float64)
    return _dist(p, 90, 102) / (_dist(p, 48, 66) + 1e-6)


def apply_retargeting(stitching, x_s: torch.Tensor, x_d: torch.Tensor,
                      eye_ratio: torch.Tensor | None = None, lip_ratio: torch.Tensor | None = None,
                      relative: bool = False, stitch: bool = True) -> torch.Tensor:
    """The release's eye/lip retargeting branch: ``(x_s if relative else x_d) + Δeye + Δlip``,
    then stitching when ``stitch``.

    Args:
        stitching: a :class:`~avatar_agent.nn.liveportrait.stitching.StitchingRetargeting`.
        x_s, x_d: [B, 21, 3] source / driving keypoints.
        eye_ratio: [B, 3] (c_s_left, c_s_right, c_d) or None; lip_ratio: [B, 2] (c_s, c_d) or None.
    """
    out = x_s if relative else x_d
    if eye_ratio is not None:
        out = out + stitching.eye_delta(x_s, eye_ratio)
    if lip_ratio is not None:
        out = out + stitching.lip_delta(x_s, lip_ratio)
    return stitching.stitch(x_s, out) if stitch else out
