"""Keypoint math: 66-bin degrees, rotation, transform without tz, retargeting ratios."""

import numpy as np
import pytest
import torch

from avatar_agent.motion import space
from avatar_agent.nn.liveportrait import keypoints as K
from tests.nn.liveportrait.helpers import fixture, maxdiff

torch.set_num_threads(1)


def test_kp_transform_fixture() -> None:
    ref = fixture("kp_transform")
    t = {k: torch.from_numpy(v) for k, v in ref.items()}
    rot = K.rotation_matrix(t["in_pitch"], t["in_yaw"], t["in_roll"])
    assert maxdiff(rot, ref["R"]) <= 1e-6
    x = K.transform_keypoints(t["in_kp"], rot, t["in_exp"], t["in_scale"], t["in_t"])
    assert maxdiff(x, ref["x"]) <= 1e-6
    assert maxdiff(K.headpose_to_degrees(t["bins_logits"]), ref["bins_deg"]) <= 2e-4


def test_tz_is_ignored() -> None:
    ref = fixture("kp_transform")
    t = {k: torch.from_numpy(v) for k, v in ref.items()}
    rot = K.rotation_matrix(t["in_pitch"], t["in_yaw"], t["in_roll"])
    shifted = t["in_t"].clone()
    shifted[:, 2] += 5.0
    a = K.transform_keypoints(t["in_kp"], rot, t["in_exp"], t["in_scale"], t["in_t"])
    b = K.transform_keypoints(t["in_kp"], rot, t["in_exp"], t["in_scale"], shifted)
    assert torch.equal(a, b)


def test_torch_rotation_equals_motion_space_convention() -> None:
    ref = fixture("kp_transform")
    np_rot = space.rotation_matrix(ref["in_pitch"][:, 0], ref["in_yaw"][:, 0], ref["in_roll"][:, 0])
    assert np.abs(np_rot - ref["R"]).max() <= 1e-6


def test_degree_range_and_peak() -> None:
    logits = torch.full((3, 66), -1e4)
    logits[0, 0] = logits[1, 65] = logits[2, 32] = 0.0
    deg = K.headpose_to_degrees(logits)
    assert deg.tolist() == pytest.approx([-97.5, 97.5, -1.5])
    with pytest.raises(ValueError, match="66"):
        K.headpose_to_degrees(torch.zeros(2, 62))


def test_retargeting_ratios() -> None:
    p = np.zeros((203, 2))
    p[0], p[12] = (0, 0), (10, 0)                                   # left eye width 10
    p[6], p[18] = (5, -2), (5, 2)                                   # left lid gap 4
    p[24], p[36] = (20, 0), (30, 0)
    p[30], p[42] = (25, -1), (25, 1)
    p[48], p[66] = (0, 20), (20, 20)
    p[90], p[102] = (10, 18), (10, 23)
    assert K.eye_ratios(p) == pytest.approx([0.4, 0.2], rel=1e-5)
    assert K.lip_ratio(p) == pytest.approx(0.25, rel=1e-5)
