"""W (warping + dense motion) against the release, including dense-motion internals."""

import numpy as np
import pytest
import torch

from avatar_agent.nn.liveportrait.warping import coordinate_grid
from tests.nn.liveportrait.helpers import assert_stats, fixture, maxdiff, recipe_modules

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # one release-size forward


@pytest.fixture(scope="module")
def run() -> tuple[dict, dict]:
    ref = fixture("W_warping")
    feat = torch.from_numpy(fixture("F_appearance")["f_s_f16"].astype(np.float32))
    internals: dict = {}
    with torch.no_grad():
        out = recipe_modules().warping(feat, kp_driving=torch.from_numpy(ref["kp_driving"]),
                                       kp_source=torch.from_numpy(ref["kp_source"]),
                                       internals=internals)
    return out, internals


def test_outputs(run: tuple[dict, dict]) -> None:
    out, _ = run
    ref = fixture("W_warping")
    assert out["out"].shape == (1, 256, 64, 64)
    assert maxdiff(out["out"][0, :, 24:40, 24:40], ref["out_slice"]) <= 5e-6
    assert maxdiff(out["out"], ref["out_f16"].astype(np.float32)) <= 2.5e-4
    assert maxdiff(out["deformation"], ref["deformation"]) <= 5e-6
    assert maxdiff(out["occlusion_map"], ref["occlusion_map"]) <= 5e-6
    assert_stats(out["out"], ref["out__stats"], 5e-6)


def test_dense_motion_internals(run: tuple[dict, dict]) -> None:
    out, internals = run
    ref = fixture("W_warping")
    assert maxdiff(internals["norm"][0, :, 8, 24:40, 24:40], ref["dm_norm_slice"]) <= 5e-6
    assert internals["hourglass"].shape == (1, 142, 16, 64, 64)
    assert maxdiff(internals["hourglass"][0, :, 8, 30:34, 30:34], ref["dm_hourglass_slice"]) <= 5e-6
    assert maxdiff(internals["mask_logits"][0, :, 8, ::8, ::8], ref["dm_mask_logits_slice"]) <= 5e-6
    assert maxdiff(out["mask"][0, :, :, 32, 32], ref["dm_mask_slice"]) <= 5e-6
    assert_stats(internals["hourglass"], ref["dm_hourglass__stats"], 5e-6)
    assert_stats(out["mask"], ref["dm_mask__stats"], 5e-6)


def test_identity_grid_is_linspace() -> None:
    g = coordinate_grid(16, 64, 64, torch.zeros(1))
    assert g.shape == (16, 64, 64, 3)
    assert g[0, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert g[15, 63, 63].tolist() == [1.0, 1.0, 1.0]
    # last dim is (x, y, z) = (W, H, D)
    assert g[0, 0, 63, 0] == 1.0 and g[0, 63, 0, 1] == 1.0 and g[15, 0, 0, 2] == 1.0
