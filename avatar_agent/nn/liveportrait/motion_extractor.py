"""M — LivePortrait's motion extractor, a ConvNeXt-V2 tiny (``src/modules/motion_extractor.py``).

Predicts the implicit-keypoint parameters of a 256×256 crop: canonical keypoints, head pose as
66-bin logits, translation, expression deltas and scale.  All outputs are raw (no activations);
:mod:`avatar_agent.nn.liveportrait.keypoints` turns them into degrees and keypoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avatar_agent.nn.liveportrait.layers import GRN, LayerNorm2d

OUTPUT_NAMES: tuple[str, ...] = ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")
"""Keys of the motion extractor's output dict (the ONNX export keeps this order)."""


@dataclass(frozen=True)
class MotionExtractorParams:
    """Hyper-parameters of M (release values in ``MOTION_PRESETS["release"]``)."""

    in_chans: int = 3
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    num_kp: int = 21
    num_bins: int = 66


MOTION_PRESETS: dict[str, MotionExtractorParams] = {
    "release": MotionExtractorParams(),
    "tiny": MotionExtractorParams(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16)),
}


class ConvNeXtBlock(nn.Module):
    """dwconv 7×7 → LayerNorm → Linear 4× → GELU → GRN → Linear → residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One ConvNeXt-V2 block on NCHW ``x`` (residual)."""
        y = self.dwconv(x).permute(0, 2, 3, 1)                       # B×H×W×C
        y = self.pwconv1(self.norm(y))                               # B×H×W×4C
        y = self.grn(F.gelu(y))                                      # B×H×W×4C (exact erf GELU)
        y = self.pwconv2(y).permute(0, 3, 1, 2)                      # B×C×H×W
        return x + y


class ConvNeXtV2(nn.Module):
    """The backbone plus the seven linear heads (the checkpoint's ``detector``)."""

    def __init__(self, p: MotionExtractorParams) -> None:
        super().__init__()
        d = p.dims
        stem = nn.Sequential(nn.Conv2d(p.in_chans, d[0], kernel_size=4, stride=4), LayerNorm2d(d[0]))
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(LayerNorm2d(d[i - 1]), nn.Conv2d(d[i - 1], d[i], kernel_size=2, stride=2))
            for i in range(1, len(d))])
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(d[i]) for _ in range(p.depths[i]))) for i in range(len(d)))
        self.norm = nn.LayerNorm(d[-1], eps=1e-6)
        n = 3 * p.num_kp
        self.fc_kp = nn.Linear(d[-1], n)
        self.fc_scale = nn.Linear(d[-1], 1)
        self.fc_pitch = nn.Linear(d[-1], p.num_bins)
        self.fc_yaw = nn.Linear(d[-1], p.num_bins)
        self.fc_roll = nn.Linear(d[-1], p.num_bins)
        self.fc_t = nn.Linear(d[-1], 3)
        self.fc_exp = nn.Linear(d[-1], n)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs (pose logits, t, exp, scale, kp) of images [B, 3, H, W]."""
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))                                       # B×96×64², …, B×768×8×8
        h = self.norm(x.mean([-2, -1]))                              # B×768
        return {
            "pitch": self.fc_pitch(h),                               # B×66 logits
            "yaw": self.fc_yaw(h),                                   # B×66
            "roll": self.fc_roll(h),                                 # B×66
            "t": self.fc_t(h),                                       # B×3
            "exp": self.fc_exp(h),                                   # B×63
            "scale": self.fc_scale(h),                               # B×1
            "kp": self.fc_kp(h),                                     # B×63
        }


class MotionExtractor(nn.Module):
    """M: image [B, 3, 256, 256] in [0, 1] → raw outputs (see :data:`OUTPUT_NAMES`)."""

    def __init__(self, params: MotionExtractorParams = MotionExtractorParams()) -> None:
        super().__init__()
        self.params = params
        self.detector = ConvNeXtV2(params)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw outputs of images [B, 3, 256, 256] in [0, 1], keyed as :data:`OUTPUT_NAMES`."""
        return self.detector(image)
