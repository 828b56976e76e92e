"""Shared motion-test fixtures: a template avatar (no face detection) and real espeak-ng speech."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from avatar_agent.motion.template import template_avatar
from avatar_agent.types import SAMPLE_RATE, Avatar, Phoneme

torch.set_num_threads(1)

SPEECH_TEXT = ("The quick brown fox jumps over the lazy dog. "
               "Please remember to buy bread, milk and some apples on your way home.")
PAD_S = 1.0


@dataclass(frozen=True)
class Speech:
    """Padded espeak-ng speech: audio, phonemes (seconds from the start of audio) and text."""

    audio: np.ndarray
    phonemes: tuple[Phoneme, ...]
    text: str
    pad: float


@pytest.fixture()
def avatar() -> Avatar:
    return template_avatar()


@pytest.fixture(scope="session")
def speech() -> Speech:
    from avatar_agent.audio.tts import synthesize

    u = synthesize(SPEECH_TEXT)
    pad = np.zeros(int(PAD_S * SAMPLE_RATE), np.float32)
    audio = np.concatenate([pad, u.audio, pad])
    phon = tuple(Phoneme(p.symbol, p.start + PAD_S, p.end + PAD_S) for p in u.phonemes)
    return Speech(audio, phon, SPEECH_TEXT, PAD_S)
