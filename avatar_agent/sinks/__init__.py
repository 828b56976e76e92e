"""Sinks: where the player's frames go (virtual camera, WebRTC, mp4, virtual microphone)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..types import Sink

log = logging.getLogger(__name__)


async def start_all(sinks: Sequence[Sink], width: int, height: int, fps: int) -> list[Sink]:
    """Start every sink; one that cannot start is logged and left out (the others go on).

    Raises RuntimeError when sinks were asked for and none could start: a face nobody can see
    must not look like a running service.
    """
    started = []
    for sink in sinks:
        try:
            await sink.start(width, height, fps)
            started.append(sink)
        except Exception as e:
            log.error("sink %s could not start and is disabled: %s", sink.name, e)
    if sinks and not started:
        raise RuntimeError("no output could start (see the errors above): fix one sink or "
                           "enable another in sinks.enabled")
    return started


async def close_all(sinks: Sequence[Sink], source: Any) -> None:
    """Finalise every sink (an mp4 gets its trailer), then release the audio source."""
    for sink in sinks:
        try:
            await sink.close()
        except Exception as e:
            log.error("closing sink %s failed: %s", sink.name, e)
    try:
        await source.close()
    except Exception as e:
        log.error("closing the audio source failed: %s", e)
