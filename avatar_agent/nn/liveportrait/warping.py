"""W — LivePortrait's warping network and its dense-motion network (``src/modules/warping_network.py``).

Given the source feature volume f_s and two keypoint sets, the dense-motion network predicts a
3-D deformation field (a soft blend of 22 candidate motions: identity + one rigid shift per
keypoint) and an occlusion map; W samples f_s along that field and projects it to the 2-D
feature map the SPADE generator decodes.

Coordinate conventions (spec §8.2–8.3): grids hold normalised (x, y, z) = (W, H, D) coordinates;
the identity grid is ``linspace(-1, 1)`` along each axis, yet every ``grid_sample`` runs with
``align_corners=False`` — both exactly as the release, so the features land on the same places.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from avatar_agent.nn.liveportrait.layers import DownBlock3d, SameBlock2d, UpBlock3d


@dataclass(frozen=True)
class DenseMotionParams:
    """Hyper-parameters of the dense-motion network."""

    block_expansion: int = 32
    num_blocks: int = 5
    max_features: int = 1024
    feature_channel: int = 32
    reshape_depth: int = 16
    compress: int = 4
    num_kp: int = 21
    kp_variance: float = 0.01


@dataclass(frozen=True)
class WarpingParams:
    """Hyper-parameters of W (release values in ``WARPING_PRESETS["release"]``)."""

    num_kp: int = 21
    block_expansion: int = 64
    max_features: int = 512
    num_down_blocks: int = 2
    reshape_channel: int = 32
    estimate_occlusion_map: bool = True
    use_occlusion_map: bool = True
    dense_motion: DenseMotionParams = field(default_factory=DenseMotionParams)


WARPING_PRESETS: dict[str, WarpingParams] = {
    "release": WarpingParams(),
    # Matches APPEARANCE_PRESETS["tiny"] (4 channels × depth 4) and SPADE_PRESETS["tiny"] (16 ch).
    "tiny": WarpingParams(block_expansion=4, max_features=16, reshape_channel=4,
                          dense_motion=DenseMotionParams(block_expansion=4, num_blocks=2,
                                                         max_features=16, reshape_depth=4,
                                                         compress=2)),
}


def coordinate_grid(d: int, h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
    """Identity grid [d, h, w, 3] with last dim (x, y, z), each ``2·(i/(n−1)) − 1``."""
    def axis(n: int) -> torch.Tensor:
        return 2 * (torch.arange(n, dtype=ref.dtype, device=ref.device) / (n - 1)) - 1

    x, y, z = axis(w), axis(h), axis(d)
    xx = x.view(1, 1, w).expand(d, h, w)                             # d×h×w
    yy = y.view(1, h, 1).expand(d, h, w)                             # d×h×w
    zz = z.view(d, 1, 1).expand(d, h, w)                             # d×h×w
    return torch.stack([xx, yy, zz], dim=3)                          # d×h×w×3


def kp_to_gaussian(kp: torch.Tensor, grid: torch.Tensor, variance: float) -> torch.Tensor:
    """Gaussian bump per keypoint: exp(−|g − kp|² / (2·variance)); [B, K, d, h, w]."""
    b, k, _ = kp.shape
    diff = grid[None, None] - kp.view(b, k, 1, 1, 1, 3)             # B×K×d×h×w×3
    return torch.exp(-0.5 * (diff ** 2).sum(-1) / variance)


class Hourglass3d(nn.Module):
    """U-Net over (D, H, W) volumes: 5 DownBlock3d, 5 UpBlock3d with skip concatenations."""

    def __init__(self, in_features: int, block_expansion: int, num_blocks: int,
                 max_features: int) -> None:
        super().__init__()
        self.encoder = _Encoder(in_features, block_expansion, num_blocks, max_features)
        self.decoder = _Decoder(in_features, block_expansion, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode then decode the volume ``x`` (with skip connections)."""
        return self.decoder(self.encoder(x))


