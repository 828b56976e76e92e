"""M (ConvNeXt-V2 motion extractor) and the kp-info refinement against the release."""

import pytest
import torch

from avatar_agent.nn.liveportrait import keypoints as K
from avatar_agent.nn.liveportrait.motion_extractor import OUTPUT_NAMES
from tests.nn.liveportrait.helpers import fixture, maxdiff, recipe_modules

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def raw() -> dict[str, torch.Tensor]:
    x = torch.from_numpy(fixture("source")["x"])
    with torch.no_grad():
        return recipe_modules().motion(torch.cat([x, x.flip(-1)]))


def test_raw_outputs(raw: dict[str, torch.Tensor]) -> None:
    ref = fixture("M_motion")
    assert tuple(raw) == OUTPUT_NAMES
    for k in OUTPUT_NAMES:
        assert maxdiff(raw[k], ref[f"raw_{k}"]) <= 2e-5, k


def test_refined_info_rotation_and_source_keypoints(raw: dict[str, torch.Tensor]) -> None:
    ref = fixture("M_motion")
    info = K.refine_motion_output(raw)
    for k in ("pitch", "yaw", "roll"):
        assert maxdiff(info[k], ref[f"{k}_deg"]) <= 2e-4, k
    for k in ("kp", "exp", "t", "scale"):
        assert maxdiff(info[k], ref[k]) <= 2e-5, k
    rot = K.rotation_matrix(info["pitch"], info["yaw"], info["roll"])
    assert maxdiff(rot, ref["R"]) <= 2e-5
    assert maxdiff(K.source_keypoints(info), ref["x_s"]) <= 2e-5
    # The mirrored image must not give the same yaw (the network sees a different face).
    assert abs(float(info["yaw"][0] - info["yaw"][1])) > 1e-3
