"""LivePortrait's five renderer networks in plain PyTorch (the release's ``src/modules/``).

F :class:`AppearanceFeatureExtractor`, M :class:`MotionExtractor`, W :class:`WarpingNetwork`,
G :class:`SpadeGenerator`, S :class:`StitchingRetargeting`; keypoint math in :mod:`.keypoints`,
strict checkpoint loading in :mod:`.weights`, ONNX export in :mod:`.export`.  Proven equal to the
release by tests/nn/liveportrait against tests/fixtures/liveportrait.
"""

from avatar_agent.nn.liveportrait.appearance import AppearanceFeatureExtractor, AppearanceParams
from avatar_agent.nn.liveportrait.motion_extractor import MotionExtractor, MotionExtractorParams
from avatar_agent.nn.liveportrait.spade import SpadeGenerator, SpadeParams
from avatar_agent.nn.liveportrait.stitching import StitchingParams, StitchingRetargeting
from avatar_agent.nn.liveportrait.warping import WarpingNetwork, WarpingParams
from avatar_agent.nn.liveportrait.weights import (
    LivePortraitModules, WeightsError, build_modules, load_modules)

__all__ = [
    "AppearanceFeatureExtractor", "AppearanceParams", "MotionExtractor", "MotionExtractorParams",
    "WarpingNetwork", "WarpingParams", "SpadeGenerator", "SpadeParams", "StitchingRetargeting",
    "StitchingParams", "LivePortraitModules", "WeightsError", "build_modules", "load_modules",
]
