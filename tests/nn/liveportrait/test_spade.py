"""G (SPADE generator) against the release, with its internal statistics."""

import numpy as np
import pytest
import torch

from tests.nn.liveportrait.helpers import assert_stats, fixture, maxdiff, recipe_modules

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # one release-size forward


@pytest.fixture(scope="module")
def run() -> tuple[torch.Tensor, dict]:
    feat = torch.from_numpy(fixture("W_warping")["out_f16"].astype(np.float32))
    stats: dict = {}
    with torch.no_grad():
        img = recipe_modules().spade(feat, stats=stats)
    return img, stats


def test_image(run: tuple[torch.Tensor, dict]) -> None:
    img, _ = run
    ref = fixture("G_spade")
    assert img.shape == (1, 3, 512, 512)
    assert maxdiff(img[0, :, 200:264, 200:264], ref["out_slice"]) <= 5e-5
    assert maxdiff(img, ref["out_f16"].astype(np.float32)) <= 5e-4 + 5e-5
    assert_stats(img, ref["out__stats"], 5e-5)


def test_intermediate_stats(run: tuple[torch.Tensor, dict]) -> None:
    _, stats = run
    ref = fixture("G_spade")
    for name in ("fc", "G_middle_5", "up_0", "up_1", "conv_img"):
        # Activations here are O(1..10): scale the README's 5e-5 image budget accordingly.
        scale = max(1.0, abs(ref[f"{name}__stats"][4]), abs(ref[f"{name}__stats"][5]))
        assert_stats(stats[name], ref[f"{name}__stats"], 5e-5 * scale)
