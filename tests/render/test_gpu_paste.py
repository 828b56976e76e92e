"""Paste-back on the renderer's device equals the OpenCV paste-back within a few levels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar_agent.render.gpu_paste import GpuPaste
from avatar_agent.render.liveportrait import feather_mask, paste_back


def affine(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx],
                     [scale * np.sin(a), scale * np.cos(a), ty], [0, 0, 1]], np.float64)


@pytest.mark.parametrize("c2o", [affine(0.6, 0.0, 40.0, 25.0), affine(0.45, 12.0, 90.0, 10.0),
                                 affine(0.8, -7.0, -30.0, 60.0)], ids=["shift", "rotated", "clipped"])
def test_matches_opencv(c2o: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    s = 128
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:s, 0:s] / s
    crops = torch.from_numpy(np.stack([np.stack([np.sin(6 * xx + k) * 0.5 + 0.5, yy, xx * yy])
                                       for k in range(2)]).astype(np.float32))   # [2, 3, s, s] smooth
    mask = feather_mask(s)
    got = GpuPaste(image, c2o, mask, "cpu")(crops).numpy()
    assert got.shape == (2, 120, 160, 3) and got.dtype == np.uint8
    for i in range(2):
        frame = (crops[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)     # the renderer's crop
        ref = paste_back(frame, image, c2o, mask).astype(int)
        diff = np.abs(got[i].astype(int) - ref)
        assert diff.max() <= 3 and diff.mean() < 0.3, (diff.max(), diff.mean())
    # Outside the pasted region the portrait is untouched.
    far = GpuPaste(image, affine(0.1, 0.0, 0.0, 0.0), mask, "cpu")(crops)[0].numpy()
    assert np.array_equal(far[60:, 80:], image[60:, 80:])


def test_bad_inputs() -> None:
    img = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        GpuPaste(img.astype(np.float32), np.eye(3), feather_mask(8), "cpu")
    p = GpuPaste(img, np.eye(3), feather_mask(8), "cpu")
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\]"):
        p(torch.zeros(1, 3, 4, 4))
