"""G — LivePortrait's SPADE generator (``src/modules/spade_generator.py``).

Decodes W's 256×64×64 feature map into the 512×512 RGB crop.  The release wraps every residual
conv in (old-API) spectral norm; in eval that is a fixed rescaling of the weight, which
:func:`avatar_agent.nn.liveportrait.weights.fold_spectral_norm` applies once at load time, so
the convs here are plain ``Conv2d`` whose ``weight`` holds the folded value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SpadeParams:
    """Hyper-parameters of G (release values in ``SPADE_PRESETS["release"]``)."""

    label_nc: int = 256
    block_expansion: int = 64
    max_features: int = 512
    num_down_blocks: int = 2
    out_channels: int = 64
    upscale: int = 2
    num_middle: int = 6
    hidden: int = 128


SPADE_PRESETS: dict[str, SpadeParams] = {
    "release": SpadeParams(),
    "tiny": SpadeParams(label_nc=16, block_expansion=4, max_features=16, out_channels=8,
                        num_middle=1, hidden=8),
}

SPECTRAL_NORM_CONVS: tuple[str, ...] = ("conv_0", "conv_1", "conv_s")
"""Names of the spectrally normalised convs inside every :class:`SpadeResBlock`."""


class Spade(nn.Module):
    """Spatially-adaptive normalisation: InstanceNorm(x)·(1 + γ(seg)) + β(seg)."""

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128) -> None:
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """Instance-normalise ``x`` and modulate it with γ, β predicted from ``seg``."""
        # InstanceNorm2d without running stats: per-sample statistics also in eval (spec §8.10).
        normalized = self.param_free_norm(x)                         # B×C×H×W
        seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")   # B×256×H×W
        actv = self.mlp_shared(seg)                                  # B×128×H×W
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SpadeResBlock(nn.Module):
    """SPADE residual block; learned 1×1 shortcut (no bias) when fin ≠ fout."""

    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int = 128) -> None:
        super().__init__()
        fmid = min(fin, fout)
        self.learned_shortcut = fin != fout
        # Registration order = checkpoint key order (convs, then norms).
        self.conv_0 = nn.Conv2d(fin, fmid, 3, padding=1)
        self.conv_1 = nn.Conv2d(fmid, fout, 3, padding=1)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)
        self.norm_0 = Spade(fin, label_nc, hidden)
        self.norm_1 = Spade(fmid, label_nc, hidden)
        if self.learned_shortcut:
            self.norm_s = Spade(fin, label_nc, hidden)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """SPADE residual block on ``x`` conditioned on ``seg``: B×fout×H×W."""
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x  # B×fout×H×W
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 2e-1))   # B×fmid×H×W
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 2e-1))  # B×fout×H×W
        return x_s + dx


class SpadeGenerator(nn.Module):
    """G: feature [B, 256, 64, 64] → image [B, 3, 512, 512] in [0, 1] (sigmoid)."""

    def __init__(self, params: SpadeParams = SpadeParams()) -> None:
        super().__init__()
        p = self.params = params
        ic = min(p.max_features, p.block_expansion * 2 ** p.num_down_blocks)  # 256
        c = 2 * ic                                                            # 512
        self.fc = nn.Conv2d(ic, c, 3, padding=1)
        for i in range(p.num_middle):
            self.add_module(f"G_middle_{i}", SpadeResBlock(c, c, p.label_nc, p.hidden))
        self.up_0 = SpadeResBlock(c, c // 2, p.label_nc, p.hidden)
        self.up_1 = SpadeResBlock(c // 2, p.out_channels, p.label_nc, p.hidden)
        self.conv_img = nn.Sequential(
            nn.Conv2d(p.out_channels, 3 * p.upscale ** 2, 3, padding=1),
            nn.PixelShuffle(upscale_factor=p.upscale))

    def forward(self, feature: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        """``stats``, when a dict is passed, receives the intermediate tensors (tests)."""
        seg = feature                                                # B×256×64×64
        x = self.fc(feature)                                         # B×512×64×64
        _keep(stats, "fc", x)
        for i in range(self.params.num_middle):
            x = getattr(self, f"G_middle_{i}")(x, seg)               # B×512×64×64
        _keep(stats, f"G_middle_{self.params.num_middle - 1}", x)
        x = self.up_0(F.interpolate(x, scale_factor=2), seg)         # B×256×128×128
        _keep(stats, "up_0", x)
        x = self.up_1(F.interpolate(x, scale_factor=2), seg)         # B×64×256×256
        _keep(stats, "up_1", x)
        x = self.conv_img(F.leaky_relu(x, 2e-1))                     # B×3×512×512 (pre-sigmoid)
        _keep(stats, "conv_img", x)
        return torch.sigmoid(x)                                      # B×3×512×512


def _keep(stats: dict | None, name: str, x: torch.Tensor) -> None:
    if stats is not None:
        stats[name] = x
