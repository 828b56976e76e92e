"""Session events for listeners (the HTTP event streams, logs, integrations).

Speech events are emitted when the frame that carries the boundary is *played* (sent to the sinks),
not when the audio arrives: ``speech_finished`` means the listener has heard the end.

Events (``kind``: data):
    speech_started:   {utterance, frame}
    speech_finished:  {utterance, frame, interrupted, played_s}
    avatar_swapped:   {path, frame}
    session_ended:    {reason}
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Protocol

from .chunker import SpeechEnded, SpeechStarted
from .types import SAMPLE_RATE, SegmentEnded, SegmentMark, SegmentStarted, SpeechSource

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]


class EventBus:
    """Synchronous fan-out to listeners; a failing listener is logged and skipped."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(kind, data)`` on every event; returns the unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def emit(self, kind: str, **data: Any) -> None:
        """Send one event to every listener (on the caller's thread: the event loop)."""
        log.info("%s %s", kind, data)
        for cb in list(self._listeners):
            try:
                cb(kind, data)
            except Exception:
                log.exception("event listener failed")

    def emit_mark(self, mark: SegmentMark, frame: int) -> None:
        """The event for a segment mark reached in ``frame``."""
        if isinstance(mark, SegmentEnded):
            self.emit("speech_finished", utterance=mark.utterance, frame=frame,
                      interrupted=mark.interrupted, played_s=round(mark.played_s, 3))
        else:
            self.emit("speech_started", utterance=mark.utterance, frame=frame)


class _Marks(Protocol):
    """Where marks go (the player)."""

    def mark(self, index: int, mark: SegmentMark) -> None: ...


class SegmentMarker:
    """Puts segment boundaries on the frames that play them.

    A speech-queue source knows its utterances exactly (its events mark them); for any other
    source (a microphone) the VAD's decisions do.  An interrupted segment ends in the first idle
    frame, with the seconds that did play.
    """

    def __init__(self, player: _Marks, spf: int, source: object) -> None:
        self.player, self.spf = player, spf
        self.starts: dict[int, int] = {}              # utterance → its first sample
        self.cut = 0                                  # where interrupted segments end (frame)
        self.loop: asyncio.AbstractEventLoop | None = None   # set by run(): marks go there
        self.from_source = isinstance(source, SpeechSource)
        self._vad_open: tuple[int, int] | None = None  # VAD segment playing: (id, onset)
        if isinstance(source, SpeechSource):
            source.subscribe(self._on_event)

    def on_chunker(self, item: SpeechStarted | SpeechEnded) -> None:
        """A VAD decision (ignored when the source marks its own utterances)."""
        if self.from_source:
            return
        if isinstance(item, SpeechStarted):
            self._vad_open = (item.utterance, item.onset)
            self.player.mark(item.onset // self.spf, SegmentStarted(item.utterance))
        elif self._vad_open is not None:              # (an interrupted one has ended already)
            played = (item.offset - self._vad_open[1]) / SAMPLE_RATE
            self._vad_open = None
            self.player.mark(max(item.offset - 1, 0) // self.spf,
                             SegmentEnded(item.utterance, False, played))

    def interrupt(self, frame: int) -> None:
        """Segments cut now end in ``frame`` (the source reports its own; the VAD's ends here)."""
        self.cut = frame
        if self._vad_open is not None:
            utt, onset = self._vad_open
            self._vad_open = None
            self.player.mark(frame, SegmentEnded(utt, True,
                                                 max(0, frame * self.spf - onset) / SAMPLE_RATE))

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        # Synthesis errors arrive from the TTS thread: marks are placed on the loop thread.
        loop = self.loop
        if loop is not None and not _on_loop(loop):
            loop.call_soon_threadsafe(self._place, kind, data)
        else:
            self._place(kind, data)

    def _place(self, kind: str, data: dict[str, Any]) -> None:
        utt, sample, spf = data["utterance"], data["sample"], self.spf
        if kind == "speech_started":
            self.starts[utt] = sample
            self.player.mark(sample // spf, SegmentStarted(utt))
            return
        start = self.starts.pop(utt, None)
        interrupted = bool(data.get("interrupted"))
        if interrupted:                               # ends in the first idle frame
            at = self.cut
            played = 0.0 if start is None else max(0, at * spf - start) / SAMPLE_RATE
        else:
            at = max(sample - 1, 0) // spf
            played = 0.0 if start is None else (sample - start) / SAMPLE_RATE
        self.player.mark(at, SegmentEnded(utt, interrupted, played))


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
