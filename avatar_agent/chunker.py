"""20 ms frames + VAD decisions → speech/silence chunks covering the whole timeline.

Pure logic: no asyncio, no I/O, no clock.  Time is the source's sample counter.

How it works, in one paragraph: every pushed frame updates a hysteresis state machine (speech starts
after ``min_speech`` of consecutive voiced audio and ends after ``hangover`` of unvoiced audio) that
records *utterance regions* on the video-frame grid — a region begins ``pre_roll`` before the first
voiced sample and ends where the hangover expired.  Independently, the emitter cuts the timeline,
from the first sample on, into chunks of ``hop`` new samples (shorter only where a region begins or
ends), each entirely speech or entirely silence.  A chunk leaves only when (a) its lookahead audio
has arrived and (b) its speech/silence label can no longer change: silence is held back while a
future speech start could still reach into it with its pre-roll.  So every sample is in exactly one
chunk's new audio, every chunk boundary falls on a video frame, and the player can hand each video
frame its exact 40 ms of audio.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Literal, Union

import numpy as np

from avatar_agent.types import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, Phoneme, SpeechChunk

log = logging.getLogger(__name__)

_MS = SAMPLE_RATE // 1000  # samples per millisecond (16)


@dataclass(frozen=True)
class ChunkerParams:
    """Chunking and hysteresis settings (all durations on the 16 kHz source timeline).

    No defaults here: the product's come from the ``[chunker]`` and ``[vad]`` config sections
    (:func:`avatar_agent.config.chunker_params`), so they are written down once."""

    fps: int
    """Video frame rate; every chunk boundary falls on a video frame (16000 / fps samples)."""
    hop_ms: int
    """New audio per streaming chunk; a multiple of the video frame (40 ms at 25 fps)."""
    window_ms: int
    """Longest chunk in offline mode (TTS / files rendered as fast as possible)."""
    left_context_ms: int
    """Already-emitted audio handed along before the new audio (fewer at the timeline start)."""
    lookahead_ms: int
    """Future audio after the new audio; a chunk waits for it (adds directly to latency)."""
    min_speech_ms: int
    """Consecutive voiced audio needed before speech starts (a shorter click is ignored)."""
    pre_roll_ms: int
    """Audio before the first voiced sample that still belongs to the utterance."""
    hangover_ms: int
    """Consecutive unvoiced audio after which speech ends."""
    max_utterance_s: float
    """An utterance longer than this is split (the next one starts at once if speech goes on)."""

    def __post_init__(self) -> None:
        if not isinstance(self.fps, int) or self.fps <= 0 or SAMPLE_RATE % self.fps:
            raise ValueError(f"chunker fps = {self.fps!r}: must divide {SAMPLE_RATE} so a video "
                             "frame is a whole number of samples (e.g. 25, 20, 32, 50)")
        frame_ms = 1000 / self.fps
        for name in ("hop_ms", "window_ms"):
            v = getattr(self, name)
            if v <= 0 or (v * _MS) % self.frame_samples:
                raise ValueError(f"chunker {name} = {v}: must be a positive multiple of the video "
                                 f"frame ({frame_ms:g} ms at {self.fps} fps)")
        if self.window_ms < self.hop_ms:
            raise ValueError(f"chunker window_ms = {self.window_ms} must be ≥ hop_ms = "
                             f"{self.hop_ms}")
        for name in ("left_context_ms", "lookahead_ms", "min_speech_ms", "pre_roll_ms",
                     "hangover_ms"):
            v = getattr(self, name)
            if v < 0:
                raise ValueError(f"chunker {name} = {v}: must be ≥ 0")
        if not self.max_utterance_s * 1000 >= self.hop_ms:
            raise ValueError(f"chunker max_utterance_s = {self.max_utterance_s}: must be at least "
                             f"one hop ({self.hop_ms} ms)")

    @property
    def frame_samples(self) -> int:
        """Samples per video frame (640 at 25 fps)."""
        return SAMPLE_RATE // self.fps


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """An utterance began.

    Attributes:
        utterance: its id (1, 2, ...; the chunks of this utterance carry it).
        onset: first voiced sample found by the VAD.
        start: first sample of the utterance's audio: onset − pre-roll, on the video-frame grid.
        decided_at: timeline position (samples received) when the decision was made.
    """

    utterance: int
    onset: int
    start: int
    decided_at: int


@dataclass(frozen=True, slots=True)
class SpeechEnded:
    """An utterance ended.

    Attributes:
        utterance: its id.
        offset: end of the last voiced audio (the true end of speech, as far as the VAD knows).
        end: end of the utterance's audio (where the hangover expired, on the video-frame grid).
        decided_at: timeline position when the decision was made.
        reason: "silence" (hangover expired), "max_length" (split) or "flush" (end of stream).
    """

    utterance: int
    offset: int
    end: int
    decided_at: int
    reason: Literal["silence", "max_length", "flush"]


ChunkerOutput = Union[SpeechChunk, SpeechStarted, SpeechEnded]


@dataclass
class _Region:
    start: int
    end: int | None  # None while the utterance is open
    utterance: int


class Chunker:
    """Stateful chunker; feed it every frame of one source, in order.

    ``push`` returns events and chunks in the order they became known; an utterance's
    :class:`SpeechStarted` always precedes its first chunk.  Silence chunks carry the id of the
    last utterance that ended (0 before the first).  A chunk's ``phonemes`` are the frames'
    phoneme events overlapping any of its audio (context included; times are absolute, so a
    consumer can tell new from context).  Chunk sizes: one hop while streaming, up to
    ``window_ms`` with ``offline=True``, shorter only where speech begins or ends and at the end.
    """

    def __init__(self, params: ChunkerParams, *, offline: bool = False) -> None:
        """
        Args:
            params: settings (``config.chunker_params(cfg)`` gives the configured ones).
            offline: emit chunks of up to ``window_ms`` new audio instead of one hop (for input that
                arrives faster than real time and is rendered in bulk).
        """
        self.params = p = params
        self.offline = offline
        self._g = p.frame_samples
        self._hop = p.hop_ms * _MS
        self._max_new = (p.window_ms if offline else p.hop_ms) * _MS
        self._left = p.left_context_ms * _MS
        self._look = p.lookahead_ms * _MS
        self._min_speech = p.min_speech_ms * _MS
        self._pre_roll = p.pre_roll_ms * _MS
        self._hangover = p.hangover_ms * _MS
        self._max_utt = int(round(p.max_utterance_s * SAMPLE_RATE))

        self._origin: int | None = None
        self._end = 0  # timeline position: one past the last received sample
        self._emitted = 0  # start of the next chunk's new audio
        self._buf_start = 0
        self._buf = np.zeros(0, np.float32)
        self._pieces: list[np.ndarray] = []
        self._phonemes: list[Phoneme] = []
        self._seen: set[Phoneme] = set()
        self._regions: list[_Region] = []
        self._last_region_end = 0
        self._last_utt = 0  # id of the most recent utterance
        self._silence_utt = 0  # utterance id carried by silence chunks (the last one that ended)
        self._closed = False
        # hysteresis state
        self._in_speech = False
        self._run_start: int | None = None  # start of the current voiced run while silent
        self._unvoiced_since: int | None = None  # start of the current unvoiced run while speaking
        self._last_voiced_end = 0
        self._pending: list[ChunkerOutput] = []

        self.gap_samples = 0
        """Samples of zeros inserted where frame indices jumped (source gaps)."""

    # ------------------------------------------------------------------ public API

    @property
    def latency_ms(self) -> float:
        """Worst-case delay between a sample arriving and the chunk holding it being emitted.

        A chunk waits for its hop and its lookahead.  Silence is also held while a future speech
        start could still claim it as pre-roll: until ``pre_roll`` has passed, plus the time a
        voiced run in progress needs to prove itself (``min_speech`` less the one 20 ms frame that
        is the run's own start).  The first chunk of an utterance waits at most
        ``pre_roll + min_speech`` plus grid rounding, which never exceeds that.  Durations count
        in whole 20 ms frames; when the video frame is not a whole number of audio frames (e.g.
        50 ms at 20 fps) the two grids can be out of step by a few more ms.  Add the VAD's own decision delay
        (``WebRtcVad.decision_delay_ms``) and compute time for the player's total latency.
        """
        p = self.params
        ceil = lambda ms: -(-ms // FRAME_MS) * FRAME_MS  # noqa: E731 - whole 20 ms frames
        run_wait = max(0, ceil(p.min_speech_ms) - FRAME_MS)
        step = (FRAME_SAMPLES - math.gcd(p.frame_samples, FRAME_SAMPLES)) / _MS
        return p.hop_ms + max(ceil(p.lookahead_ms), ceil(p.pre_roll_ms) + run_wait) + step

    @property
    def position(self) -> int:
        """One past the last sample received (timeline samples)."""
        return self._end

    @property
    def emitted(self) -> int:
        """Start of the next chunk's new audio: everything before it has been emitted."""
        return self._emitted

    @property
    def in_speech(self) -> bool:
        """True while an utterance is open."""
        return self._in_speech

    def push(self, frame: AudioFrame, speech: bool) -> list[ChunkerOutput]:
        """Add one frame and its VAD decision; return the events and chunks now ready."""
        self._add(frame, bool(speech))
        return self._drain(final=False)

    def push_many(self, items: Iterable[tuple[AudioFrame, bool]]) -> list[ChunkerOutput]:
        """Add many (frame, speech) pairs at once; same result as pushing them one by one."""
        for frame, speech in items:
            self._add(frame, bool(speech))
        return self._drain(final=False)

    def flush(self) -> list[ChunkerOutput]:
        """End of stream: close an open utterance, zero-pad to the next video frame boundary and
        emit everything left (the last chunks have as much lookahead as exists)."""
        if self._closed:
            return []
        self._closed = True
        if self._origin is None:
            return []
        if self._in_speech:
            self._end_utterance(self._end, "flush")
        self._run_start = None  # a voiced run too short to be speech stays silence
        pad = self._grid_up(self._end) - self._end
        if pad:
            self._pieces.append(np.zeros(pad, np.float32))
            self._end += pad
        return self._drain(final=True)

    # ------------------------------------------------------------------ input side

    def _add(self, frame: AudioFrame, speech: bool) -> None:
        if self._closed:
            raise RuntimeError("Chunker.push after flush(): create a new Chunker for a new stream")
        x = np.asarray(frame.samples, dtype=np.float32).reshape(-1)
        if x.size == 0:
            return
        if self._origin is None:
            self._origin = self._end = self._emitted = self._buf_start = frame.index
            self._last_region_end = frame.index
        if frame.index < self._end:
            raise ValueError(f"audio frame index {frame.index} goes back in time (expected "
                             f"{self._end}); feed each source's frames once, in order")
        if frame.index > self._end:
            gap = frame.index - self._end
            self.gap_samples += gap
            log.warning("chunker: %d samples missing before index %d, filled with silence",
                        gap, frame.index)
            self._advance(np.zeros(gap, np.float32), False)
        for ph in frame.phonemes:
            if ph not in self._seen:
                self._seen.add(ph)
                self._phonemes.append(ph)
        self._advance(x, speech)

    def _advance(self, x: np.ndarray, voiced: bool) -> None:
        a = self._end
        b = a + x.size
        self._pieces.append(x)
        self._end = b
        if not self._in_speech:
            if voiced:
                if self._run_start is None:
                    self._run_start = a
                if b - self._run_start >= self._min_speech:
                    self._start_utterance(self._run_start, b)
            else:
                self._run_start = None
            return
        if voiced:
            self._last_voiced_end = b
            self._unvoiced_since = None
        else:
            if self._unvoiced_since is None:
                self._unvoiced_since = a
            if b - self._unvoiced_since >= self._hangover:
                self._end_utterance(b, "silence")
                return
        region = self._regions[-1]
        if b - region.start >= self._max_utt:
            end = self._end_utterance(b, "max_length")
            if voiced:  # speech goes on: continue seamlessly in a new utterance
                self._start_utterance(end, b, clamp_pre_roll=False)

    def _start_utterance(self, onset: int, decided_at: int, clamp_pre_roll: bool = True) -> None:
        start = self._grid_down(onset - self._pre_roll) if clamp_pre_roll else onset
        start = max(start, self._last_region_end, self._emitted)
        self._last_utt += 1
        self._regions.append(_Region(start, None, self._last_utt))
        self._in_speech = True
        self._run_start = None
        self._unvoiced_since = None
        self._last_voiced_end = decided_at
        self._pending.append(SpeechStarted(self._last_utt, onset, start, decided_at))

    def _end_utterance(self, decided_at: int, reason: Literal["silence", "max_length", "flush"]
                       ) -> int:
        region = self._regions[-1]
        end = max(self._grid_up(decided_at), region.start + self._g)
        region.end = end
        self._last_region_end = end
        self._in_speech = False
        self._run_start = None
        self._unvoiced_since = None
        self._pending.append(SpeechEnded(region.utterance, self._last_voiced_end, end, decided_at,
                                         reason))
        return end

    # ------------------------------------------------------------------ output side

    def _drain(self, final: bool) -> list[ChunkerOutput]:
        out, self._pending = self._pending, []
        if self._origin is None:
            return out
        if self._pieces:
            self._buf = np.concatenate([self._buf, *self._pieces])
            self._pieces = []
        while True:
            chunk = self._next_chunk(final)
            if chunk is None:
                break
            out.append(chunk)
        self._trim()
        return out

    def _next_chunk(self, final: bool) -> SpeechChunk | None:
        p = self._emitted
        if p >= self._end:
            return None
        region = next((r for r in self._regions if r.end is None or r.end > p), None)
        # Audio up to `avail` has its lookahead; `bound` is where the speech label changes.
        avail = self._end if final else self._end - self._look
        is_speech = region is not None and region.start <= p
        if is_speech:
            assert region is not None  # is_speech implies a region (narrows the type)
            bound = region.end
            hi = avail if bound is None else min(avail, bound)
        else:
            bound = region.start if region is not None else None
            if final:
                safe = self._end
            elif region is not None:
                safe = region.start  # everything before a known region start is silence
            else:
                # A voiced run in progress (or one starting right now) may still become speech
                # and claim pre-roll audio: hold that audio back.
                cand = self._run_start if self._run_start is not None else self._end
                safe = max(self._last_region_end, self._grid_down(cand - self._pre_roll))
            hi = min(avail, safe) if bound is None else min(avail, safe, bound)
        hi = self._grid_down(hi)
        if hi - p >= self._max_new:
            n = self._max_new
        elif hi > p and ((bound is not None and hi == bound) or final):
            n = hi - p
        else:
            return None
        utt = region.utterance if is_speech and region is not None else self._silence_utt
        is_final = bool(is_speech and region is not None and region.end is not None and p + n == region.end)
        if is_final and region is not None:
            self._silence_utt = region.utterance
        a0 = max(self._buf_start, p - self._left)
        a1 = min(self._end, p + n + self._look)
        audio = self._buf[a0 - self._buf_start:a1 - self._buf_start].copy()
        t0, t1 = a0 / SAMPLE_RATE, a1 / SAMPLE_RATE
        phon = tuple(ph for ph in self._phonemes if ph.start < t1 and ph.end > t0)
        self._emitted = p + n
        return SpeechChunk(audio=audio, start=p, n_new=n, left=p - a0, right=a1 - (p + n),
                           speech=is_speech, phonemes=phon, utterance=utt, final=is_final)

    def _trim(self) -> None:
        """Drop audio, phonemes and regions no future chunk can reference."""
        keep_from = max(self._buf_start, self._emitted - self._left)
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start:].copy()
            self._buf_start = keep_from
        t_keep = keep_from / SAMPLE_RATE
        if self._phonemes:
            dead = [ph for ph in self._phonemes if ph.end <= t_keep]
            self._phonemes = [ph for ph in self._phonemes if ph.end > t_keep]
            self._seen.difference_update(dead)
        self._regions = [r for r in self._regions if r.end is None or r.end > self._emitted]

    # ------------------------------------------------------------------ grid helpers

    def _grid_down(self, x: int) -> int:
        o = self._origin or 0
        return o + ((x - o) // self._g) * self._g

    def _grid_up(self, x: int) -> int:
        o = self._origin or 0
        return o + math.ceil((x - o) / self._g) * self._g


def chunk_audio(frames: Iterable[AudioFrame], decisions: Iterable[bool],
                params: ChunkerParams, *, offline: bool = True
                ) -> list[ChunkerOutput]:
    """Convenience: run a whole recording through a fresh Chunker (push all, then flush)."""
    ch = Chunker(params, offline=offline)
    out = ch.push_many(zip(frames, decisions, strict=False))
    out += ch.flush()
    return out
