"""Phone recognition for recorded speech, so a rendered file gets visemes like TTS speech does.

pocketsphinx (its wheel ships CMU's English acoustic model and a phone bigram model) decodes the
whole recording in all-phone mode; each recognised ARPAbet phone becomes a :class:`Phoneme` with
its IPA symbol and time, and the viseme track (:mod:`avatar_agent.motion.visemes`) turns those into
mouth shapes: p/b/m close the lips, o/u round them, i/e spread them, open vowels open the jaw.
On real speakers' videos this follows their mouth opening more closely than any acoustic cue
(bench/lipsync_real.py); on other languages the English phone set still labels vowel height,
rounding and bilabial closures approximately, which is what the mouth shows.

Two ways in:

* **Files** (:func:`phoneme_source`): the whole recording is decoded before it plays, so every
  phone's label has all the audio after it.
* **Live** (:class:`PhoneTracker`): the microphone, or pushed speech without phonemes, is decoded
  as it arrives, one utterance (VAD) at a time; each chunk gets the decoder's current best path,
  which reaches the end of the chunk's lookahead.  A phone near that end may still be relabelled
  by later audio: the next chunk carries the revision, and the motion generator lets the newest
  phones of a time span replace the ones it remembered there.  Feeding costs about 0.8 ms of one
  core per 20 ms frame of speech (pocketsphinx holds the interpreter lock meanwhile), which is why
  the session server leaves it off by default (``audio.recognizer``).

pocketsphinx is optional at run time: :func:`phoneme_source` returns None without it and the
render falls back to audio-only lip-sync; :func:`make_tracker` returns None.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from avatar_agent.chunker import SpeechEnded, SpeechStarted
from avatar_agent.clock import Clock
from avatar_agent.types import SAMPLE_RATE, AudioFrame, Phoneme, SpeechChunk

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


def _new_decoder() -> Any:
    """An all-phone decoder (~0.1 s and ~28 MB each); not re-entrant."""
    from pocketsphinx import Decoder

    hmm, phone_lm = _model_paths()
    return Decoder(hmm=hmm, allphone=phone_lm, lm=None, beam=BEAM, pbeam=BEAM, lw=2.0,
                   samprate=SAMPLE_RATE, loglevel="FATAL")


@functools.lru_cache(maxsize=1)
def _decoder() -> tuple[Any, threading.Lock]:
    """The process's decoder for whole files, with the lock its users take."""
    return _new_decoder(), threading.Lock()


def _pcm(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] → the decoder's s16le bytes."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def _phones(segments: Any, offset_s: float) -> tuple[Phoneme, ...]:
    """The decoder's segments (its frames from the utterance start) → phonemes on the timeline
    (seconds), leaving out silences and noises."""
    out = []
    for s in segments or ():
        ipa = ARPABET_IPA.get(str(s.word).strip("+").upper())
        if ipa:
            out.append(Phoneme(ipa, offset_s + s.start_frame / FRAME_RATE,
                               offset_s + (s.end_frame + 1) / FRAME_RATE, heard=True))
    return tuple(out)


def recognize_phonemes(audio: np.ndarray) -> tuple[Phoneme, ...]:
    """Phones of 16 kHz mono float32 speech, times in seconds from its first sample.

    Raises:
        ImportError: pocketsphinx is not installed.
        RecognizerError: the decoder failed.
    """
    a = np.asarray(audio, np.float32).reshape(-1)
    if a.size == 0:
        return ()
    dec, lock = _decoder()
    with lock:
        try:
            dec.start_utt()
            dec.process_raw(_pcm(a), full_utt=True)
            dec.end_utt()
            return _phones(dec.seg(), 0.0)
        except Exception as e:  # pocketsphinx raises RuntimeError/ValueError from C
            raise RecognizerError(f"phone recognition failed: {e}") from e


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


_FAILED = object()
"""What :meth:`PhoneTracker._guard` returns for a call that raised."""

RECENT_S = 1.0
"""Audio the tracker keeps while no utterance is open: the VAD decides an utterance began only
after its pre-roll and first voiced frames have passed (≈ 0.1 s), and the decoder needs them."""


