"""Paste-back on the renderer's device: the generator's float crops go into the portrait there, and
only the finished uint8 frames cross to the CPU.

The same operation as :func:`avatar_agent.render.liveportrait.paste_back` (OpenCV
``warpAffine`` of crop and feathered mask, linear blend, truncation to uint8), written with
``grid_sample`` so a batch of frames is one call on the GPU instead of per-frame OpenCV work on
the CPU after a 3 MB device→host copy per crop.  Differences from the OpenCV path: the crop is
not rounded to uint8 before warping, so values differ by at most a few levels (tests bound it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class GpuPaste:
    """Paste-back of a fixed portrait, prepared once per avatar.

    Args:
        image: uint8 [H, W, 3] portrait.
        crop_to_image: [3, 3] affine, crop pixel → image pixel (for crops of side ``size``).
        mask: uint8 [size, size] feather template (``liveportrait.feather_mask(size)``).
        device: where the crops live.
    """

    def __init__(self, image: np.ndarray, crop_to_image: np.ndarray, mask: np.ndarray,
                 device: torch.device | str) -> None:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        s = mask.shape[0]
        if mask.shape != (s, s):
            raise ValueError(f"mask must be square, got {mask.shape}")
        self.device = torch.device(device)
        self.size = s
        h, w = image.shape[:2]
        self.image = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)     # [H, W, 3] u8
        # Output pixel (x, y) samples the crop at inv(M)·(x, y, 1): OpenCV's pixel-centre
        # convention.  grid_sample (align_corners=False) puts pixel i's centre at (2i + 1)/S − 1.
        inv = np.linalg.inv(np.asarray(crop_to_image, np.float64))
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        u = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
        v = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
        grid = np.stack([(2 * u + 1) / s - 1, (2 * v + 1) / s - 1], -1)               # [H, W, 2]
        self.grid = torch.from_numpy(grid.astype(np.float32))[None].to(self.device)    # [1, H, W, 2]
        m = torch.from_numpy(mask.astype(np.float32) / 255)[None, None].to(self.device)
        alpha = F.grid_sample(m, self.grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # OpenCV warps the uint8 mask and rounds before /255.
        self.alpha = (torch.round(alpha * 255) / 255)[0, 0, :, :, None]               # [H, W, 1]

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops [B, 3, S, S] in [0, 1] (the generator's output) → uint8 [B, H, W, 3] on the device."""
        if crops.dim() != 4 or crops.shape[1] != 3 or crops.shape[2:] != (self.size, self.size):
            raise ValueError(f"crops must be [B, 3, {self.size}, {self.size}], got {tuple(crops.shape)}")
        b = crops.shape[0]
        src = (crops.float().clamp(0, 1) * 255).to(self.device)
        warped = F.grid_sample(src, self.grid.expand(b, -1, -1, -1), mode="bilinear",
                               padding_mode="zeros", align_corners=False)              # [B, 3, H, W]
        warped = warped.permute(0, 2, 3, 1)                                            # [B, H, W, 3]
        out = self.alpha * warped + (1 - self.alpha) * self.image.float()
        return out.clamp(0, 255).to(torch.uint8)                                       # truncates
