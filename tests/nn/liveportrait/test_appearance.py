"""F (appearance feature extractor) against the release's output on recipe weights."""

import numpy as np
import pytest
import torch

from tests.nn.liveportrait.helpers import assert_stats, fixture, maxdiff, recipe_modules

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def f_s() -> torch.Tensor:
    x = torch.from_numpy(fixture("source")["x"])
    with torch.no_grad():
        return recipe_modules().appearance(x)


def test_shape(f_s: torch.Tensor) -> None:
    assert f_s.shape == (1, 32, 16, 64, 64)
    assert f_s.dtype == torch.float32


def test_matches_release(f_s: torch.Tensor) -> None:
    ref = fixture("F_appearance")
    assert maxdiff(f_s[0, :, 7, 16:48, 16:48], ref["f_s_slice"]) <= 1e-5
    # The full volume is stored as float16: 1e-3 covers one fp16 ulp for |x| < 2.
    assert maxdiff(f_s, ref["f_s_f16"].astype(np.float32)) <= 1e-3
    sum_cd = f_s[0].double().sum((2, 3)).numpy()
    assert np.abs(sum_cd - ref["f_s_sum_cd"]).max() <= 1e-6 * np.abs(ref["f_s_sum_cd"]).sum() + 1e-3
    assert_stats(f_s, ref["f_s__stats"], 1e-5)


def test_input_is_the_release_preparation() -> None:
    src = fixture("source")
    x = torch.from_numpy(src["source_rgb_u8"]).permute(2, 0, 1)[None].float() / 255
    assert maxdiff(x, src["x"]) == 0.0
