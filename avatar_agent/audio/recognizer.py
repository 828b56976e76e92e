"""Phone recognition for recorded speech, so a rendered file gets visemes like TTS speech does.

pocketsphinx (its wheel ships CMU's English acoustic model and a phone bigram model) decodes the
whole recording in all-phone mode; each recognised ARPAbet phone becomes a :class:`Phoneme` with
its IPA symbol and time, and the viseme track (:mod:`avatar_agent.motion.visemes`) turns those into
mouth shapes: p/b/m close the lips, o/u round them, i/e spread them, open vowels open the jaw.
On real speakers' videos this follows their mouth opening more closely than any acoustic cue
(bench/lipsync_real.py); on other languages the English phone set still labels vowel height,
rounding and bilabial closures approximately, which is what the mouth shows.

Offline only: all-phone decoding costs about 0.1–0.2 × real time on one core and a phone's label
settles only once the audio after it is known, so the live path (40 ms lookahead, motion budget
0.05 × real time) keeps the acoustic jaw estimate.  pocketsphinx is optional at run time:
:func:`phoneme_source` returns None without it and the render falls back to audio-only lip-sync.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from avatar_agent.clock import Clock
from avatar_agent.types import SAMPLE_RATE, Phoneme

log = logging.getLogger(__name__)

ARPABET_IPA: dict[str, str] = {
    "AA": "ɑ", "AE": "æ", "AH": "ʌ", "AO": "ɔ", "AW": "aʊ", "AY": "aɪ", "B": "b", "CH": "tʃ",
    "D": "d", "DH": "ð", "EH": "ɛ", "ER": "ɚ", "EY": "eɪ", "F": "f", "G": "ɡ", "HH": "h",
    "IH": "ɪ", "IY": "i", "JH": "dʒ", "K": "k", "L": "l", "M": "m", "N": "n", "NG": "ŋ",
    "OW": "oʊ", "OY": "ɔɪ", "P": "p", "R": "ɹ", "S": "s", "SH": "ʃ", "T": "t", "TH": "θ",
    "UH": "ʊ", "UW": "u", "V": "v", "W": "w", "Y": "j", "Z": "z", "ZH": "ʒ",
}
"""The 39 phones of CMU's English model → IPA as espeak-ng writes it (SIL and noises: none)."""

BEAM = 1e-20
"""Search beam (state and phone): narrower (1e-10) halves the cost but drops a third of the
phones in fast speech."""
FRAME_RATE = 100
"""pocketsphinx analysis frames per second."""


class RecognizerError(RuntimeError):
    """The recogniser could not decode the audio."""


def available() -> bool:
    """Whether pocketsphinx and its bundled English model can be loaded."""
    try:
        _model_paths()
    except (ImportError, FileNotFoundError):
        return False
    return True


def _model_paths() -> tuple[str, str]:
    from pocketsphinx import get_model_path

    root = Path(get_model_path()) / "en-us"
    hmm, phone_lm = root / "en-us", root / "en-us-phone.lm.bin"
    if not hmm.is_dir() or not phone_lm.is_file():
        raise FileNotFoundError(f"pocketsphinx's English model is missing under {root}; "
                                "reinstall it: pip install --force-reinstall pocketsphinx==5.1.1")
    return str(hmm), str(phone_lm)


@functools.lru_cache(maxsize=1)
def _decoder() -> tuple[Any, threading.Lock]:
    """One all-phone decoder per process (loading the model takes ~0.3 s); not re-entrant."""
    from pocketsphinx import Decoder

    hmm, phone_lm = _model_paths()
    dec = Decoder(hmm=hmm, allphone=phone_lm, lm=None, beam=BEAM, pbeam=BEAM, lw=2.0,
                  samprate=SAMPLE_RATE, loglevel="FATAL")
    return dec, threading.Lock()


def recognize_phonemes(audio: np.ndarray) -> tuple[Phoneme, ...]:
    """Phones of 16 kHz mono float32 speech, times in seconds from its first sample.

    Raises:
        ImportError: pocketsphinx is not installed.
        RecognizerError: the decoder failed.
    """
    a = np.asarray(audio, np.float32).reshape(-1)
    if a.size == 0:
        return ()
    pcm = (np.clip(a, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    dec, lock = _decoder()
    with lock:
        try:
            dec.start_utt()
            dec.process_raw(pcm, full_utt=True)
            dec.end_utt()
            segs = [(s.word, s.start_frame, s.end_frame) for s in dec.seg()]
        except Exception as e:  # pocketsphinx raises RuntimeError/ValueError from C
            raise RecognizerError(f"phone recognition failed: {e}") from e
    out = []
    for word, start, end in segs:
        ipa = ARPABET_IPA.get(str(word).strip("+").upper())
        if ipa:
            out.append(Phoneme(ipa, start / FRAME_RATE, (end + 1) / FRAME_RATE))
    return tuple(out)


async def read_audio(path: Path) -> np.ndarray:
    """A whole file as 16 kHz mono float32, decoded by the project's file source."""
    from avatar_agent.audio.file import FileSource

    src = FileSource(path, realtime=False)
    try:
        parts = [f.samples async for f in src.frames()]
    finally:
        await src.close()
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


async def phoneme_source(path: Path, clock: Clock) -> Any | None:
    """A source that plays the file with its recognised phones attached (as TTS frames carry
    espeak-ng's), or None when pocketsphinx is not installed (the caller plays the file plainly).
    """
    if not available():
        log.info("pocketsphinx not installed: audio-only lip-sync for %s", path)
        return None
    from avatar_agent.audio.frames import FramesSource

    audio = await read_audio(Path(path))
    phonemes = recognize_phonemes(audio)
    log.info("recognised %d phones in %.1f s of %s", len(phonemes), audio.size / SAMPLE_RATE,
             path)
    return FramesSource.from_audio(audio, clock, phonemes)
