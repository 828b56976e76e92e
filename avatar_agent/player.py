"""The player: the master clock of the output.

Frame i is due at ``timeline.time_of(i · spf) + latency`` where spf = samples per frame: the time its
audio was captured, plus a fixed latency that covers hop, lookahead and compute.  Due times are
computed from the frame index, never accumulated from sleeps, so the schedule cannot drift; and the
audio a frame carries is cut from the same sample timeline, so audio and video are in sync by
construction.  When a frame's image is not ready at its due time the last image goes out again
(counted as an underrun); images that arrive after their due time are dropped and counted.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .clock import Clock
from .types import SAMPLE_RATE, SegmentEnded, SegmentMark, Sink, VideoFrame

log = logging.getLogger(__name__)


class AudioTimeline:
    """Maps source sample indices to clock time and keeps recent audio for the player.

    The sound card's clock and the monotonic clock drift apart (≈0.01 % is common: a third of a
    second per hour), so the mapping is re-anchored slowly to the audio clock: arrival jitter only
    ever makes audio late, so the *minimum* offset over a window estimates the true drift.
    """

    def __init__(self, clock: Clock, keep_s: float = 30.0, max_step_s: float = 0.002,
                 window_s: float = 5.0) -> None:
        self._clock = clock
        self._ref_n: int | None = None
        self._ref_t = 0.0
        self._keep = int(keep_s * SAMPLE_RATE)
        self._ring = np.zeros(self._keep, dtype=np.float32)
        self._lo = 0                              # oldest sample index still in the ring
        self.end = 0                              # one past the last sample received
        self._max_step = max_step_s
        self._window = int(window_s * SAMPLE_RATE)
        self._win_min = float("inf")
        self._win_start = 0
        self.drift_s = 0.0                        # total correction applied so far

    @property
    def started(self) -> bool:
        """True once the first audio arrived (the timeline has an anchor)."""
        return self._ref_n is not None

    def time_of(self, n: int) -> float:
        """Clock time at which sample ``n`` was (or will be) captured."""
        if self._ref_n is None:
            raise RuntimeError("timeline not started: no audio received yet")
        return self._ref_t + (n - self._ref_n) / SAMPLE_RATE

    def append(self, index: int, samples: np.ndarray, arrival: float | None = None) -> None:
        """Record audio that arrived now; ``index`` is its first sample's index."""
        t = self._clock.now() if arrival is None else arrival
        end = index + len(samples)
        if self._ref_n is None:
            # The block's last sample was captured just before it arrived.
            self._ref_n, self._ref_t = end, t
            self._win_start = end
            self._lo = index
        else:
            self._track_drift(end, t)
        if index > self.end:
            # A gap (a dropped device block): those samples read back as silence.
            self._write(self.end, np.zeros(index - self.end, np.float32))
        self._write(index, np.asarray(samples, np.float32))
        self.end = max(self.end, end)
        self._lo = max(self._lo, self.end - self._keep)

    def _write(self, start: int, x: np.ndarray) -> None:
        if len(x) > self._keep:
            start, x = start + len(x) - self._keep, x[-self._keep:]
        pos = start % self._keep
        first = min(len(x), self._keep - pos)
        self._ring[pos:pos + first] = x[:first]
        self._ring[:len(x) - first] = x[first:]

    def _track_drift(self, end: int, t: float) -> None:
        offset = t - self.time_of(end)            # > 0: audio arrived later than the model says
        self._win_min = min(self._win_min, offset)
        if end - self._win_start >= self._window:
            step = float(np.clip(self._win_min, -self._max_step, self._max_step))
            self._ref_t += step
            self.drift_s += step
            self._win_min = float("inf")
            self._win_start = end

    def truncate(self, end: int) -> None:
        """Forget received audio from ``end`` on (a rewind: it will be received again)."""
        self.end = min(self.end, max(end, self._lo))

    def silence(self, start: int, end: int) -> None:
        """Zero received audio in [start, end) (an interruption mutes what was not played yet)."""
        lo, hi = max(start, self._lo), min(end, self.end)
        if hi > lo:
            self._ring[np.arange(lo, hi) % self._keep] = 0.0

    def slice(self, start: int, n: int) -> np.ndarray:
        """Samples [start, start + n); silence where nothing was received (yet or any more)."""
        out = np.zeros(n, dtype=np.float32)
        lo, hi = max(start, self._lo), min(start + n, self.end)
        if hi > lo:
            idx = np.arange(lo, hi) % self._keep
            out[lo - start:hi - start] = self._ring[idx]
        return out


