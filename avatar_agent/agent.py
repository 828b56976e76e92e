"""The agent: how audio becomes frames, for one session.  Read top to bottom.

    source ──▶ LISTEN task: timeline + VAD + chunker ──▶ [chunk queue]
               ANIMATE task: motion.generate / motion.idle ─▶ renderer.render  (inference thread)
                             ──▶ player buffer (frame index → image)
               PLAY task (the clock): every 1/fps → the due frame + its audio slice → every sink

* All model work runs on ONE inference thread (shared by every session of a process), earliest
  due frame first.  Control (say, emotion, …) lives in :mod:`avatar_agent.session`.
* The chunker tiles the whole audio timeline: speech hops get lip-sync, silence hops get the idle
  layer, so the player never runs dry in normal operation and never shows a frozen face.
* Every frame's due time = capture time of its audio + latency: A/V sync by construction.
* Queues are bounded: the chunk queue drops the oldest chunk (counted; the player then repeats
  the last image), the player buffer drops the oldest image.
* One TaskGroup supervises the three tasks: if one dies the session ends with its error.
* Interruption is one epoch and one ``clear(frame)`` per stage (:meth:`Agent.clear`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Sequence

import numpy as np

from .chunker import Chunker, SpeechEnded, SpeechStarted
from .clock import Clock, SystemClock
from .config import Config, chunker_params
from .events import EventBus
from .inference import Inference
from .metrics import Metrics
from .motion import space
from .player import AudioTimeline, Player
from .service import Notifier
from .types import (SAMPLE_RATE, AudioSource, Avatar, MotionGenerator, Renderer, SegmentEnded,
                    SegmentStarted, Sink, SpeechChunk, SpeechSource, Vad, VideoFrame,
                    Interruptible)

log = logging.getLogger(__name__)

_COMPUTE_S = 0.06
"""Time a chunk's motion + first frame may take (part of how far a speech source runs ahead)."""

_CHUNK_QUEUE = 64
"""Chunks waiting for the animate task (≈10 s at a 160 ms hop); overflow drops the oldest."""


class _Stopped(Exception):
    """Raised inside the task group to end the session normally."""


