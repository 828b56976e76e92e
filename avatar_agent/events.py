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

import logging
from typing import Any, Callable

from .types import SegmentEnded, SegmentMark

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