@dataclass
class PlayerStats:
    """Counters the player keeps (also exported as metrics)."""

    delivered: int = 0
    """Frames sent to the sinks."""
    speech: int = 0
    """Delivered frames that animate speech."""
    idle: int = 0
    """Delivered frames that animate silence."""
    underruns: int = 0
    """Due frames with no image ready (the previous image was repeated)."""
    late_dropped: int = 0
    """Images that arrived after their due time."""
    overflow_dropped: int = 0
    """Images dropped because the buffer was full."""
    sink_errors: int = 0
    """Failed sink sends (the sink is skipped for that frame)."""
    lateness_max_s: float = 0.0
    """Worst wake-up lateness of the clock task."""
    underrun_streak: int = 0
    """Consecutive due frames with no new image (the face is frozen meanwhile)."""


class Player:
    """Sends one frame per tick to every sink, each with its exact audio slice.

    Args:
        fps: output frame rate.
        clock: the injected clock.
        timeline: the audio timeline (sample index → capture time, recent audio).
        latency_s: capture → due time.
        sinks: where frames go.
        capacity: rendered frames kept ahead of the clock (overflow: drop the oldest, counted).
    """

    def __init__(self, fps: int, clock: Clock, timeline: AudioTimeline, latency_s: float,
                 sinks: Sequence[Sink] = (), capacity: int = 50) -> None:
        if SAMPLE_RATE % fps:
            raise ValueError(f"fps {fps}: 16000 must be divisible by it (e.g. 25, 20, 32, 40, 50)")
        self.fps = fps
        self.spf = SAMPLE_RATE // fps
        self.clock = clock
        self.timeline = timeline
        self.latency_s = latency_s
        self.sinks = list(sinks)
        self.capacity = capacity
        self.stats = PlayerStats()
        self.next_index = 0
        self._ready: dict[int, tuple[np.ndarray, bool]] = {}
        self._order: collections.deque[int] = collections.deque()
        self._last_image: np.ndarray | None = None
        self._fallback: tuple[int, np.ndarray] | None = None   # (index, image) kept by clear()
        self._marks: dict[int, list[SegmentMark]] = {}
        self._failed: dict[str, int] = collections.Counter()

    def due(self, index: int) -> float:
        """Clock time at which frame ``index`` goes out."""
        return self.timeline.time_of(index * self.spf) + self.latency_s

    def set_idle_image(self, image: np.ndarray) -> None:
        """The image to show before anything is rendered (e.g. the rest pose)."""
        self._last_image = image

    def push(self, index: int, image: np.ndarray, speech: bool) -> bool:
        """Offer a rendered image for frame ``index``; False if it is already too late."""
        if index < self.next_index:
            self.stats.late_dropped += 1
            return False
        if index not in self._ready:
            self._order.append(index)
        self._ready[index] = (image, speech)
        while len(self._ready) > self.capacity:
            old = self._order.popleft()
            if self._ready.pop(old, None) is not None:
                self.stats.overflow_dropped += 1
        return True

    def mark(self, index: int, mark: SegmentMark) -> None:
        """Attach a segment boundary to frame ``index`` (a past index: the next frame)."""
        self._marks.setdefault(max(index, self.next_index), []).append(mark)

    def clear(self, index: int) -> int:
        """Drop queued images for frames ≥ index (interruption); returns how many.

        Segment marks from ``index`` on were never heard: starts are dropped, and ends become
        interrupted ends in frame ``index`` (with the seconds that did play).
        """
        for j in sorted(k for k in self._marks if k >= index):
            for m in self._marks.pop(j):
                if isinstance(m, SegmentEnded) and not m.interrupted:
                    m = SegmentEnded(m.utterance, True,
                                     max(0.0, m.played_s - (j + 1 - index) / self.fps))
                if isinstance(m, SegmentEnded):
                    self._marks.setdefault(index, []).append(m)
        gone = [i for i in self._ready if i >= index]
        # Frame `index` may be due before its replacement can be rendered (an interruption
        # clears from the very next frame): keep its image as a fallback, shown silent, so the
        # viewer gets a fresh frame rather than a repeated one; a re-rendered image replaces it.
        kept = self._ready.get(index)
        self._fallback = (index, kept[0]) if kept is not None else None
        for i in gone:
            del self._ready[i]
        self._order = collections.deque(i for i in self._order if i in self._ready)
        return len(gone)

    def is_late(self, index: int) -> bool:
        """True if frame ``index`` is already due (rendering it would be wasted work)."""
        return index < self.next_index or self.clock.now() > self.due(index)

    def buffered(self) -> int:
        """Images waiting for their due time."""
        return len(self._ready)

    async def tick(self) -> tuple[VideoFrame, float]:
        """Wait for the next frame's due time and send it; returns the frame and its lateness."""
        i = self.next_index
        due = self.due(i)
        await self.clock.sleep_until(due)
        lateness = self.clock.now() - due
        self.stats.lateness_max_s = max(self.stats.lateness_max_s, lateness)
        entry = self._ready.pop(i, None)
        if self._fallback is not None and self._fallback[0] <= i:
            if entry is None and self._fallback[0] == i:
                entry = (self._fallback[1], False)
            self._fallback = None
        # Images for earlier indices can no longer be shown.
        while self._order and self._order[0] <= i:
            j = self._order.popleft()
            if j != i and self._ready.pop(j, None) is not None:
                self.stats.late_dropped += 1
        if entry is None:
            self.stats.underruns += 1
            self.stats.underrun_streak += 1
            image = self._last_image if self._last_image is not None else _black()
            speech = False
        else:
            image, speech = entry
            self.stats.underrun_streak = 0
        self._last_image = image
        marks = [m for j in sorted(k for k in self._marks if k <= i) for m in self._marks.pop(j)]
        frame = VideoFrame(image=image, index=i, audio=self.timeline.slice(i * self.spf, self.spf),
                           speech=speech, segments=tuple(marks))
        await self._send(frame)
        self.next_index = i + 1
        self.stats.delivered += 1
        if speech:
            self.stats.speech += 1
        else:
            self.stats.idle += 1
        return frame, lateness

    def status_line(self) -> str:
        """Delivered/dropped counters, A/V offset, clock lateness and RSS in one log line."""
        from .metrics import rss_bytes

        st = self.stats
        dropped = st.underruns + st.late_dropped + st.overflow_dropped
        return (f"frames {st.delivered} (speech {st.speech}, idle {st.idle}), dropped {dropped} "
                f"({100 * dropped / max(1, st.delivered):.2f} %), A/V offset "
                f"{self.latency_s * 1000:.0f} ms, clock lateness max "
                f"{st.lateness_max_s * 1000:.1f} ms, buffered {self.buffered()}, "
                f"RSS {rss_bytes() / 1e6:.0f} MB")

    async def _send(self, frame: VideoFrame) -> None:
        for sink in self.sinks:
            try:
                await sink.send(frame)
            except Exception as e:  # one failing sink must never stop the others or the clock
                self.stats.sink_errors += 1
                self._failed[sink.name] += 1
                n = self._failed[sink.name]
                if n == 1 or n % 250 == 0:
                    log.error("sink %s failed (%d times): %s", sink.name, n, e)


def _black() -> np.ndarray:
    return np.zeros((64, 64, 3), np.uint8)
