"""``avatar-agent bench``: measure the live pipeline and print figures (no pass/fail).

Figures (embedded profile unless the config says otherwise):
* real-time run of ``--seconds``: sustained fps, dropped-frame %, CPU use (cores), RSS after
  warm-up and its growth, speech onset → first mouth-open frame on the output;
* offline render: end-to-end real-time factor;
* optional ``--simulate-hours``: a session on the fake clock with a trivial renderer — frame count
  exactness, A/V offset drift, memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import resource
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import numpy as np

from .audio.frames import paced
from .audio.resample import frame_audio
from .clock import Clock, FakeClock, SystemClock
from .config import Config
from .metrics import rss_bytes
from .types import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, Avatar, Phoneme, Profile, VideoFrame

_TEXT = ("Hello there. I am your avatar, and I speak whatever you say. "
         "Let us measure how fast the pipeline runs on this machine.")


class LoopSource:
    """Speech followed by silence, repeated forever, paced by a clock like a microphone."""

    def __init__(self, audio: np.ndarray, phonemes: tuple[Phoneme, ...], clock: Clock,
                 silence_s: float = 2.0, limit_s: float | None = None) -> None:
        pad = np.zeros(int(silence_s * SAMPLE_RATE), np.float32)
        self.period = np.concatenate([pad, audio, pad])
        self.period = self.period[: len(self.period) // FRAME_SAMPLES * FRAME_SAMPLES]
        self.onset_in_period = len(pad)
        self.phonemes = tuple(Phoneme(p.symbol, p.start + silence_s, p.end + silence_s)
                              for p in phonemes)
        self.clock = clock
        self.limit = None if limit_s is None else int(limit_s * SAMPLE_RATE)
        self._closed = False

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """20 ms frames of the looped recording, paced by the clock, until closed or ``limit_s`` is reached."""
        async with contextlib.aclosing(paced(self._looped(), self.clock)) as frames:
            async for f in frames:
                yield f

    def _looped(self) -> Iterator[AudioFrame]:
        """The recording's frames period after period (framed lazily, one period at a time)."""
        n = 0
        while True:
            base = n / SAMPLE_RATE
            shifted = [Phoneme(p.symbol, p.start + base, p.end + base) for p in self.phonemes]
            for f in frame_audio(self.period, shifted, start=n):
                if self._closed or (self.limit is not None and f.index >= self.limit):
                    return
                yield f
            n += len(self.period)

    async def close(self) -> None:
        """Stop the frame stream after the frame in flight."""
        self._closed = True


class _Recorder:
    """A sink that records send times (and keeps nothing else)."""

    name = "bench"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.times: list[float] = []
        self.speech: list[bool] = []

    async def start(self, width: int, height: int, fps: int) -> None:
        pass

    async def send(self, frame: VideoFrame) -> None:
        self.times.append(self.clock.now())
        self.speech.append(frame.speech)

    async def close(self) -> None:
        pass


