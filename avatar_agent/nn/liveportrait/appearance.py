"""F — LivePortrait's appearance feature extractor (``src/modules/appearance_feature_extractor.py``).

Maps the 256×256 source crop to a 3-D feature volume f_s [B, 32, 16, 64, 64] that the warping
network deforms.  Computed once per avatar.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from avatar_agent.nn.liveportrait.layers import DownBlock2d, ResBlock3d, SameBlock2d


@dataclass(frozen=True)
class AppearanceParams:
    """Hyper-parameters of F (release values in ``APPEARANCE_PRESETS["release"]``)."""

    image_channel: int = 3
    block_expansion: int = 64
    num_down_blocks: int = 2
    max_features: int = 512
    reshape_channel: int = 32
    reshape_depth: int = 16
    num_resblocks: int = 6


APPEARANCE_PRESETS: dict[str, AppearanceParams] = {
    "release": AppearanceParams(),
    # Tests: 256² input → 4×4×16×16 features, milliseconds on CPU.
    "tiny": AppearanceParams(block_expansion=8, num_down_blocks=4, max_features=16,
                             reshape_channel=4, reshape_depth=4, num_resblocks=1),
}


class AppearanceFeatureExtractor(nn.Module):
    """F: image [B, 3, 256, 256] in [0, 1] → f_s [B, 32, 16, 64, 64]."""

    def __init__(self, params: AppearanceParams = AppearanceParams()) -> None:
        super().__init__()
        p = self.params = params
        self.first = SameBlock2d(p.image_channel, p.block_expansion)
        chans = [min(p.max_features, p.block_expansion * 2 ** i) for i in range(p.num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList(
            DownBlock2d(chans[i], chans[i + 1]) for i in range(p.num_down_blocks))
        self.second = nn.Conv2d(chans[-1], p.max_features, kernel_size=1)
        self.resblocks_3d = nn.Sequential()
        for i in range(p.num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(p.reshape_channel))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Appearance feature volume of images [B, 3, 256, 256] → [B, 32, 16, 64, 64]."""
        p = self.params
        x = self.first(image)                                        # B×64×256×256
        for block in self.down_blocks:
            x = block(x)                                             # B×128×128², B×256×64²
        x = self.second(x)                                           # B×512×64×64
        b, _, h, w = x.shape
        # Channel 16·c + d becomes (c, d): a plain view, as the release does.
        f = x.view(b, p.reshape_channel, p.reshape_depth, h, w)      # B×32×16×64×64
        return self.resblocks_3d(f)                                  # B×32×16×64×64
