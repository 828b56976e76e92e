"""S — LivePortrait's stitching and retargeting MLPs (``src/modules/stitching_retargeting_network.py``).

* stitching (checkpoint sub-dict ``retarget_shoulder``): [x_s, x_d] (126) → Δ for x_d (63) + one
  shared (Δtx, Δty) (2); keeps the animated head glued to the shoulders after paste-back.
* lip (``retarget_mouth``): [x_s, c_s_lip, c_d_lip] (65) → Δ keypoints (63).
* eye (``retarget_eye``): [x_s, c_s_left, c_s_right, c_d] (66) → Δ keypoints (63).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StitchingParams:
    """Layer widths of the three MLPs (input, hidden…, output)."""

    stitching: tuple[int, ...] = (126, 128, 128, 64, 65)
    lip: tuple[int, ...] = (65, 128, 128, 64, 63)
    eye: tuple[int, ...] = (66, 256, 256, 128, 128, 64, 63)


STITCHING_PRESETS: dict[str, StitchingParams] = {"release": StitchingParams()}


class RetargetMLP(nn.Module):
    """Linear/ReLU stack, no activation after the last Linear (keys ``mlp.0, mlp.2, …``)."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the MLP on ``x`` [B, in] → [B, out]."""
        return self.mlp(x)                                           # B×out


class StitchingRetargeting(nn.Module):
    """The three MLPs, named as the checkpoint's sub-dicts."""

    def __init__(self, params: StitchingParams = StitchingParams()) -> None:
        super().__init__()
        self.params = params
        self.retarget_shoulder = RetargetMLP(params.stitching)
        self.retarget_mouth = RetargetMLP(params.lip)
        self.retarget_eye = RetargetMLP(params.eye)

    def stitch(self, x_s: torch.Tensor, x_d: torch.Tensor) -> torch.Tensor:
        """Stitched driving keypoints [B, 21, 3]: x_d + Δ, plus one (Δtx, Δty) on every point."""
        b, k, _ = x_s.shape
        delta = self.retarget_shoulder(torch.cat([x_s.reshape(b, -1), x_d.reshape(b, -1)], 1))  # B×65
        out = x_d + delta[:, : 3 * k].reshape(b, k, 3)               # B×21×3
        shift = delta[:, 3 * k: 3 * k + 2].reshape(b, 1, 2)          # B×1×2
        return torch.cat([out[..., :2] + shift, out[..., 2:]], dim=-1)

    def eye_delta(self, x_s: torch.Tensor, eye_ratio: torch.Tensor) -> torch.Tensor:
        """Keypoint delta [B, 21, 3] for eye ratios [B, 3] = (c_s_left, c_s_right, c_d)."""
        b, k, _ = x_s.shape
        return self.retarget_eye(torch.cat([x_s.reshape(b, -1), eye_ratio], 1)).reshape(b, k, 3)

    def lip_delta(self, x_s: torch.Tensor, lip_ratio: torch.Tensor) -> torch.Tensor:
        """Keypoint delta [B, 21, 3] for lip ratios [B, 2] = (c_s_lip, c_d_lip)."""
        b, k, _ = x_s.shape
        return self.retarget_mouth(torch.cat([x_s.reshape(b, -1), lip_ratio], 1)).reshape(b, k, 3)
