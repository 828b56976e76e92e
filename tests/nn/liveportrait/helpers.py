"""Shared helpers for the LivePortrait conformance tests (fixtures in tests/fixtures/liveportrait)."""

from __future__ import annotations

from functools import cache, cached_property
from pathlib import Path

import numpy as np
import torch

from avatar_agent.nn.liveportrait.appearance import AppearanceFeatureExtractor
from avatar_agent.nn.liveportrait.motion_extractor import MotionExtractor
from avatar_agent.nn.liveportrait.spade import SpadeGenerator
from avatar_agent.nn.liveportrait.stitching import StitchingRetargeting
from avatar_agent.nn.liveportrait.warping import WarpingNetwork
from avatar_agent.nn.liveportrait.weights import (
    MODULE_FILES, LivePortraitModules, build_modules, load_state, official_manifest)
from tests.nn.liveportrait.recipe import recipe_state_dict

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "liveportrait"
MANIFESTS = FIXTURES / "manifests"


def fixture(name: str) -> dict[str, np.ndarray]:
    """Arrays of ``<name>.npz``."""
    with np.load(FIXTURES / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def recipe(module: str) -> dict[str, torch.Tensor]:
    """Recipe state dict in the release's key layout for a module name of MODULE_FILES."""
    assert module in MODULE_FILES
    return recipe_state_dict(MANIFESTS / f"{module}.json")


class _Lazy:
    """Attribute access builds (once) only the network a test needs."""

    @cached_property
    def appearance(self):
        return load_state(AppearanceFeatureExtractor(), recipe("appearance_feature_extractor"), "F")

    @cached_property
    def motion(self):
        return load_state(MotionExtractor(), recipe("motion_extractor"), "M")

    @cached_property
    def warping(self):
        return load_state(WarpingNetwork(), recipe("warping_module"), "W")

    @cached_property
    def spade(self):
        return load_state(SpadeGenerator(), recipe("spade_generator"), "G")

    @cached_property
    def stitching(self):
        return load_state(StitchingRetargeting(), recipe("stitching_retargeting_module"), "S")


@cache
def recipe_modules() -> _Lazy:
    """The five release-size networks with recipe weights, each built on first use per process."""
    return _Lazy()


def tiny_recipe_modules() -> LivePortraitModules:
    """The "tiny" presets filled by the same recipe rule (from their own key lists)."""
    mods = build_modules("tiny")
    for m in mods.all():
        load_state(m, recipe_state_dict([[k, list(s)] for k, s in official_manifest(m).items()]), "tiny")
    return mods


def maxdiff(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def stats(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[sum, sum|·|, mean, std (unbiased), min, max] of the float64-cast tensor (fixture format)."""
    a = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64)
    return np.array([a.sum(), np.abs(a).sum(), a.mean(), a.std(ddof=1), a.min(), a.max()])


def assert_stats(x: torch.Tensor | np.ndarray, ref: np.ndarray, tol: float) -> None:
    """README rule: |Δsum|, |Δabs-sum| ≤ 1e-6·ref[1]; mean/std/min/max within ``tol``."""
    got = stats(x)
    assert abs(got[0] - ref[0]) <= 1e-6 * ref[1], (got, ref)
    assert abs(got[1] - ref[1]) <= 1e-6 * ref[1], (got, ref)
    assert np.all(np.abs(got[2:] - ref[2:]) <= tol), (got, ref)
