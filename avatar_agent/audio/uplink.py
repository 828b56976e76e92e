"""A speaking peer's WebRTC audio → pushes into the speech source, one utterance at a time.

The WebRTC sink only receives: it reads the speaking peer's track and hands each decoded frame to
an :class:`Uplink` (built by the wiring, e.g. :func:`avatar_agent.server.app.make_app`).  The
uplink converts it to the pipeline's 16 kHz mono float32 and calls ``push(samples, final)`` —
normally a wrapper around :meth:`SpeechSource.push <avatar_agent.types.SpeechSource.push>` (or the
session's ``push_audio``), so the peer's voice is spoken like any pushed PCM.

A WebRTC track never stops: between sentences it carries silence.  Pushed as one endless stream,
that silence would keep the speech queue's stream open and block ``say()`` and other pushes
forever, so the uplink is cut into utterances: a loud block opens one (with the block before it as
pre-roll, so no onset is clipped), and ``hangover_s`` of silence ends it with
``push(empty, final=True)``.  Silence inside an utterance is passed on (the VAD and the queue judge
it); silence between utterances is not.

Why an energy gate and not :class:`~avatar_agent.audio.vad.WebRtcVad`: this gate decides only
where a *stream* ends, not what is speech — the pipeline's VAD downstream still judges every frame
of what is pushed.  A speech detector here would drop audio the peer meant to be heard (sung or
synthetic voices, tones a client sends to test the path) before that VAD ever saw it, and its
~100 ms overhang would add to the hangover.  Loudness is the right question for "is the peer
still sending anything", and it costs nothing per block.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import numpy as np

from avatar_agent.audio.resample import StreamResampler
from avatar_agent.types import SAMPLE_RATE

log = logging.getLogger(__name__)

UplinkCallback = Callable[[np.ndarray, bool], Any]
"""``push(samples, final)``: samples are 16 kHz mono float32; may return an awaitable.  Raising
ValueError means "this agent takes no pushed audio" (the peer's audio is then ignored); any other
exception loses that block only (e.g. the speech queue is full)."""

UPLINK_GATE_RMS = 0.003
"""A 20 ms uplink block louder than this (≈ -50 dBFS) opens or extends an utterance."""
UPLINK_HANGOVER_S = 0.4
"""Silence after which the uplink's utterance is ended (``final=True``)."""


class Uplink:
    """Decoded frames of the speaking peer → ``push(samples, final)`` calls, in utterances.

    One peer speaks at a time: the sink calls :meth:`begin` when a peer starts sending,
    :meth:`push_frame` per decoded frame, and :meth:`finish` when it leaves.

    Args:
        push: where the 16 kHz blocks go (see :data:`UplinkCallback`).
        gate_rms: RMS above which a block counts as loud.
        hangover_s: silence that ends an utterance.
        name: for logs.

    Attributes:
        frames: decoded frames received from the current peer.
        samples: 16 kHz samples handed to ``push`` for it.
        dropped: blocks ``push`` refused (e.g. the speech queue was full).
        utterances: utterances it opened.
    """

    def __init__(self, push: UplinkCallback, *, gate_rms: float = UPLINK_GATE_RMS,
                 hangover_s: float = UPLINK_HANGOVER_S, name: str = "uplink") -> None:
        if gate_rms < 0:
            raise ValueError(f"uplink gate_rms={gate_rms} must be ≥ 0")
        if hangover_s <= 0:
            raise ValueError(f"uplink hangover_s={hangover_s} must be > 0")
        self.push = push
        self.gate_rms = gate_rms
        self.hangover = int(hangover_s * SAMPLE_RATE)
        self.name = name
        self.begin(name)

    def begin(self, name: str) -> None:
        """A new peer speaks: forget the previous one (its state and counters)."""
        self.name = name
        self.frames = 0
        self.samples = 0
        self.dropped = 0
        self.utterances = 0
        self.finished = False
        self._open = False        # an utterance is being pushed
        self._quiet = 0           # 16 kHz samples of silence since the last loud block
        self._pre: np.ndarray | None = None
        self._fmt: tuple[int, int] | None = None
        self._rs: StreamResampler | None = None
        self._disabled = False

    def stats(self) -> dict[str, int]:
        """The current peer's counters."""
        return {"frames": self.frames, "samples": self.samples, "dropped": self.dropped,
                "utterances": self.utterances}

    async def push_frame(self, frame: Any) -> None:
        """One decoded ``av.AudioFrame`` of the peer (any rate, layout and sample format)."""
        self.frames += 1
        await self.feed(self._convert(frame))

    def _convert(self, frame: Any) -> np.ndarray:
        """A decoded frame → float32 16 kHz mono samples (a few may lag in soxr)."""
        fmt = (int(frame.sample_rate), len(frame.layout.channels))
        out = []
        if fmt != self._fmt or self._rs is None:  # first frame, or the peer renegotiated
            if self._rs is not None:
                out.append(self._rs.flush())
            self._rs = StreamResampler(fmt[0], fmt[1], name=f"{self.name} uplink")
            self._fmt = fmt
        x = frame.to_ndarray()  # packed: [1, n * ch]; planar: [ch, n]
        x = x.T.reshape(-1) if frame.format.is_planar else x.reshape(-1)
        out.append(self._rs.process(x))
        return np.concatenate(out) if len(out) > 1 else out[0]

    async def feed(self, y: np.ndarray) -> None:
        """Gate one 16 kHz block into utterances (see the module docstring)."""
        if not y.size:
            return
        loud = float(np.sqrt(np.mean(y * y))) > self.gate_rms
        if loud:
            if not self._open:
                self._open = True
                self.utterances += 1
                if self._pre is not None:
                    await self._deliver(self._pre, False)
            self._pre = None
            self._quiet = 0
            await self._deliver(y, False)
        elif self._open:
            await self._deliver(y, False)
            self._quiet += y.size
            if self._quiet >= self.hangover:
                self._open = False
                await self._deliver(np.zeros(0, np.float32), True)
        else:
            self._pre = y

    async def _deliver(self, samples: np.ndarray, final: bool) -> None:
        if self._disabled or (not final and not samples.size):
            return
        try:
            r = self.push(samples, final)
            if inspect.isawaitable(r):
                await r
            self.samples += int(samples.size)
        except ValueError as e:  # the agent cannot take pushed audio at all (e.g. a mic source)
            self._disabled = True
            log.error("%s: uplink audio refused, ignoring this peer's audio: %s", self.name, e)
        except Exception as e:  # e.g. the speech queue is full: this block is lost, go on
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 50 == 0:
                log.warning("%s: uplink audio block dropped (%d so far): %s", self.name,
                            self.dropped, e)

    async def finish(self) -> None:
        """The peer left: end an open utterance with the resampler's tail (``final=True``)."""
        if self.finished:
            return
        self.finished = True
        if self._open:
            self._open = False
            tail = self._rs.flush() if self._rs is not None else np.zeros(0, np.float32)
            await self._deliver(tail, True)


__all__ = ["Uplink", "UplinkCallback", "UPLINK_GATE_RMS", "UPLINK_HANGOVER_S"]
