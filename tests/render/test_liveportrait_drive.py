"""The renderer's adapters from the 70-d motion layout: MoDA's absolute drive, kp-info → motion."""

import numpy as np
import pytest
import torch

from avatar_agent.motion import space
from avatar_agent.nn.liveportrait import keypoints as K
from avatar_agent.render import liveportrait as R

torch.set_num_threads(1)


def test_moda_copy_mask_entries() -> None:
    m = R.MODA_EXP_COPY_MASK
    full = [1, 2, 6, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert m[full].all()
    assert m.sum() == 13 * 3 + 2 + 1 + 1 + 2
    assert m[3].tolist() == [False, True, False] and m[4].tolist() == [False, True, False]
    assert m[5].tolist() == [False, False, True] and m[8].tolist() == [False, False, True]
    assert m[9].tolist() == [False, True, True]
    assert not m[[0, 7, 10]].any()


def _source() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    kc = 0.3 * torch.randn(21, 3, generator=g)
    exp_s = 0.02 * torch.randn(21, 3, generator=g)
    return kc, exp_s, torch.tensor([1.3])


def test_moda_drive_copies_only_masked_exp_and_ignores_scale_and_tz() -> None:
    kc, exp_s, s_s = _source()
    g = torch.Generator().manual_seed(1)
    motion = torch.zeros(2, 70)
    motion[:, :63] = 0.05 * torch.randn(1, 63, generator=g)
    motion[:, 63] = torch.tensor([0.7, 2.0])                        # generated scale: unused
    motion[:, 64:67] = torch.tensor([[0.05, -0.02, 0.3], [0.05, -0.02, -9.0]])
    motion[:, 67:70] = torch.tensor([5.0, -10.0, 3.0])
    x = R.moda_driving_keypoints(kc, exp_s, s_s, motion, eyeball_bias=False)
    # Expected by hand, in float64 with the numpy convention of motion/space.py.
    mask = R.MODA_EXP_COPY_MASK
    delta = np.where(mask, motion[0, :63].numpy().reshape(21, 3), exp_s.numpy())
    m = motion[0].numpy().astype(np.float64).copy()
    m[:63] = delta.reshape(-1)
    m[63] = 1.3
    want = space.transform_keypoints(kc.numpy(), m)
    assert np.abs(x[0].numpy() - want).max() <= 1e-6
    assert torch.allclose(x[0], x[1], atol=0)                       # tz and scale had no effect


def test_moda_eyeball_bias() -> None:
    kc, exp_s, s_s = _source()
    motion = torch.zeros(1, 70)
    a = R.moda_driving_keypoints(kc, exp_s, s_s, motion, eyeball_bias=False)
    b = R.moda_driving_keypoints(kc, exp_s, s_s, motion, eyeball_bias=True)
    d = ((b - a) / 1.3)[0]
    want = torch.zeros(21, 3)
    want[11, 1] = want[15, 1] = 0.0025
    want[13, 1] = want[16, 1] = 0.00075
    assert torch.allclose(d, want, atol=1e-7)


def test_info_to_motion_layout_and_rest_reproduces_source_keypoints() -> None:
    kc, exp_s, _ = _source()
    info = {"kp": kc[None], "exp": exp_s[None], "scale": torch.tensor([[1.3]]),
            "t": torch.tensor([[0.01, 0.02, 0.5]]), "pitch": torch.tensor([[4.0]]),
            "yaw": torch.tensor([[-7.0]]), "roll": torch.tensor([[2.0]])}
    m = R.info_to_motion(info)
    assert m.shape == (1, 70) and m.dtype == np.float32
    assert m[0, 66] == 0.0 and m[0, 63] == pytest.approx(1.3)
    assert m[0, 67:70].tolist() == pytest.approx([4.0, -7.0, 2.0])
    x_s = K.source_keypoints(info)
    x = R.moda_driving_keypoints(kc, exp_s, torch.tensor(1.3), torch.from_numpy(m), eyeball_bias=False)
    assert torch.allclose(x, x_s, atol=1e-6)
    x_plain = R.plain_driving_keypoints(kc, torch.from_numpy(m))
    assert torch.allclose(x_plain, x_s, atol=1e-6)
