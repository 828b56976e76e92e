"""Shared fixtures for the face tests: the default portrait and its landmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatar_agent.face.landmarks import FaceLandmarks, detect_landmarks, load_image

PORTRAIT = Path(__file__).resolve().parents[2] / "avatars" / "default.png"


@pytest.fixture(scope="session")
def portrait() -> np.ndarray:
    """avatars/default.png as uint8 RGB (512 × 512)."""
    return load_image(PORTRAIT)


@pytest.fixture(scope="session")
def portrait_landmarks(portrait: np.ndarray) -> FaceLandmarks:
    """FaceMesh landmarks of the default portrait."""
    return detect_landmarks(portrait)