class Agent:
    """Runs one session's pipeline: source → chunks → motion → frames → player → sinks."""

    def __init__(self, cfg: Config, *, source: AudioSource, vad: Vad, motion: MotionGenerator,
                 renderer: Renderer, sinks: Sequence[Sink] = (), clock: Clock | None = None,
                 image: np.ndarray | None = None, metrics: Metrics | None = None,
                 notifier: Notifier | None = None, offline: bool = False,
                 inference: Inference | None = None) -> None:
        if motion.profile != renderer.profile:
            raise ValueError(f"motion generator profile {motion.profile!r} does not match renderer "
                             f"profile {renderer.profile!r}: set avatar.profile consistently")
        if motion.fps != cfg.player.fps:
            raise ValueError(f"player.fps = {cfg.player.fps}, but the motion generator runs at "
                             f"{motion.fps} fps: set player.fps = {motion.fps}")
        self.cfg, self.clock = cfg, clock or SystemClock()
        self.source, self.vad, self.motion, self.renderer = source, vad, motion, renderer
        self.sinks = list(sinks)
        self.metrics, self.notifier = metrics or Metrics(), notifier or Notifier(env={})
        self.events = EventBus()
        self.fps, self.spf = cfg.player.fps, SAMPLE_RATE // cfg.player.fps
        self.chunker = Chunker(chunker_params(cfg, motion.min_hop_ms), offline=offline)
        latency, capacity = cfg.player.latency_ms / 1000, cfg.player.queue_frames
        ahead = isinstance(source, SpeechSource) and cfg.player.speech_latency_ms > 0 and not offline
        if ahead:  # queued speech: run the source ahead, start new speech right away (_rewind)
            latency = cfg.player.speech_latency_ms / 1000
            source.schedule(self.chunker.latency_ms / 1000 + latency + _COMPUTE_S, self._rewind)
        # A source paced by our own clock has no sound-card drift to follow.
        self.timeline = AudioTimeline(self.clock, max_step_s=0.0 if ahead else 0.002)
        self._margin = cfg.player.speech_latency_ms / 1000
        if offline:  # whole-window chunks are due a window later; the fake clock makes it free
            latency = max(latency, (self.chunker.latency_ms + cfg.chunker.window_ms) / 1000)
            capacity = max(capacity, int(latency * self.fps) + 2 * self.fps)
        self.player = Player(self.fps, self.clock, self.timeline, latency, capacity=capacity)
        self.player.sinks = self.sinks                # one list: taps added later are seen
        self.steering = space.Steering(expression=cfg.motion.expression_scale,
                                       head=cfg.motion.head_scale)
        self.avatar: Avatar | None = None
        self._image = image
        self._own_inference = inference is None
        self.inference = inference or Inference(self.clock, cfg.render.threads)
        self._chunks: asyncio.Queue[SpeechChunk | None] = asyncio.Queue(_CHUNK_QUEUE)
        self._prev: np.ndarray | None = None         # last emitted motion frame (continuity)
        self._recent: dict[int, np.ndarray] = {}     # frame index → motion, last few seconds
        self._stop = asyncio.Event()
        self._end_sample: int | None = None          # finite sources: where the timeline ends
        self.epoch = 0                               # bumped by clear(): older work is discarded
        self._mute_before = 0                        # chunks starting earlier animate as idle
        self._utterance = self._muted_utterance = 0  # the VAD's latest / last interrupted one
        self._reset_motion = False
        self.chunks_dropped = 0
        self._vad_open: tuple[int, int] | None = None  # VAD segment playing: (id, onset)
        self.segments = _Segments(self, source) if isinstance(source, SpeechSource) else None

    # ---- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Warm up, start the sinks, run until the source is played out or :meth:`stop`.

        Raises the error of any task that fails (the session is over then)."""
        if self.segments is not None:
            self.segments.loop = asyncio.get_running_loop()
        await self.warm_up()
        await self._start_sinks()
        self.notifier.ready(f"running at {self.fps} fps")
        log.info("agent running: %d fps, latency %d ms, sinks: %s", self.fps,
                 self.cfg.player.latency_ms, ", ".join(s.name for s in self.sinks) or "none")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._listen(), name="listen")
                tg.create_task(self._animate(), name="animate")
                tg.create_task(self._play(), name="play")
                tg.create_task(self._until_stopped(), name="stop")
        except* _Stopped:
            pass
        finally:
            self.notifier.stopping()
            await self._close()

    async def warm_up(self) -> None:
        """Prepare the avatar and render its rest pose once (loads and JIT-warms the models)."""
        if self.avatar is None:
            await self.set_avatar(self._image)

    async def set_avatar(self, image: np.ndarray | None) -> None:
        """Prepare a portrait on the inference thread and switch to it between two frames."""
        if image is None:
            from .face.landmarks import load_image

            image = await asyncio.to_thread(load_image, self.cfg.avatar_path())
        later = self.clock.now() + 1.0                # frames due sooner go first
        avatar = await self.inference.run(later, self.renderer.prepare, image)
        await self.inference.run(later, self.motion.prepare, avatar)
        self.motion.set_emotion(self.steering.emotion, self.steering.intensity)
        rest = np.asarray(self.motion.rest_pose, np.float32)
        frame = (await self.inference.run(later, self.renderer.render, avatar, rest[None]))[0]
        swapped, self.avatar = self.avatar is not None, avatar
        if self._prev is None or swapped:             # a new identity starts from its own rest
            self._prev = rest
        self.player.set_idle_image(frame)

    def stop(self) -> None:
        """Ask the session to stop: drain ≤ service.drain_s, then finalise the sinks."""
        self._stop.set()

    async def _until_stopped(self) -> None:
        await self._stop.wait()
        deadline = self.clock.now() + self.cfg.service.drain_s  # already rendered frames play out
        while self.player.buffered() and self.clock.now() < deadline:
            await self.clock.sleep_until(min(deadline, self.clock.now() + 1 / self.fps))
        raise _Stopped

    async def _start_sinks(self) -> None:
        started = []
        for sink in self.sinks:
            try:
                await sink.start(self.cfg.render.size, self.cfg.render.size, self.fps)
                started.append(sink)
            except Exception as e:  # a sink that cannot start must not stop the others
                log.error("sink %s could not start and is disabled: %s", sink.name, e)
        if self.sinks and not started:
            raise RuntimeError("no output could start (see the errors above): fix one sink or "
                               "enable another in sinks.enabled")
        self.sinks[:] = started

    async def _close(self) -> None:
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception as e:
                log.error("closing sink %s failed: %s", sink.name, e)
        try:
            await self.source.close()
        except Exception as e:
            log.error("closing the audio source failed: %s", e)
        if self._own_inference:
            self.inference.close()
        self.notifier.close()

    # ---- LISTEN: audio frames → timeline + VAD + chunker → chunk queue -------------------------

    async def _listen(self) -> None:
        async for frame in self.source.frames():
            self.timeline.append(frame.index, frame.samples)
            for item in self.chunker.push(frame, self.vad.is_speech(frame.samples)):
                self._on_chunker(item)
        for item in self.chunker.flush():
            self._on_chunker(item)
        self._end_sample = self.timeline.end
        await self._chunks.put(None)

    def _on_chunker(self, item: SpeechChunk | SpeechStarted | SpeechEnded) -> None:
        if isinstance(item, SpeechStarted):
            self._utterance = item.utterance
        if isinstance(item, SpeechChunk):
            if self._chunks.full():
                self._chunks.get_nowait()            # drop oldest: the freshest audio matters most
                self.chunks_dropped += 1
                self.metrics.frames.labels("chunk_dropped").inc()
            self._chunks.put_nowait(item)
        elif self.segments is None:                   # no speech source: the VAD marks segments
            if isinstance(item, SpeechStarted):
                self._vad_open = (item.utterance, item.onset)
                self.player.mark(item.onset // self.spf, SegmentStarted(item.utterance))
            elif self._vad_open is not None:          # (an interrupted one has ended already)
                played = (item.offset - self._vad_open[1]) / SAMPLE_RATE
                self._vad_open = None
                self.player.mark(max(item.offset - 1, 0) // self.spf,
                                 SegmentEnded(item.utterance, False, played))

    # ---- ANIMATE: chunk → motion (continuing from _prev) → frames → player buffer --------------

    async def _animate(self) -> None:
        while (chunk := await self._chunks.get()) is not None:
            try:
                await self._animate_chunk(chunk)
            except Exception:  # one bad chunk never ends the session: its frames fall back
                log.exception("animating chunk at sample %d failed; continuing", chunk.start)
                self.metrics.frames.labels("chunk_failed").inc()

    async def _animate_chunk(self, chunk: SpeechChunk) -> None:
        assert self.avatar is not None and self._prev is not None
        first, n = chunk.start // self.spf, chunk.n_new // self.spf
        due, epoch = self.player.due(first), self.epoch
        if self._reset_motion:                        # after clear(): forget speech history
            self._reset_motion = False
            await self.inference.run(due, self.motion.reset)
        st, t0 = self.steering, time.perf_counter()
        speech = (chunk.speech and chunk.start >= self._mute_before
                  and chunk.utterance > self._muted_utterance)   # nor its hangover tail
        if speech:
            motion = await self.inference.run(due, self.motion.generate, chunk, self._prev,
                                              st.emotion, st.intensity)
        else:
            motion = await self.inference.run(due, self.motion.idle, n, self._prev, first / self.fps)
        self.metrics.stage_seconds.labels("motion").observe(time.perf_counter() - t0)
        if not space.valid(motion):                  # never let NaN/inf become the continuity
            log.error("motion generator returned invalid motion at frame %d; idling", first)
            self.metrics.frames.labels("motion_invalid").inc()
            motion = await self.inference.run(due, self.motion.idle, n, self._prev, first / self.fps)
        if epoch == self.epoch:                       # else cleared meanwhile: refill owns it
            await self._deliver(first, st.apply(motion, self.avatar.rest_motion), speech, epoch)

    async def _deliver(self, first: int, motion: np.ndarray, speech: bool, epoch: int) -> None:
        """Render ``motion`` (frames first, first+1, …) in batches and hand them to the player."""
        avatar, n, batch = self.avatar, len(motion), max(1, self.cfg.render.batch)
        self._prev = motion[-1].copy()
        self._recent.update((first + k, m) for k, m in enumerate(motion))
        for old in [i for i in self._recent if i < first + n - 4 * self.fps]:
            del self._recent[old]
        # The chunk's first frame is due soonest (its deadline is what the latency budget is
        # for): render it alone, then the rest in batches, which are due 40 ms apart each.
        starts = [0, *range(1, n, batch)] if batch > 1 else list(range(n))
        for b, e in zip(starts, [*starts[1:], n]):
            live = [i for i in range(first + b, first + e) if not self.player.is_late(i)]
            if not live:                              # behind: skip work, the clock goes on
                self.metrics.frames.labels("skipped_late").inc(e - b)
                continue
            t1 = time.perf_counter()
            images = await self.inference.run(self.player.due(live[0]), self.renderer.render,
                                              avatar, motion[[i - first for i in live]])
            self.metrics.stage_seconds.labels("render").observe(time.perf_counter() - t1)
            if epoch != self.epoch:
                return
            for i, img in zip(live, images):
                if self.player.push(i, img, speech):
                    self.metrics.frames.labels("produced").inc()

    # ---- PLAY: the master clock -----------------------------------------------------------------

    async def _play(self) -> None:
        while not self.timeline.started:             # the clock starts with the first audio
            if self._end_sample is not None:
                self._stop.set()
                return
            await self.clock.sleep_until(self.clock.now() + 0.005)
        while self._end_sample is None or self.player.next_index * self.spf < self._end_sample:
            frame, lateness = await self.player.tick()
            self._observe(frame, lateness)
        self._stop.set()                              # finite source fully played out

    def _observe(self, frame: VideoFrame, lateness: float) -> None:
        m = self.metrics
        m.frames.labels("delivered").inc()
        m.frames.labels("speech" if frame.speech else "idle").inc()
        m.clock_lateness.set(lateness)
        m.av_offset.set(self.clock.now() - self.timeline.time_of(frame.index * self.spf))
        if self.producing:                           # a frozen face must not feed the watchdog
            self.notifier.watchdog(self.clock.now())
        for mark in frame.segments:
            self.events.emit_mark(mark, frame.index)
        if frame.index and frame.index % (60 * self.fps) == 0:
            log.info("status: %s", self.player.status_line())

    @property
    def producing(self) -> bool:
        """False once no new image has reached the player for ``service.frozen_s`` seconds."""
        return self.player.stats.underrun_streak < self.cfg.service.frozen_s * self.fps

    # ---- interruption ---------------------------------------------------------------------------

    def clear(self) -> tuple[int, int]:
        """Drop all unplayed speech from every stage; idle from the next frame.

        Returns (first idle frame, rendered frames dropped).  One epoch: work started before it
        delivers nothing; each stage is told once (source, timeline, chunk queue, motion, player).
        """
        nxt = self.player.next_index
        self.epoch += 1
        if self.segments is not None:
            self.segments.cut = nxt
        elif self._vad_open is not None:              # the VAD's open segment ends here
            utt, onset = self._vad_open
            self._vad_open = None
            self.player.mark(nxt, SegmentEnded(utt, True, max(0, nxt * self.spf - onset) / SAMPLE_RATE))
        if isinstance(self.source, Interruptible):
            self.source.interrupt()
        self._mute_before = max(self._mute_before, self.timeline.end)
        self._muted_utterance = self._utterance
        self.timeline.silence(nxt * self.spf, self.timeline.end)
        end_marker = False
        while not self._chunks.empty():
            end_marker |= self._chunks.get_nowait() is None
        dropped = self.player.clear(nxt)
        self._reset_motion = True
        self._prev = self._recent.get(nxt - 1, self._prev)
        upto = max(self.chunker.emitted // self.spf, nxt)
        if upto > nxt:                                # idle motion refills what was dropped
            n = (upto - nxt) * self.spf
            self._chunks.put_nowait(SpeechChunk(np.zeros(n, np.float32), nxt * self.spf, n, 0, 0,
                                                speech=False))
        if end_marker:
            self._chunks.put_nowait(None)
        return nxt, dropped


    def _rewind(self, sample: int) -> int:
        """New speech after silence at ``sample`` (ahead of the clock): start it at the earliest
        frame still to come instead, dropping what was made of the silence from there."""
        f, ready = self.player.next_index, self.clock.now() + self._margin
        while self.player.due(f) < ready:             # the first frame compute can still make
            f += 1
        if f * self.spf >= sample:
            return sample
        self.epoch += 1
        self.player.clear(f)
        end_marker = False
        while not self._chunks.empty():
            end_marker |= self._chunks.get_nowait() is None
        if end_marker:
            self._chunks.put_nowait(None)
        self.chunker = Chunker(self.chunker.params)
        self._utterance = self._muted_utterance = 0
        self._mute_before = min(self._mute_before, f * self.spf)
        self.timeline.truncate(f * self.spf)
        self._reset_motion = True
        self._prev = self._recent.get(f - 1, self._prev)
        return f * self.spf


class _Segments:
    """Turns a speech source's utterance events into segment marks on the frames that play them."""

    def __init__(self, agent: Agent, source: SpeechSource) -> None:
        self.agent, self.starts, self.cut = agent, dict[int, int](), 0
        self.loop: asyncio.AbstractEventLoop | None = None   # set by run(); marks go there
        source.subscribe(self._on_event)

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        # Synthesis errors arrive from the TTS thread: marks are placed on the loop thread.
        loop = self.loop
        if loop is not None and not _on_loop(loop):
            loop.call_soon_threadsafe(self._place, kind, data)
        else:
            self._place(kind, data)

    def _place(self, kind: str, data: dict[str, Any]) -> None:
        utt, sample, spf = data["utterance"], data["sample"], self.agent.spf
        if kind == "speech_started":
            self.starts[utt] = sample
            self.agent.player.mark(sample // spf, SegmentStarted(utt))
            return
        start = self.starts.pop(utt, None)
        interrupted = bool(data.get("interrupted"))
        if interrupted:                               # ends in the first idle frame
            at = self.cut
            played = 0.0 if start is None else max(0, at * spf - start) / SAMPLE_RATE
        else:
            at = max(sample - 1, 0) // spf
            played = 0.0 if start is None else (sample - start) / SAMPLE_RATE
        self.agent.player.mark(at, SegmentEnded(utt, interrupted, played))


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