class _Encoder(nn.Module):
    def __init__(self, in_features: int, be: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        chans = [in_features] + [min(max_features, be * 2 ** (i + 1)) for i in range(num_blocks)]
        self.down_blocks = nn.ModuleList(
            DownBlock3d(chans[i], chans[i + 1]) for i in range(num_blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]                                                   # skips, input first
        for block in self.down_blocks:
            outs.append(block(outs[-1]))                             # 110→64→128→256→512→1024 ch
        return outs


class _Decoder(nn.Module):
    def __init__(self, in_features: int, be: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            cin = (1 if i == num_blocks - 1 else 2) * min(max_features, be * 2 ** (i + 1))
            blocks.append(UpBlock3d(cin, min(max_features, be * 2 ** i)))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = be + in_features                          # 32 + 110 = 142
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, 3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_filters, affine=True)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        skips = list(skips)
        out = skips.pop()                                            # B×1024×16×2×2
        for block in self.up_blocks:
            out = torch.cat([block(out), skips.pop()], dim=1)        # …, finally B×142×16×64×64
        return F.relu(self.norm(self.conv(out)))                     # B×142×16×64×64


class DenseMotionNetwork(nn.Module):
    """Predicts the deformation field and occlusion map from f_s and the two keypoint sets."""

    def __init__(self, p: DenseMotionParams = DenseMotionParams(),
                 estimate_occlusion_map: bool = True) -> None:
        super().__init__()
        self.params = p
        k1 = p.num_kp + 1
        # Registration order = checkpoint key order (hourglass, mask, compress, norm, occlusion).
        self.hourglass = Hourglass3d(k1 * (p.compress + 1), p.block_expansion, p.num_blocks,
                                     p.max_features)
        self.mask = nn.Conv3d(self.hourglass.out_filters, k1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(p.feature_channel, p.compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(p.compress, affine=True)
        self.occlusion = (nn.Conv2d(self.hourglass.out_filters * p.reshape_depth, 1, kernel_size=7,
                                    padding=3) if estimate_occlusion_map else None)

    def forward(self, feature: torch.Tensor, kp_driving: torch.Tensor,
                kp_source: torch.Tensor, internals: dict | None = None) -> dict[str, torch.Tensor]:
        """Returns ``{"deformation" [B,d,h,w,3], "mask" [B,22,d,h,w], "occlusion_map" [B,1,h,w]}``.

        ``internals``, when a dict is passed, receives intermediate tensors (for conformance tests).
        """
        b, _, d, h, w = feature.shape
        k = kp_driving.shape[1]
        c = self.norm(self.compress(feature))                        # B×4×d×h×w
        if internals is not None:
            internals["norm"] = c
        c = F.relu(c)
        grid = coordinate_grid(d, h, w, kp_source)                   # d×h×w×3

        # Candidate motions: identity, then "where keypoint k's neighbourhood comes from".
        shifted = grid[None, None] - kp_driving.view(b, k, 1, 1, 1, 3)
        shifted = shifted + kp_source.view(b, k, 1, 1, 1, 3)        # B×K×d×h×w×3
        identity = grid[None, None].expand(b, 1, d, h, w, 3)
        sparse = torch.cat([identity, shifted], dim=1)               # B×(K+1)×d×h×w×3

        cc = c.shape[1]
        c_rep = c[:, None].expand(b, k + 1, cc, d, h, w).reshape(b * (k + 1), cc, d, h, w)
        deformed = F.grid_sample(c_rep, sparse.reshape(b * (k + 1), d, h, w, 3),
                                 align_corners=False)                # B(K+1)×4×d×h×w
        deformed = deformed.view(b, k + 1, cc, d, h, w)              # B×(K+1)×4×d×h×w

        var = self.params.kp_variance
        heat = kp_to_gaussian(kp_driving, grid, var) - kp_to_gaussian(kp_source, grid, var)
        heat = torch.cat([heat.new_zeros(b, 1, d, h, w), heat], dim=1)  # B×(K+1)×d×h×w

        inp = torch.cat([heat[:, :, None], deformed], dim=2)         # B×(K+1)×5×d×h×w
        inp = inp.view(b, -1, d, h, w)                               # B×110×d×h×w (heatmap first)
        prediction = self.hourglass(inp)                             # B×142×d×h×w
        logits = self.mask(prediction)                               # B×(K+1)×d×h×w
        mask = F.softmax(logits, dim=1)
        if internals is not None:
            internals["hourglass"] = prediction
            internals["mask_logits"] = logits
        deformation = (sparse.permute(0, 1, 5, 2, 3, 4) * mask[:, :, None]).sum(dim=1)  # B×3×d×h×w
        out = {"mask": mask, "deformation": deformation.permute(0, 2, 3, 4, 1)}  # B×d×h×w×3
        if self.occlusion is not None:
            pred2d = prediction.view(b, -1, h, w)                    # B×(142·d)×h×w, ch = 16c+d
            out["occlusion_map"] = torch.sigmoid(self.occlusion(pred2d))  # B×1×h×w
        return out


class WarpingNetwork(nn.Module):
    """W: (f_s, kp_driving, kp_source) → ``{"out" [B,256,64,64], "deformation", "occlusion_map"}``.

    Note the argument order: driving before source (spec §8.1).  Callers should pass keywords.
    """

    def __init__(self, params: WarpingParams = WarpingParams()) -> None:
        super().__init__()
        p = self.params = params
        self.dense_motion_network = DenseMotionNetwork(
            replace(p.dense_motion, num_kp=p.num_kp, feature_channel=p.reshape_channel),
            estimate_occlusion_map=p.estimate_occlusion_map)
        cin = p.max_features                                         # 32 channels × 16 depth
        cout = p.block_expansion * 2 ** p.num_down_blocks            # 256
        self.third = SameBlock2d(cin, cout, kernel_size=3, padding=1, lrelu=True)
        self.fourth = nn.Conv2d(cout, cout, kernel_size=1)

    def forward(self, feature_3d: torch.Tensor, kp_driving: torch.Tensor,
                kp_source: torch.Tensor, internals: dict | None = None) -> dict[str, torch.Tensor]:
        """Warp ``feature_3d`` from the source to the driving keypoints; see the class docstring for the outputs."""
        dense = self.dense_motion_network(feature_3d, kp_driving, kp_source, internals)
        deformation = dense["deformation"]                           # B×16×64×64×3
        out = F.grid_sample(feature_3d, deformation, align_corners=False)  # B×32×16×64×64
        b, c, d, h, w = out.shape
        out = self.fourth(self.third(out.view(b, c * d, h, w)))      # B×256×64×64
        occlusion = dense.get("occlusion_map")
        if self.params.use_occlusion_map and occlusion is not None:
            out = out * occlusion                                    # B×256×64×64
        return {"out": out, "deformation": deformation, "occlusion_map": occlusion,
                "mask": dense["mask"]}
