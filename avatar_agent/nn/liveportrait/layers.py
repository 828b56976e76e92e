"""Building blocks shared by the LivePortrait networks (the release's ``src/modules/util.py``).

Attribute names are the state-dict names of the released checkpoints (``conv``, ``norm``, ``pool``
…), so loading is a plain strict ``load_state_dict``.  BatchNorm layers are always used in eval
mode (running statistics); the renderer never trains them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SameBlock2d(nn.Module):
    """Conv2d → BatchNorm2d → ReLU (or LeakyReLU 0.01), same spatial size."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int = 1,
                 lrelu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(cout, affine=True)
        self.lrelu = lrelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv → BatchNorm → (Leaky)ReLU, same spatial size."""
        x = self.norm(self.conv(x))                                  # B×cout×H×W
        # W.third uses LeakyReLU with PyTorch's default slope 0.01 (spec §8.8).
        return F.leaky_relu(x) if self.lrelu else F.relu(x)


class DownBlock2d(nn.Module):
    """Conv2d k3 → BatchNorm2d → ReLU → AvgPool2d(2): halves H and W."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout, affine=True)
        self.pool = nn.AvgPool2d(kernel_size=(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv → BatchNorm → ReLU → 2×2 average pool: B×cout×H/2×W/2."""
        return self.pool(F.relu(self.norm(self.conv(x))))            # B×cout×H/2×W/2


class DownBlock3d(nn.Module):
    """Conv3d k3 → BatchNorm3d → ReLU → AvgPool3d(1,2,2): halves H and W, keeps depth."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm3d(cout, affine=True)
        self.pool = nn.AvgPool3d(kernel_size=(1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv → BatchNorm → ReLU → (1, 2, 2) average pool: B×cout×D×H/2×W/2."""
        return self.pool(F.relu(self.norm(self.conv(x))))            # B×cout×D×H/2×W/2


class UpBlock3d(nn.Module):
    """Nearest upsample ×(1,2,2) → Conv3d k3 → BatchNorm3d → ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm3d(cout, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest ×(1, 2, 2) upsample → Conv → BatchNorm → ReLU: B×cout×D×2H×2W."""
        x = F.interpolate(x, scale_factor=(1, 2, 2))                 # B×cin×D×2H×2W (nearest)
        return F.relu(self.norm(self.conv(x)))                       # B×cout×D×2H×2W


class ResBlock3d(nn.Module):
    """Pre-activation residual block: x + conv2(relu(norm2(conv1(relu(norm1(x))))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Registration order = the checkpoint's key order (conv1, conv2, norm1, norm2).
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm1 = nn.BatchNorm3d(channels, affine=True)
        self.norm2 = nn.BatchNorm3d(channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the pre-activation residual branch."""
        y = self.conv1(F.relu(self.norm1(x)))                        # B×C×D×H×W
        y = self.conv2(F.relu(self.norm2(y)))                        # B×C×D×H×W
        return x + y


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (ConvNeXt's "channels_first" variant).

    Written out by hand as the release does (biased variance, eps inside the sqrt) so the float32
    rounding matches.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise NCHW ``x`` over channels, then scale and shift per channel."""
        u = x.mean(1, keepdim=True)                                  # B×1×H×W
        s = (x - u).pow(2).mean(1, keepdim=True)                     # B×1×H×W
        x = (x - u) / torch.sqrt(s + self.eps)                       # B×C×H×W
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GRN(nn.Module):
    """ConvNeXt-V2 global response normalisation on NHWC tensors."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global response normalisation of NHWC ``x`` (with its residual)."""
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)            # B×1×1×C
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)             # B×1×1×C
        return self.gamma * (x * nx) + self.beta + x                 # B×H×W×C
