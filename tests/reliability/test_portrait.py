"""Row 9 of issue 13: a huge portrait costs bounded time and memory (load_portrait downscales it
while decoding), and one beyond the hard limit is refused from its header before decoding."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar_agent.face.landmarks import (MAX_PORTRAIT_PIXELS, FaceError, detect_landmarks,
                                         load_image, load_portrait)

from .helpers import PORTRAIT, LoopProbe


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12000 × 12000 (144 MP) JPEG: the bundled portrait, ×4, in the middle of a grey field."""
    face = cv2.resize(cv2.imread(str(PORTRAIT)), (2048, 2048), interpolation=cv2.INTER_CUBIC)
    img = np.full((12000, 12000, 3), 128, np.uint8)
    img[4976:7024, 4976:7024] = face
    p = tmp_path_factory.mktemp("huge") / "huge.jpg"
    cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return p


async def test_row9_a_12000px_portrait_loads_small_fast_and_off_the_loop(
        huge: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="avatar_agent.face.landmarks"):
        async with LoopProbe() as probe:
            t = time.perf_counter()
            img = await asyncio.to_thread(load_portrait, huge)
            took = time.perf_counter() - t
    h, w = img.shape[:2]
    assert img.dtype == np.uint8 and img.shape[2] == 3
    assert h * w <= MAX_PORTRAIT_PIXELS and abs(h - w) <= 1 and w >= 2048
    assert took < 2.0                     # load_image: 2+ s and a 432 MB array for this file
    assert probe.max_gap < 0.25
    assert any("downscaled to" in r.getMessage() for r in caplog.records)
    lm = detect_landmarks(img)            # the face survives the downscale
    assert lm.n_faces_found == 1


def test_row9_small_portraits_are_loaded_unchanged() -> None:
    assert np.array_equal(load_portrait(PORTRAIT), load_image(PORTRAIT))


def test_row9_a_portrait_beyond_the_hard_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    # A PNG header claiming 20000 × 20000 (400 MP) with no pixel data: refused before decoding.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    p = tmp_path / "bomb.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8,
                                                                       2, 0, 0, 0))
                  + chunk(b"IEND", b""))
    t = time.perf_counter()
    with pytest.raises(FaceError, match="MP"):
        load_portrait(p)
    assert time.perf_counter() - t < 0.5