class _MotionTap:
    """Wraps a motion generator and keeps each frame's lip opening by frame index."""

    def __init__(self, inner, fps: int) -> None:
        self.inner = inner
        self.profile = inner.profile
        self.fps = fps
        self.open: dict[int, float] = {}
        self._kp: np.ndarray | None = None
        self._next = 0

    @property
    def min_hop_ms(self) -> int:
        return self.inner.min_hop_ms

    @property
    def rest_pose(self) -> np.ndarray:
        return self.inner.rest_pose

    def set_emotion(self, emotion: int, intensity: float = 1.0) -> None:
        self.inner.set_emotion(emotion, intensity)

    def reset(self) -> None:
        self.inner.reset()

    def prepare(self, avatar: Avatar) -> None:
        self._kp = avatar.kp_canonical
        self.inner.prepare(avatar)

    def _record(self, first: int, m: np.ndarray) -> None:
        from .motion.space import lip_opening

        assert self._kp is not None
        for i, v in enumerate(lip_opening(m, self._kp)):
            self.open[first + i] = float(v)

    def generate(self, chunk, prev, emotion=8, intensity=1.0):
        m = self.inner.generate(chunk, prev, emotion, intensity)
        self._record(chunk.start // (SAMPLE_RATE // self.fps), m)
        return m

    def idle(self, n, prev, t0):
        m = self.inner.idle(n, prev, t0)
        self._record(int(round(t0 * self.fps)), m)
        return m


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def bench_realtime(cfg: Config, seconds: float, mic: bool = False) -> dict[str, float]:
    """Run the agent for ``seconds`` on the real clock with a looping speech source (``mic``:
    without its phonemes, as a microphone gives speech)."""
    from .agent import Agent
    from .audio.tts import synthesize
    from .wiring import make_motion, make_phones, make_renderer, make_vad

    clock = SystemClock()
    utt = synthesize(_TEXT, voice=cfg.audio.voice, rate_wpm=cfg.audio.tts_rate)
    source = LoopSource(utt.audio, () if mic else utt.phonemes, clock)
    rec = _Recorder(clock)
    motion = _MotionTap(make_motion(cfg), cfg.player.fps)
    agent = Agent(cfg, source=source, vad=make_vad(cfg), motion=motion,
                  renderer=make_renderer(cfg), sinks=[rec], clock=clock,
                  phones=make_phones(cfg, shared=False))
    await agent.warm_up()
    rss0 = rss_bytes()
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(2.0)                         # settle: warm caches, first chunks
    cpu0, t0, n0 = _cpu_s(), time.monotonic(), agent.player.stats.delivered
    rss_start = rss_bytes()
    await asyncio.sleep(seconds)
    cpu1, t1, n1 = _cpu_s(), time.monotonic(), agent.player.stats.delivered
    rss_end = rss_bytes()
    st = agent.player.stats
    agent.stop()
    await task
    fps = (n1 - n0) / (t1 - t0)
    dropped = st.underruns + st.late_dropped + st.overflow_dropped
    # Speech onset → first mouth-open frame on the output, per period of the loop.
    spf = SAMPLE_RATE // cfg.player.fps
    plen = len(source.period)
    env = np.abs(source.period)
    first_voiced = int(np.argmax(env > 0.05 * env.max()))
    kp = motion._kp
    assert kp is not None
    n_sent = len(rec.speech)
    opens = {i: v for i, v in motion.open.items() if i < n_sent}   # frames that went out
    silent = [v for i, v in opens.items() if not rec.speech[i]]
    closed_level = float(np.median(silent)) if silent else 0.0
    thresh = closed_level + 0.25 * (max(opens.values()) - closed_level)
    lat = []
    for p in range(int(len(rec.times) * spf // plen) + 1):
        onset = p * plen + first_voiced
        k0 = onset // spf
        ks = [k for k in range(k0, min(k0 + 50, len(rec.times))) if opens.get(k, 0.0) > thresh]
        if ks:
            lat.append(rec.times[ks[0]] - agent.timeline.time_of(onset))
    return {
        "seconds": t1 - t0,
        "fps": fps,
        "dropped_pct": 100.0 * dropped / max(1, st.delivered),
        "underruns": float(st.underruns),
        "late_dropped": float(st.late_dropped),
        "cpu_cores": (cpu1 - cpu0) / (t1 - t0),
        "rss_after_warmup_mb": rss0 / 1e6,
        "rss_growth_mb": (rss_end - rss_start) / 1e6,
        "onset_to_mouth_open_ms": 1000 * float(np.median(lat)) if lat else float("nan"),
        "onsets_measured": float(len(lat)),
    }


async def bench_offline(cfg: Config) -> dict[str, float]:
    """Offline render of a sentence: end-to-end real-time factor."""
    from .offline import render_to_file

    with tempfile.TemporaryDirectory() as d:
        stats = await render_to_file(cfg, cfg.avatar_path(), Path(d) / "bench.mp4", text=_TEXT)
    return {k: stats[k] for k in ("rtf", "rtf_after_warmup", "seconds", "wall_s", "warmup_s")}


class _FlatRenderer:
    """A renderer that costs nothing: the simulated session measures the pipeline, not pixels."""

    profile: Profile = "embedded"

    def __init__(self, inner_prepare) -> None:
        self._prepare = inner_prepare
        self.size = 64
        self._img = np.zeros((64, 64, 3), np.uint8)

    def prepare(self, image: np.ndarray) -> Avatar:
        return self._prepare(image)

    def render(self, avatar: Avatar, motion: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._img, (len(motion), 64, 64, 3))


async def simulate_session(cfg: Config, hours: float) -> dict[str, float]:
    """A long session on the fake clock: frames, A/V offset drift, memory."""
    from .agent import Agent
    from .audio.tts import synthesize
    from .wiring import make_motion, make_renderer, make_vad

    clock = FakeClock()
    utt = synthesize(_TEXT, voice=cfg.audio.voice, rate_wpm=cfg.audio.tts_rate)
    source = LoopSource(utt.audio, utt.phonemes, clock, silence_s=5.0, limit_s=hours * 3600)
    offsets: list[float] = []
    rss: list[float] = []
    count = {"n": 0}

    class Probe:
        name = "probe"

        async def start(self, *a) -> None:
            pass

        async def send(self, frame: VideoFrame) -> None:
            count["n"] += 1
            if frame.index % (cfg.player.fps * 60) == 0:
                offsets.append(clock.now() - agent.timeline.time_of(frame.index * spf))
                rss.append(rss_bytes() / 1e6)

        async def close(self) -> None:
            pass

    spf = SAMPLE_RATE // cfg.player.fps
    real = make_renderer(cfg)
    cfg = dataclasses.replace(cfg, service=dataclasses.replace(cfg.service, drain_s=0.0))
    agent = Agent(cfg, source=source, vad=make_vad(cfg), motion=make_motion(cfg),
                  renderer=_FlatRenderer(real.prepare), sinks=[Probe()], clock=clock)
    t = time.perf_counter()
    await agent.run()
    expected = int(round(hours * 3600 * cfg.player.fps))
    off = np.array(offsets)
    return {
        "hours": hours,
        "frames": float(count["n"]),
        "expected_frames": float(expected),
        "av_offset_drift_ms": 1000 * float(off.max() - off.min()) if len(off) else 0.0,
        "rss_after_5min_mb": rss[min(5, len(rss) - 1)] if rss else 0.0,
        "rss_end_mb": rss[-1] if rss else 0.0,
        "underruns": float(agent.player.stats.underruns),
        "wall_s": time.perf_counter() - t,
    }


def run_bench(cfg: Config, seconds: float = 60.0, simulate_hours: float = 0.0,
              mic: bool = False) -> int:
    """Run the benchmarks and print the figures (``mic``: the real-time run's speech without
    phonemes)."""
    from .config import chunker_params
    from .wiring import motion_min_hop_ms

    generator = cfg.motion.generator
    if generator == "auto":
        from .wiring import uses_embedded_moda

        generator = "moda" if uses_embedded_moda(cfg) or cfg.avatar.profile == "official" else "procedural"
    hop = chunker_params(cfg, motion_min_hop_ms(cfg)).hop_ms
    print(f"avatar-agent bench: profile {cfg.avatar.profile}, motion {generator}, "
          f"{cfg.render.size}×{cfg.render.size}, {cfg.player.fps} fps, hop {hop} ms, "
          f"latency {cfg.player.latency_ms} ms")
    off = asyncio.run(bench_offline(cfg))
    print(f"offline render: {off['seconds']:.1f} s of video in {off['wall_s']:.1f} s "
          f"→ real-time factor {off['rtf']:.3f} ({off['rtf_after_warmup']:.3f} after the "
          f"{off['warmup_s']:.2f} s portrait warm-up)")
    if seconds > 0:
        rt = asyncio.run(bench_realtime(cfg, seconds, mic))
        if mic:
            from .wiring import make_phones

            on = make_phones(cfg, shared=False) is not None
            print(f"speech without phonemes (as from a microphone); live phone recognition "
                  f"{'on' if on else 'off'} (audio.recognizer = {cfg.audio.recognizer})")
        print(f"real time, {rt['seconds']:.0f} s: {rt['fps']:.2f} fps sustained, "
              f"{rt['dropped_pct']:.2f} % dropped ({rt['underruns']:.0f} underruns, "
              f"{rt['late_dropped']:.0f} late)")
        print(f"  CPU {rt['cpu_cores']:.2f} cores; RSS after warm-up {rt['rss_after_warmup_mb']:.0f} MB, "
              f"growth {rt['rss_growth_mb']:+.1f} MB")
        print(f"  speech onset → first mouth-open frame: {rt['onset_to_mouth_open_ms']:.0f} ms "
              f"(median of {rt['onsets_measured']:.0f} onsets)")
    if simulate_hours > 0:
        sim = asyncio.run(simulate_session(cfg, simulate_hours))
        print(f"simulated {sim['hours']:g} h on the fake clock in {sim['wall_s']:.0f} s: "
              f"{sim['frames']:.0f} frames (expected {sim['expected_frames']:.0f}), "
              f"A/V offset drift {sim['av_offset_drift_ms']:.1f} ms, RSS {sim['rss_after_5min_mb']:.0f} → "
              f"{sim['rss_end_mb']:.0f} MB, underruns {sim['underruns']:.0f}")
    return 0
