"""Mouth shapes on rendered frames: espeak-ng speech through `render` (the default embedded
generator: the tiny MoDA with the viseme track on its mouth), measured with FaceMesh."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from avatar_agent.motion.visemes import ipa_to_visemes

ROOT = Path(__file__).resolve().parents[2]
TEXT = "Bob may meet Pete by the pool. See you soon, mom, keep the blue boat."
PAD_S = 0.5                                   # render_to_file pads TTS with 0.5 s of silence


class _Measure:
    """Sink: FaceMesh inner-lip gap and mouth width (corners 61-291), both / inter-ocular."""

    name = "measure"

    def __init__(self) -> None:
        import mediapipe as mp

        self.mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=False, refine_landmarks=True,
                                                    max_num_faces=1)
        self.gap: dict[int, float] = {}
        self.width: dict[int, float] = {}

    async def start(self, width: int, height: int, fps: int) -> None:
        pass

    async def send(self, frame) -> None:  # noqa: ANN001
        h, w = frame.image.shape[:2]
        res = self.mesh.process(np.ascontiguousarray(frame.image))
        assert res.multi_face_landmarks, f"no face in rendered frame {frame.index}"
        p = np.array([(q.x * w, q.y * h) for q in res.multi_face_landmarks[0].landmark])
        iod = np.linalg.norm(p[263] - p[33])
        self.gap[frame.index] = float(np.linalg.norm(p[14] - p[13]) / iod)
        self.width[frame.index] = float(np.linalg.norm(p[291] - p[61]) / iod)

    async def close(self) -> None:
        self.mesh.close()


@pytest.fixture(scope="module")
def rendered():
    from avatar_agent.audio.tts import synthesize
    from avatar_agent.config import load_config
    from avatar_agent.offline import render_to_file

    cfg = load_config(None, [], use_default_path=False)
    sink = _Measure()
    asyncio.run(render_to_file(cfg, ROOT / "avatars" / "default.png", None, text=TEXT,
                               extra_sinks=[sink]))
    utt = synthesize(TEXT, voice=cfg.audio.voice, rate_wpm=cfg.audio.tts_rate)
    n = max(sink.gap) + 1
    gap = np.array([sink.gap.get(i, np.nan) for i in range(n)])
    width = np.array([sink.width.get(i, np.nan) for i in range(n)])
    return gap, width, utt.phonemes


def _midframes(phonemes, classes: tuple[str, ...]) -> list[int]:
    return [int(((p.start + p.end) / 2 + PAD_S) * 25) for p in phonemes
            if ipa_to_visemes(p.symbol)[0] in classes and len(ipa_to_visemes(p.symbol)) == 1]


def test_bilabials_close_the_rendered_lips(rendered):
    gap, _, phonemes = rendered
    closed = float(np.nanmedian(gap[:8]))                 # silence before speech: mouth at rest
    wide = float(np.nanpercentile(gap, 95))
    assert wide > closed + 0.05                            # the mouth does open while speaking
    frames = _midframes(phonemes, ("PP",))
    assert len(frames) >= 8
    rel = (gap[frames] - closed) / (wide - closed)
    assert np.all(rel <= 0.2), np.round(rel, 2)


def test_rounded_vowels_are_narrower_than_spread_ones(rendered):
    _, width, phonemes = rendered
    rounded = _midframes(phonemes, ("U", "O", "WW"))
    spread = _midframes(phonemes, ("I", "E"))
    assert len(rounded) >= 3 and len(spread) >= 3
    ratio = np.nanmedian(width[rounded]) / np.nanmedian(width[spread])
    assert ratio <= 0.9, ratio
