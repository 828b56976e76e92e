"""Text-to-speech with phoneme timing: libespeak-ng through ctypes.

espeak-ng's library is driven directly (not the CLI) because only the library reports phoneme
events: with ``espeakINITIALIZE_PHONEME_EVENTS | espeakINITIALIZE_PHONEME_IPA`` every phoneme
arrives as an event holding its IPA symbol and its sample position, in the same callback as the PCM.

The library is one global state machine (one voice, one callback), so this module holds exactly one
:class:`_Espeak` binding per process behind a lock; :func:`synthesize` is safe to call from any
thread.  Audio comes out at 22 050 Hz and is resampled to the pipeline's 16 kHz with soxr.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass

import numpy as np

from avatar_agent.types import SAMPLE_RATE, Phoneme

# speak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_PHONEME_IPA = 0x0002
_INIT_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_EV_LIST_TERMINATED, _EV_WORD, _EV_PHONEME = 0, 1, 7
_PARAM_RATE, _PARAM_PITCH = 1, 3
_EE_OK, _EE_NOT_FOUND = 0, 2


class TtsError(RuntimeError):
    """espeak-ng is missing or refused the request."""


class VoiceNotFoundError(TtsError, ValueError):
    """The requested espeak-ng voice does not exist."""


@dataclass(frozen=True, slots=True)
class Word:
    """One word event: its span in the input text and its start time in the audio."""

    text: str
    start: float


@dataclass(frozen=True, slots=True)
class Utterance:
    """Synthesised speech.

    Attributes:
        audio: float32 [N] 16 kHz mono in [-1, 1].
        phonemes: IPA phonemes in order; times in seconds from the start of ``audio``.  Pauses
            are reported by espeak-ng as events with an empty symbol; they are kept as symbol "".
        words: word events in order.
        text: the text that was spoken.
    """

    audio: np.ndarray
    phonemes: tuple[Phoneme, ...]
    words: tuple[Word, ...]
    text: str

    @property
    def duration(self) -> float:
        """Length of the audio in seconds."""
        return self.audio.shape[0] / SAMPLE_RATE


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),   # 1-based character position in the input
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms from the start of this synthesis
        ("sample", ctypes.c_int),          # sample index (22 050 Hz) since this synthesis began
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),    # (priority byte, NUL-terminated name)*, then a 0 byte
        ("identifier", ctypes.c_char_p),   # voice file path, e.g. "gmw/en"
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


def _languages(ptr: int | None) -> list[str]:
    """Decode espeak_VOICE.languages."""
    out: list[str] = []
    if not ptr:
        return out
    i = 0
    while ctypes.string_at(ptr + i, 1) != b"\0":
        name = ctypes.string_at(ptr + i + 1)
        out.append(name.decode("ascii", "replace"))
        i += 2 + len(name)
    return out


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.POINTER(_Event))


class _Espeak:
    """The process's one binding to libespeak-ng (initialised once, used under ``lock``)."""

    def __init__(self, libname: str | None = None) -> None:
        name = libname or ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise TtsError("libespeak-ng is not installed: apt install espeak-ng "
                           "(brings libespeak-ng1)") from e
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None,
                                     _INIT_PHONEME_EVENTS | _INIT_PHONEME_IPA | _INIT_DONT_EXIT)
        if rate <= 0:
            raise TtsError("espeak_Initialize failed: is espeak-ng-data installed? "
                           "(apt install espeak-ng)")
        self.lib = lib
        self.rate = rate
        self.lock = threading.Lock()
        self._pcm: list[bytes] = []
        self._events: list[tuple[int, int, int, int, str]] = []
        # Keep a reference: ctypes frees the trampoline when the Python object dies.
        self._callback = _SynthCallback(self._on_synth)
        lib.espeak_SetSynthCallback(self._callback)
        # The very first synthesis after espeak_Initialize times clause pauses differently from
        # every later one; a throw-away sentence makes all real calls reproducible.
        self.synth("Warm up, then speak.", "en-us", 175, 50)

    def _on_synth(self, wav: ctypes._Pointer[ctypes.c_short], n: int,
                  events: ctypes._Pointer[_Event]) -> int:
        if n > 0 and wav:
            self._pcm.append(ctypes.string_at(wav, n * 2))
        i = 0
        while events[i].type != _EV_LIST_TERMINATED:
            e = events[i]
            if e.type == _EV_PHONEME:
                sym = bytes(e.id.string).split(b"\0", 1)[0].decode("utf-8", "replace")
                self._events.append((e.type, e.sample, e.text_position, e.length, sym))
            elif e.type == _EV_WORD:
                self._events.append((e.type, e.sample, e.text_position, e.length, ""))
            i += 1
        return 0  # 0 = continue synthesis

    def _by_language(self, language: str) -> str | None:
        """Identifier of the best voice speaking ``language`` ("en-gb" → "gmw/en"), if any."""
        voices = self.lib.espeak_ListVoices(None)
        best: tuple[int, str] | None = None
        i = 0
        while voices[i]:
            v = voices[i].contents
            langs = _languages(v.languages)
            # Skip MBROLA voices: they need the separate (non-free) mbrola package.
            ident = (v.identifier or b"").decode()
            if language.lower() in (x.lower() for x in langs) and not ident.startswith("mb/"):
                rank = [x.lower() for x in langs].index(language.lower())
                if best is None or rank < best[0]:
                    best = (rank, ident)
            i += 1
        return best[1] if best else None

    def variants(self) -> set[str]:
        """Names of the installed voice variants ("f3", "klatt", "Annie", ...), lower case."""
        spec = _Voice(languages=ctypes.cast(ctypes.c_char_p(b"variant"), ctypes.c_void_p))
        voices = self.lib.espeak_ListVoices(ctypes.byref(spec))
        out: set[str] = set()
        i = 0
        while voices[i]:
            ident = (voices[i].contents.identifier or b"").decode()
            out.add(ident.rsplit("/", 1)[-1].lower())
            i += 1
        return out

    def set_voice(self, voice: str) -> None:
        """Select a voice by name, file or language code, with an optional ``+variant``."""
        _, _, variant = voice.partition("+")
        if variant and variant.lower() not in self.variants():
            # espeak-ng silently ignores unknown variants; say so instead.
            raise VoiceNotFoundError(f"espeak-ng has no voice variant {variant!r}; list them with "
                                     "`espeak-ng --voices=variant` (e.g. 'f3', 'm2', 'klatt')")
        err = self.lib.espeak_SetVoiceByName(voice.encode())
        if err == _EE_NOT_FOUND:
            # Names like "en-gb" are languages of a voice file ("gmw/en"), not voice names.
            base, _, variant = voice.partition("+")
            ident = self._by_language(base)
            if ident is not None:
                err = self.lib.espeak_SetVoiceByName(
                    (ident + ("+" + variant if variant else "")).encode())
        if err == _EE_NOT_FOUND:
            raise VoiceNotFoundError(f"espeak-ng has no voice {voice!r}; list them with "
                                     "`espeak-ng --voices` (e.g. 'en-us', 'en-gb', 'de', "
                                     "'en-us+f3')")
        if err != _EE_OK:
            raise TtsError(f"espeak_SetVoiceByName({voice!r}) failed with code {err}")

    def synth(self, text: str, voice: str, rate_wpm: int, pitch: int
              ) -> tuple[np.ndarray, list[tuple[int, int, int, int, str]]]:
        """PCM int16 at ``self.rate`` and raw events; caller holds ``lock``."""
        self.set_voice(voice)
        self.lib.espeak_SetParameter(_PARAM_RATE, int(rate_wpm), 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self._pcm, self._events = [], []
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise TtsError(f"espeak_Synth failed with code {err}")
        pcm = np.frombuffer(b"".join(self._pcm), dtype=np.int16).copy()
        return pcm, self._events


_engine: _Espeak | None = None
_engine_lock = threading.Lock()


def _get_engine() -> _Espeak:
    # espeak-ng itself is process-global state; mirroring that with one lazily created binding
    # is the honest model (a second "instance" would silently share the same C state).
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _Espeak()
        return _engine


def synthesize(text: str, voice: str = "en-us", rate_wpm: int = 175, pitch: int = 50,
               variant: str | None = None) -> Utterance:
    """Speak ``text`` with espeak-ng; audio at 16 kHz plus IPA phoneme and word timings.

    Args:
        text: UTF-8 text (plain, not SSML).
        voice: espeak-ng voice name ("en-us", "en-gb", "fr", ...).
        rate_wpm: speaking rate in words per minute (80–450).
        pitch: base pitch 0–100.
        variant: voice variant appended as ``voice+variant`` ("f3", "m2", "klatt", ...).

    Raises:
        VoiceNotFoundError: unknown voice or variant.
        TtsError: libespeak-ng missing or synthesis failed.
        ValueError: empty text or parameters out of range.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    if not 80 <= rate_wpm <= 450:
        raise ValueError(f"rate_wpm={rate_wpm} must be within 80..450 words per minute")
    if not 0 <= pitch <= 100:
        raise ValueError(f"pitch={pitch} must be within 0..100")
    name = voice if variant is None else f"{voice}+{variant}"
    eng = _get_engine()
    with eng.lock:
        pcm, events = eng.synth(text, name, rate_wpm, pitch)
        src_rate = eng.rate
    audio = pcm.astype(np.float32) / 32768.0
    if src_rate != SAMPLE_RATE and audio.size:
        import soxr

        audio = soxr.resample(audio, src_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    duration = audio.shape[0] / SAMPLE_RATE
    text_bytes = text.encode("utf-8")

    # Phoneme events mark starts; each ends where the next starts (or at the end of the audio).
    starts = [(min(s / src_rate, duration), sym) for t, s, _, _, sym in events if t == _EV_PHONEME]
    phonemes: list[Phoneme] = []
    for i, (st, sym) in enumerate(starts):
        en = starts[i + 1][0] if i + 1 < len(starts) else duration
        if en > st:
            phonemes.append(Phoneme(sym, st, en))
    words: list[Word] = []
    for t, s, pos, length, _ in events:
        if t == _EV_WORD:
            # text_position is a 1-based character index into the UTF-8 input.
            span = text_bytes[max(pos - 1, 0) : max(pos - 1, 0) + length].decode("utf-8", "replace")
            if span.strip():  # espeak-ng sometimes closes a clause with an empty word event
                words.append(Word(span, min(s / src_rate, duration)))
    return Utterance(audio, tuple(phonemes), tuple(words), text)


__all__ = ["synthesize", "Utterance", "Word", "TtsError", "VoiceNotFoundError"]
