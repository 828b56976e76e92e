"""The agent: how audio becomes frames, for one session.  Read top to bottom.

    source ──▶ LISTEN task: timeline + VAD + chunker (+ live phones) ──▶ [chunk queue]
               ANIMATE task: motion.generate / motion.idle ─▶ renderer.render  (inference thread)
                             ──▶ player buffer (frame index → image)
               PLAY task (the clock): every 1/fps → the due frame + its audio slice → every sink

* All model work runs on ONE inference thread (shared by a process's sessions), earliest due
  frame first.  Controls (say, emotion, …) live in :mod:`avatar_agent.session`.
* Speech without phonemes (microphone, pushed audio) may get them from a live phone recogniser
  (``phones``), so its lips shape visemes as TTS speech does.
* The chunker tiles the whole audio timeline: speech hops get lip-sync, silence hops the idle
  layer, so the face is never frozen.  Frame i is due at capture time of its audio + latency
  and carries exactly that audio: A/V sync by construction.
* Bounded queues: the chunk queue drops the oldest chunk (counted), the player its oldest image.
* One TaskGroup supervises the tasks: if one dies, the session ends with its error.
* Interruption is one epoch and one clear per stage (:meth:`Agent.clear`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .animate import Animator
from .chunker import Chunker, SpeechEnded, SpeechStarted
from .clock import Clock, SystemClock
from .config import Config, chunker_params
from .events import EventBus, SegmentMarker
from .inference import Inference
from .render.batching import RenderBatcher
from .metrics import Metrics
from .motion import space
from .player import AudioTimeline, Player
from .queues import DropOldest
from .service import Notifier
from .sinks import close_all, start_all
from .types import (SAMPLE_RATE, AudioSource, Interruptible, MotionGenerator, Renderer, Sink,
                    SpeechChunk, SpeechSource, Vad)

if TYPE_CHECKING:
    from .audio.recognizer import PhoneTracker

log = logging.getLogger(__name__)

_CHUNK_QUEUE = 64
"""Chunks waiting for the animate task (≈10 s at a 160 ms hop); overflow drops the oldest."""
_COMPUTE_S = 0.06
"""Time a chunk's motion + first frame may take (part of how far a speech source runs ahead)."""


class _Stopped(Exception):
    """Raised inside the task group to end the session normally."""