class PhoneTracker:
    """Live phone recognition for one audio stream: phonemes for chunks that come without any.

    Fed from the agent's listen task, in timeline order: every audio frame (:meth:`push`), the
    chunker's utterance events (:meth:`on_event`), and each chunk before it is queued
    (:meth:`annotate`).  While an utterance is open its audio goes to the decoder as it arrives;
    a chunk of that utterance gets the phones of the decoder's current best path that overlap
    its audio (context and lookahead included).  When the utterance ends, the final path serves
    the chunks still to come.  An utterance whose frames carry their own phonemes (TTS) is not
    decoded.  A decoder error is logged once and turns the tracker off: lip-sync falls back to
    the audio-only estimate, the session goes on.
    """

    def __init__(self) -> None:
        self._dec: Any = None
        self._recent: collections.deque[AudioFrame] = collections.deque()
        self._utt_start: int | None = None    # timeline sample the decoder's utterance began at
        self._fed = 0                         # timeline sample up to which the decoder has audio
        self._phones: tuple[Phoneme, ...] = ()  # the open utterance's best path so far
        self._fresh = True                    # _phones is the decoder's path up to _fed
        # The last ended utterance's final path: its last chunks may be queued after the next
        # utterance has started (the chunker reports a start as soon as it is decided).
        self._done: tuple[Phoneme, ...] = ()
        self._own_phonemes = False            # this utterance's frames carry phonemes (TTS)
        self.off = False
        """True after a decoder error (nothing is decoded any more)."""

    def prepare(self) -> None:
        """Load the decoder (~0.1 s: call it off the event loop, before the first speech)."""
        if self._dec is None and not self.off:
            self._dec = _new_decoder()

    # ---- input ------------------------------------------------------------------------------

    def push(self, frame: AudioFrame) -> None:
        """One audio frame of the stream (before the chunker sees it)."""
        if self.off:
            return
        if frame.phonemes and self._utt_start is not None and not self._own_phonemes:
            self._own_phonemes = True         # TTS speech: its phonemes beat any recognition
            self._close(keep=False)
        self._recent.append(frame)
        horizon = frame.index - int(RECENT_S * SAMPLE_RATE)
        while self._recent and self._recent[0].index + self._recent[0].samples.size <= horizon:
            self._recent.popleft()
        if self._utt_start is not None and not self._own_phonemes:
            self._feed(frame)

    def on_event(self, event: SpeechStarted | SpeechEnded) -> None:
        """The chunker's utterance boundaries."""
        if self.off:
            return
        if isinstance(event, SpeechStarted):
            self._close(keep=False)
            self._phones, self._fresh = (), True
            self._own_phonemes = any(f.phonemes for f in self._recent)
            if self._own_phonemes or self._guard(self._start, event.start) is _FAILED:
                return
            for f in list(self._recent):
                self._feed(f)
        else:
            self._close(keep=True)

    def annotate(self, chunk: SpeechChunk) -> SpeechChunk:
        """``chunk`` with the recognised phones over its audio, if it is speech without phonemes."""
        if self.off or not chunk.speech or chunk.phonemes:
            return chunk
        if not self._fresh and self._utt_start is not None:
            segments = self._guard(self._segments)
            if segments is _FAILED:
                return chunk
            self._phones = _phones(segments, self._utt_start / SAMPLE_RATE)
            self._fresh = True
        t0 = (chunk.start - chunk.left) / SAMPLE_RATE
        t1 = (chunk.start + chunk.n_new + chunk.right) / SAMPLE_RATE
        phon = tuple(p for p in self._done + self._phones if p.start < t1 and p.end > t0)
        return dataclasses.replace(chunk, phonemes=phon) if phon else chunk

    def reset(self) -> None:
        """The timeline was cut (a rewind): forget the open utterance and the recent audio."""
        self._close(keep=False)
        self._recent.clear()
        self._phones = self._done = ()

    # ---- internals --------------------------------------------------------------------------

    def _start(self, at: int) -> None:
        self.prepare()
        self._dec.start_utt()
        self._utt_start = self._fed = at
        self._fresh = False

    def _feed(self, frame: AudioFrame) -> None:
        """The part of ``frame`` past what the decoder has (a gap in the timeline is silence)."""
        if self._utt_start is None:          # (turned off by an error in this utterance)
            return
        end = frame.index + frame.samples.size
        if end <= self._fed:
            return
        lo = max(frame.index, self._fed)
        gap = lo - self._fed
        x = frame.samples[lo - frame.index:]
        if gap:
            x = np.concatenate([np.zeros(gap, np.float32), x])
        feed = functools.partial(self._dec.process_raw, _pcm(x), full_utt=False)
        if self._guard(feed) is not _FAILED:
            self._fed = end
            self._fresh = False

    def _close(self, keep: bool) -> None:
        """End the decoder's utterance; ``keep``: its final path becomes the chunks' phones."""
        if self._utt_start is None:
            return
        start, self._utt_start = self._utt_start, None
        if self._guard(self._dec.end_utt) is _FAILED or not keep:
            return
        segments = self._guard(self._segments)
        if segments is not _FAILED:
            self._done, self._phones, self._fresh = _phones(segments, start / SAMPLE_RATE), (), True

    def _segments(self) -> list[Any]:
        return list(self._dec.seg() or ())     # (None before the first phone)

    def _guard(self, call: Any, *args: Any) -> Any:
        """Run a decoder call; on an error log it once, turn the tracker off and return
        ``_FAILED``."""
        if self.off:
            return _FAILED
        try:
            return call(*args)
        except Exception:  # pocketsphinx raises RuntimeError/ValueError from C
            log.exception("live phone recognition failed; lip-sync goes on from the audio alone")
            self.off = True
            self._utt_start = None
            self._phones = self._done = ()
            return _FAILED


def make_tracker() -> PhoneTracker | None:
    """A :class:`PhoneTracker`, or None when pocketsphinx is not installed."""
    if not available():
        log.info("pocketsphinx not installed: live lip-sync from the audio alone")
        return None
    return PhoneTracker()
