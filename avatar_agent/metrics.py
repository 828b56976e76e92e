"""Prometheus metrics of one agent (its own registry, so several agents can live in one process)."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


def rss_bytes() -> int:
    """Resident set size of this process in bytes (from /proc; falls back to the peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Metrics:
    """All metric objects, registered in a private registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.stage_seconds = Histogram(
            "avatar_stage_seconds", "Time spent per pipeline stage per job",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.frames = Counter("avatar_frames_total", "Frames by outcome",
                              ["outcome"], registry=r)
        self.av_offset = Gauge("avatar_av_offset_seconds",
                               "Frame send time minus its audio capture time (= latency)", registry=r)
        self.clock_lateness = Gauge("avatar_clock_lateness_seconds",
                                    "How late the last frame went out after its due time", registry=r)
        self.queue_depth = Gauge("avatar_queue_depth", "Items waiting per queue", ["queue"],
                                 registry=r)
        self.rss = Gauge("avatar_rss_bytes", "Resident memory of the agent process", registry=r)
        self.speaking = Gauge("avatar_speaking", "1 while speech is being animated", registry=r)
        self.rss.set_function(rss_bytes)
        # The per-frame series, bound once: labels() is a locked lookup, and these are counted
        # for every frame of every session on the event loop.
        self.frames_produced = self.frames.labels("produced")
        self.render_seconds = self.stage_seconds.labels("render")
        self._delivered = self.frames.labels("delivered")
        self._speech, self._idle = self.frames.labels("speech"), self.frames.labels("idle")

    def frame_sent(self, speech: bool, lateness: float, av_offset: float) -> None:
        """Count one delivered frame (speech or idle), its lateness and its A/V offset."""
        self._delivered.inc()
        (self._speech if speech else self._idle).inc()
        self.clock_lateness.set(lateness)
        self.av_offset.set(av_offset)

    def render(self) -> bytes:
        """The text exposition format for GET /metrics."""
        return generate_latest(self.registry)