class Agent:
    """Runs one session's pipeline: source → chunks → motion → frames → player → sinks."""

    def __init__(self, cfg: Config, *, source: AudioSource, vad: Vad, motion: MotionGenerator,
                 renderer: Renderer, sinks: Sequence[Sink] = (), clock: Clock | None = None,
                 image: np.ndarray | None = None, metrics: Metrics | None = None,
                 notifier: Notifier | None = None, offline: bool = False,
                 inference: Inference | None = None, batcher: RenderBatcher | None = None,
                 phones: PhoneTracker | None = None) -> None:
        if motion.profile != renderer.profile:
            raise ValueError(f"motion generator profile {motion.profile!r} does not match renderer "
                             f"profile {renderer.profile!r}: set avatar.profile consistently")
        if motion.fps != cfg.player.fps:
            raise ValueError(f"player.fps = {cfg.player.fps}, but the motion generator runs at "
                             f"{motion.fps} fps: set player.fps = {motion.fps}")
        self.cfg, self.clock, self.image = cfg, clock or SystemClock(), image
        self.source, self.vad, self.motion, self.renderer = source, vad, motion, renderer
        self.phones = phones
        self.sinks, self.events = list(sinks), EventBus()
        self.metrics, self.notifier = metrics or Metrics(), notifier or Notifier(env={})
        self.fps, self.spf = cfg.player.fps, SAMPLE_RATE // cfg.player.fps
        self.chunker = Chunker(chunker_params(cfg, motion.min_hop_ms), offline=offline)
        latency, capacity = cfg.player.latency_ms / 1000, cfg.player.queue_frames
        ahead = isinstance(source, SpeechSource) and cfg.player.speech_latency_ms > 0 and not offline
        if ahead:  # queued speech: the source runs ahead, new speech starts at once (_rewind)
            latency = cfg.player.speech_latency_ms / 1000
            assert isinstance(source, SpeechSource)  # ahead implies it (narrows the type)
            source.schedule(self.chunker.latency_ms / 1000 + latency + _COMPUTE_S, self._rewind)
        if offline:  # whole-window chunks are due a window later; the fake clock makes it free
            latency = max(latency, (self.chunker.latency_ms + cfg.chunker.window_ms) / 1000)
            capacity = max(capacity, int(latency * self.fps) + 2 * self.fps)
        # A source paced by our own clock has no sound-card drift to follow.
        self.timeline = AudioTimeline(self.clock, max_step_s=0.0 if ahead else 0.002)
        self.player = Player(self.fps, self.clock, self.timeline, latency, capacity=capacity)
        self.player.sinks = self.sinks                # one list: frame taps added later are seen
        self.marks = SegmentMarker(self.player, self.spf, source)
        self.steering = space.Steering(cfg.motion.expression_scale, cfg.motion.head_scale)
        self.inference = inference or Inference(self.clock, cfg.render.threads)
        self._own_inference = inference is None
        # One batcher per renderer + inference pair: sessions sharing them share it (Engine).
        self.batcher = batcher or RenderBatcher(renderer, self.inference)
        self.animator = Animator(cfg, motion, renderer, self.player, self.inference,
                                 self.metrics, self.steering, self.batcher)
        self.chunks = DropOldest[SpeechChunk](_CHUNK_QUEUE)
        self._stop = asyncio.Event()
        self._end_sample: int | None = None           # finite sources: where the timeline ends
        self._mute_before = 0                         # chunks starting earlier animate as idle
        self._utterance = self._muted_utterance = 0   # the VAD's latest / last interrupted one

    # ---- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Warm up, start the sinks, run until the source is played out or :meth:`stop`.

        Raises the error of any task that fails (the session is over then)."""
        self.marks.loop = asyncio.get_running_loop()
        await self.warm_up()
        size = self.cfg.render.size
        self.sinks[:] = await start_all(self.sinks, size, size, self.fps)
        self.notifier.ready(f"running at {self.fps} fps")
        log.info("agent running: %d fps, latency %.0f ms, sinks: %s", self.fps,
                 self.player.latency_s * 1000, ", ".join(s.name for s in self.sinks) or "none")
        try:
            async with asyncio.TaskGroup() as tg:
                for task in (self._listen, self._animate, self._play, self._until_stopped):
                    tg.create_task(task(), name=task.__name__)
        except* _Stopped:
            pass
        finally:
            self.notifier.stopping()
            await close_all(self.sinks, self.source)
            if self._own_inference:
                self.inference.close()                # never waits for a stuck model call
            self.notifier.close()

    async def warm_up(self) -> None:
        """Prepare the avatar and render its rest pose once (loads and JIT-warms the models)."""
        if self.animator.avatar is None:
            await self.set_avatar(self.image)
        if self.phones is not None:
            await asyncio.to_thread(self.phones.prepare)

    async def set_avatar(self, image: np.ndarray | None) -> None:
        """Prepare a portrait (default: the config's) and switch to it between two frames."""
        if image is None:
            from .face.landmarks import load_portrait

            image = await asyncio.to_thread(load_portrait, self.cfg.avatar_path())
        await self.animator.set_avatar(image)

    def stop(self) -> None:
        """Ask the session to stop: drain ≤ service.drain_s, then finalise the sinks."""
        self._stop.set()

    async def _until_stopped(self) -> None:
        await self._stop.wait()
        deadline = self.clock.now() + self.cfg.service.drain_s  # rendered frames still play
        while self.player.buffered() and self.clock.now() < deadline:
            await self.clock.sleep_until(min(deadline, self.clock.now() + 1 / self.fps))
        raise _Stopped

    # ---- LISTEN: audio frames → timeline + VAD + chunker → chunk queue -------------------------

    async def _listen(self) -> None:
        async for frame in self.source.frames():
            self.timeline.append(frame.index, frame.samples)
            if self.phones is not None:
                self.phones.push(frame)
            for item in self.chunker.push(frame, self.vad.is_speech(frame.samples)):
                self._on_chunker(item)
        for item in self.chunker.flush():
            self._on_chunker(item)
        self._end_sample = self.timeline.end
        self.chunks.close()

    def _on_chunker(self, item: SpeechChunk | SpeechStarted | SpeechEnded) -> None:
        if isinstance(item, SpeechChunk):
            if self.phones is not None:
                item = self.phones.annotate(item)
            if self.chunks.put(item):                 # full: the oldest chunk's frames repeat
                self.metrics.frames.labels("chunk_dropped").inc()
            return
        self._utterance = item.utterance if isinstance(item, SpeechStarted) else self._utterance
        if self.phones is not None:
            self.phones.on_event(item)
        self.marks.on_chunker(item)

    # ---- ANIMATE: chunk → motion (continuing from the last frame) → images → player buffer ----

    async def _animate(self) -> None:
        while (chunk := await self.chunks.get()) is not None:
            speech = (chunk.speech and chunk.start >= self._mute_before
                      and chunk.utterance > self._muted_utterance)   # nor its hangover tail
            try:
                await self.animator.animate(chunk, speech)
            except Exception:  # one bad chunk never ends the session: its frames fall back
                log.exception("animating chunk at sample %d failed; continuing", chunk.start)
                self.metrics.frames.labels("chunk_failed").inc()

    # ---- PLAY: the master clock -----------------------------------------------------------------

    async def _play(self) -> None:
        while not self.timeline.started:              # the clock starts with the first audio
            if self._end_sample is not None:
                break
            await self.clock.sleep_until(self.clock.now() + 0.005)
        while self._end_sample is None or self.player.next_index * self.spf < self._end_sample:
            frame, lateness = await self.player.tick()
            self.metrics.frame_sent(frame.speech, lateness, self.clock.now()
                                    - self.timeline.time_of(frame.index * self.spf))
            if self.producing:                        # a frozen face must not feed the watchdog
                self.notifier.watchdog(self.clock.now())
            for mark in frame.segments:
                self.events.emit_mark(mark, frame.index)
            if frame.index and frame.index % (60 * self.fps) == 0:
                log.info("status: %s", self.player.status_line())
        self._stop.set()                              # finite source fully played out

    @property
    def producing(self) -> bool:
        """False once no new image has reached the player for ``service.frozen_s`` seconds."""
        return self.player.stats.underrun_streak < self.cfg.service.frozen_s * self.fps

    # ---- interruption and rewind: one epoch, one clear per stage -------------------------------

    def clear(self) -> tuple[int, int]:
        """Drop all unplayed speech from every stage; idle from the next frame.

        Returns (first idle frame, rendered frames dropped)."""
        nxt = self.player.next_index
        self.marks.interrupt(nxt)
        if isinstance(self.source, Interruptible):
            self.source.interrupt()
        self._mute_before, self._muted_utterance = self.timeline.end, self._utterance
        self.timeline.silence(nxt * self.spf, self.timeline.end)
        dropped = self._drop_from(nxt)
        upto = max(self.chunker.emitted // self.spf, nxt)
        if upto > nxt:                                # idle motion refills what was dropped
            n = (upto - nxt) * self.spf
            self.chunks.put(SpeechChunk(np.zeros(n, np.float32), nxt * self.spf, n, 0, 0, False))
        return nxt, dropped

    def _rewind(self, sample: int, buffered: int) -> int:
        """New speech after silence at ``sample`` (ahead of the clock): start it at the earliest
        frame compute can still make instead, dropping what was made of the silence from there.
        A live stream (``buffered`` ≥ 0 samples there) also needs its lookahead to arrive."""
        if not self.timeline.started:                 # the very first audio: nothing to redo
            return sample
        wait = self.cfg.player.speech_latency_ms / 1000
        if buffered >= 0:
            wait = max(wait, self.chunker.latency_ms / 1000 + _COMPUTE_S - buffered / SAMPLE_RATE)
        f, ready = self.player.next_index, self.clock.now() + wait
        while self.player.due(f) < ready:
            f += 1
        if f * self.spf >= sample:
            return sample
        self._drop_from(f)
        self.chunker = Chunker(self.chunker.params)   # the timeline continues from f
        if self.phones is not None:
            self.phones.reset()
        self._utterance = self._muted_utterance = 0
        self._mute_before = min(self._mute_before, f * self.spf)
        self.timeline.truncate(f * self.spf)
        return f * self.spf

    def _drop_from(self, frame: int) -> int:
        """Drop queued chunks, work in flight and frames ≥ ``frame``; motion goes on from there."""
        self.chunks.clear()
        self.animator.clear(frame)
        return self.player.clear(frame)
