"""espeak-ng TTS through libespeak-ng: real synthesis, real phoneme events."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from avatar_agent.audio import tts
from avatar_agent.audio.tts import TtsError, VoiceNotFoundError, synthesize
from avatar_agent.types import SAMPLE_RATE

TEXT = "Hello world, this is a test of the speech engine."
VOWELS = set("aeiouɑɐæʌɛɪɔʊəɜɒ")


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def f0(audio: np.ndarray) -> float:
    """Median autocorrelation pitch (60–400 Hz) over the loud 40 ms frames."""
    n = 640
    out = []
    for i in range(0, audio.size - n, n):
        x = audio[i : i + n].astype(np.float64)
        if rms(x) < 0.05:
            continue
        x = x - x.mean()
        ac = np.correlate(x, x, "full")[n - 1 :]
        lo, hi = SAMPLE_RATE // 400, SAMPLE_RATE // 60
        out.append(SAMPLE_RATE / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(out))


def test_utterance_audio_and_phonemes_in_order():
    u = synthesize(TEXT)
    assert u.audio.dtype == np.float32 and u.audio.ndim == 1
    assert 1.5 < u.duration < 5.0
    assert np.abs(u.audio).max() <= 1.0
    starts = [p.start for p in u.phonemes]
    assert starts == sorted(starts)
    assert all(0.0 <= p.start < p.end <= u.duration + 1e-9 for p in u.phonemes)
    # Phonemes tile the audio: each ends where the next starts.
    assert all(abs(a.end - b.start) < 1e-9 for a, b in zip(u.phonemes, u.phonemes[1:], strict=False))
    symbols = [p.symbol for p in u.phonemes if p.symbol]
    assert len(symbols) >= 25
    assert symbols[:4] == ["h", "ə", "l", "oʊ"]
    # espeak-ng reports one event per spoken word group ("of the" is one), each naming its
    # first word: the word events are the text's words in order, with at most a few merged.
    words = [w.text for w in u.words]
    text_words = TEXT.replace(",", "").replace(".", "").split()
    assert words[:3] == ["Hello", "world", "this"] and words[-1] == "engine"
    assert len(words) >= len(text_words) - 2
    it = iter(text_words)
    assert all(w in it for w in words)   # an in-order subsequence
    assert [w.start for w in u.words] == sorted(w.start for w in u.words)


def test_speech_energy_is_where_the_phonemes_are():
    u = synthesize(TEXT)
    vowel_rms = [rms(u.audio[int(p.start * SAMPLE_RATE) : int(p.end * SAMPLE_RATE)])
                 for p in u.phonemes if p.symbol and p.symbol[0] in VOWELS]
    pause_rms = [rms(u.audio[int(p.start * SAMPLE_RATE) + 800 : int(p.end * SAMPLE_RATE) - 800])
                 for p in u.phonemes if not p.symbol and p.end - p.start > 0.15]
    assert len(vowel_rms) >= 8 and pause_rms
    assert np.median(vowel_rms) > 0.03
    assert max(pause_rms) < 0.1 * np.median(vowel_rms)
    # The first word starts near the start of the audio: speech energy in its first 0.4 s.
    assert rms(u.audio[: int(0.4 * SAMPLE_RATE)]) > 0.02


def test_rate_changes_duration():
    slow = synthesize(TEXT, rate_wpm=110)
    fast = synthesize(TEXT, rate_wpm=280)
    assert slow.duration > 1.6 * fast.duration
    # Same words, same phonemes, only timing differs.
    assert [p.symbol for p in slow.phonemes if p.symbol] == \
        [p.symbol for p in fast.phonemes if p.symbol]


def test_voice_variant_and_language_change_the_speech():
    male = synthesize(TEXT)
    female = synthesize(TEXT, variant="f3")
    assert f0(female.audio) > 1.3 * f0(male.audio)
    gb = synthesize(TEXT, voice="en-gb")   # a language code, resolved to the voice file gmw/en
    assert [p.symbol for p in gb.phonemes] != [p.symbol for p in male.phonemes]
    de = synthesize("Guten Morgen, wie geht es dir?", voice="de")
    assert [p.symbol for p in de.phonemes][:4] == ["ɡ", "uː", "t", "ə"]   # German "Guten"


def test_unknown_voice_or_variant_is_a_clear_error():
    with pytest.raises(VoiceNotFoundError, match="espeak-ng --voices"):
        synthesize(TEXT, voice="xx-no-such-voice")
    with pytest.raises(VoiceNotFoundError, match="variant"):
        synthesize(TEXT, variant="no-such-variant")
    # The engine is still usable afterwards.
    assert synthesize("fine").duration > 0.2


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        synthesize("   ")
    with pytest.raises(ValueError, match="rate_wpm"):
        synthesize(TEXT, rate_wpm=5)
    with pytest.raises(ValueError, match="pitch"):
        synthesize(TEXT, pitch=300)


def test_missing_library_names_the_apt_package():
    with pytest.raises(TtsError, match="apt install espeak-ng"):
        tts._Espeak("libespeak-ng-not-installed.so.9")


def test_concurrent_calls_are_serialised():
    texts = ["one two three", "the blue moon is high", "quick brown fox", "good morning"]
    # Spoken phonemes only: espeak-ng may report one more or one fewer trailing pause event.
    expected = {t: [p.symbol for p in synthesize(t).phonemes if p.symbol] for t in texts}
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def work(t: str) -> None:
        try:
            for _ in range(3):
                results[t] = [p.symbol for p in synthesize(t).phonemes if p.symbol]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in texts]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert results == expected
