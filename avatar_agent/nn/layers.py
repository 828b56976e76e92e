"""Small building blocks shared by the networks: norms, modulation, MLPs, RoPE, embedders.

Numerics follow the MoDA release (its ``modules.py``, ``posemb_layers.py``) so recipe-weight fixtures match: RMSNorm and
RoPE are evaluated in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = x·rsqrt(mean(x², -1) + eps) [· weight]``, computed in float32.

    Args:
        dim: size of the normalised (last) axis.
        eps: added to the mean square.
        affine: with a learnable ``weight`` [dim] (the weight-free variant has no state).
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RMS-normalise ``x`` over its last axis (in float32, returned in ``x``'s dtype)."""
        xf = x.float()
        if torch.onnx.is_in_onnx_export():
            # ONNX Runtime fuses ``x / sqrt(mean(x²) + eps) · w`` into one
            # SimplifiedLayerNormalization kernel; rsqrt exports as Sqrt + Reciprocal, which it
            # leaves as five ops per norm (≈ 12 % of the tiny DiT's forward).  The fusion needs a
            # scale, hence ones for the weight-free norms.  Equal to ~1 ulp.
            w = (self.weight.float() if self.weight is not None
                 else torch.ones(x.shape[-1], dtype=torch.float32, device=x.device))
            return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * w).to(x.dtype)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x·(1 + scale) + shift``; shift/scale [B, C] broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLN(nn.Sequential):
    """SiLU → Linear(dim, k·dim) on the conditioning vector; index 1 is the Linear (key ``.1``)."""

    def __init__(self, dim: int, k: int) -> None:
        super().__init__(nn.SiLU(), nn.Linear(dim, k * dim))


class Mlp(nn.Module):
    """Linear → GELU(tanh) → Linear, keys ``fc1`` / ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fc2(gelu_tanh(fc1(x)))``."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MlpEmbedder(nn.Module):
    """Linear(in, dim) → SiLU → Linear(dim, dim), keys ``mlp.0`` / ``mlp.2``."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``x`` [..., in] → [..., dim]."""
        return self.mlp(x)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of raw timesteps t [B] → [B, dim], **cos first** (as the release).

    ``freqs_i = exp(-ln(max_period)·i/half)``; t is the raw 1..1000 timestep, not σ.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)  # [half]
    args = t.float()[:, None] * freqs[None]                                       # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                    # [B, 2·half]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal(256) → MLP → [B, dim]."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed raw timesteps t [B] → [B, dim]."""
        return self.mlp(timestep_features(t, self.freq_dim).to(typing.cast(nn.Linear, self.mlp[0]).weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row (index ``n_classes``) for the dropped/null class.

    Condition dropout for training is done by the caller (replace labels with ``n_classes``), so
    the forward pass is the same in train and eval.
    """

    def __init__(self, n_classes: int, dim: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.embedding_table = nn.Embedding(n_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Embedding rows of the labels (``n_classes`` = the null class)."""
        return self.embedding_table(labels)


def rope_tables(positions: torch.Tensor, dim: int, theta: float = 256.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [L, dim] for 1-D RoPE with interleaved pairs.

    ``ω_j = theta^(-2j/dim)``; each angle is repeated twice (pairs (0,1), (2,3), ... share a
    frequency).
    """
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                        device=positions.device)[: dim // 2] / dim)  # [dim/2]
    ang = torch.outer(positions.float(), freqs)                                  # [L, dim/2]
    cos = ang.cos().repeat_interleave(2, dim=-1)                                 # [L, dim]
    sin = ang.sin().repeat_interleave(2, dim=-1)                                 # [L, dim]
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] with tables [L, D]: ``x·cos + rotate_half(x)·sin`` in float32.

    ``rotate_half([x0, x1, x2, x3, ...]) = [-x1, x0, -x3, x2, ...]``.
    """
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))                                            # [B, L, H, D/2, 2]
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)       # [B, L, H, D]
    out = xf * cos[None, :, None] + rot * sin[None, :, None]
    return out.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention; q, k, v [B, L, H, D] → [B, L, H·D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2))                      # [B, H, L, D]
    return out.transpose(1, 2).flatten(2)                                       # [B, L, H·D]
