"""Phone recognition (pocketsphinx, English model from its wheel) on recorded human speech."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from avatar_agent.audio import recognizer
from avatar_agent.audio.recognizer import ARPABET_IPA, phoneme_source, recognize_phonemes
from avatar_agent.clock import FakeClock
from avatar_agent.motion.visemes import ipa_to_visemes

ALSA = Path("/usr/share/sounds/alsa")   # alsa-utils (install.sh --dev): a woman's recorded voice


def recorded(name: str) -> np.ndarray:
    x, sr = sf.read(str(ALSA / name), dtype="float32", always_2d=True)
    return soxr.resample(x.mean(1), sr, 16000).astype(np.float32)


def test_every_model_phone_maps_to_a_viseme():
    for arpa, ipa in ARPABET_IPA.items():
        assert "@" not in ipa_to_visemes(ipa), (arpa, ipa)


def test_recognises_the_phones_of_front_center():
    audio = recorded("Front_Center.wav")                    # "front center"
    ph = recognize_phonemes(audio)
    symbols = [p.symbol for p in ph]
    assert {"n", "t", "s"} <= set(symbols), symbols
    assert symbols.count("ɛ") + symbols.count("ʌ") + symbols.count("ɪ") >= 2, symbols
    starts = [p.start for p in ph]
    assert starts == sorted(starts) and all(p.end > p.start for p in ph)
    assert 0 <= starts[0] and ph[-1].end <= len(audio) / 16000 + 0.02
    # The "s" of "center" comes after the "n t" of "front".
    assert ph[symbols.index("s")].start > ph[symbols.index("n")].start + 0.3
    assert recognize_phonemes(np.zeros(0, np.float32)) == ()


def test_phoneme_source_attaches_phones_to_the_file_frames(tmp_path):
    audio = recorded("Front_Left.wav")
    wav = tmp_path / "speech.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")

    async def run() -> list:
        src = await phoneme_source(wav, FakeClock())
        assert src is not None
        return [f async for f in src.frames()]

    frames = asyncio.run(run())
    samples = np.concatenate([f.samples for f in frames])
    np.testing.assert_allclose(samples[: len(audio)], audio, atol=1e-4)
    tagged = {p.symbol for f in frames for p in f.phonemes}
    assert {"l", "f"} <= tagged, tagged                    # "front left"


def test_without_pocketsphinx_render_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(recognizer, "available", lambda: False)
    assert asyncio.run(phoneme_source(tmp_path / "x.wav", FakeClock())) is None


@pytest.mark.parametrize("name", ["Rear_Right.wav"])
def test_decoding_is_faster_than_real_time(name):
    import time

    audio = recorded(name)
    recognize_phonemes(audio[:1600])                        # model load, once per process
    t = time.perf_counter()
    recognize_phonemes(audio)
    assert time.perf_counter() - t < 0.6 * len(audio) / 16000
