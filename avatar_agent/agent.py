"""The agent: how audio becomes frames.  Read top to bottom.

    source ──▶ LISTEN task: timeline + VAD + chunker ──▶ [chunk queue]
               ANIMATE task: motion.generate / motion.idle ─▶ renderer.render  (inference thread)
                             ──▶ player buffer (frame index → image)
               PLAY task (the clock): every 1/fps → the due frame + its audio slice → every sink

* One asyncio loop owns orchestration; all model work runs on ONE inference thread (one torch
  context, no GIL fights on 2 cores).
* The chunker tiles the whole audio timeline: speech hops get lip-sync, silence hops get the idle
  layer, so the player never runs dry in normal operation and never shows a frozen face.
* Every frame's due time = capture time of its audio + latency: A/V sync by construction.
* Queues are bounded: chunk queue drops the oldest chunk when full (counted; the player then
  repeats the last image for those frames), the player buffer drops the oldest image.
* Motion continuity: each chunk is generated from the last emitted motion frame (``_prev``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from .chunker import Chunker, SpeechEnded, SpeechStarted
from .clock import Clock, SystemClock
from .config import Config, chunker_params
from .metrics import Metrics
from .player import AudioTimeline, Player
from .service import Notifier
from .types import (EMOTION_NONE, EMOTIONS, SAMPLE_RATE, AudioSource, Avatar, MotionGenerator,
                    Renderer, Sink, SpeechChunk, Vad, VideoFrame)

log = logging.getLogger(__name__)
R = TypeVar("R")

_CHUNK_QUEUE = 64
"""Chunks waiting for the animate task (≈10 s at a 160 ms hop); overflow drops the oldest."""


def emotion_label(name: str) -> int:
    """Emotion name → MoDA class label (8 = none)."""
    if name == "none":
        return EMOTION_NONE
    if name not in EMOTIONS:
        raise ValueError(f"unknown emotion {name!r}: choose one of {', '.join(EMOTIONS)}, none")
    return EMOTIONS.index(name)


@dataclasses.dataclass
class Event:
    """Something listeners may want to know (speech boundaries, reloads)."""

    kind: str
    data: dict[str, Any]


class Agent:
    """Runs one avatar: source → chunks → motion → frames → sinks.

    The plug-ins are built from the config by :mod:`avatar_agent.wiring` unless given (tests inject
    fakes and real components alike).
    """

    def __init__(self, cfg: Config, *, source: AudioSource, vad: Vad, motion: MotionGenerator,
                 renderer: Renderer, sinks: Sequence[Sink], clock: Clock | None = None,
                 image: np.ndarray | None = None, metrics: Metrics | None = None,
                 notifier: Notifier | None = None, offline: bool = False) -> None:
        if motion.profile != renderer.profile:
            raise ValueError(f"motion generator profile {motion.profile!r} does not match renderer "
                             f"profile {renderer.profile!r}: set avatar.profile consistently")
        self.cfg = cfg
        self.clock = clock or SystemClock()
        self.source, self.vad, self.motion, self.renderer = source, vad, motion, renderer
        self.sinks = list(sinks)
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier(env={})
        self.fps = cfg.player.fps
        self.spf = SAMPLE_RATE // self.fps
        self.timeline = AudioTimeline(self.clock)
        # A generator may need longer hops than configured (the tiny MoDA: one DiT window each).
        self.chunker = Chunker(chunker_params(cfg, getattr(motion, "min_hop_ms", 0)),
                               offline=offline)
        latency = cfg.player.latency_ms / 1000
        capacity = cfg.player.queue_frames
        if offline:
            # Offline chunks are a whole window long, so frames are due a window later; the fake
            # clock makes the wait free.  A/V sync does not depend on the latency.
            latency = max(latency, (self.chunker.latency_ms + cfg.chunker.window_ms) / 1000)
            capacity = max(capacity, int(latency * self.fps) + 2 * self.fps)
        self.player = Player(self.fps, self.clock, self.timeline, latency, self.sinks,
                             capacity=capacity, on_tick=self._on_tick)
        self.emotion = emotion_label(cfg.avatar.emotion)
        self.intensity = cfg.avatar.intensity
        self.avatar: Avatar | None = None
        self._image = image
        self._chunks: asyncio.Queue[SpeechChunk | None] = asyncio.Queue(_CHUNK_QUEUE)
        self._prev: np.ndarray | None = None        # last emitted motion frame (continuity)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="inference",
                                        initializer=_init_inference_thread,
                                        initargs=(cfg.render.threads,))
        self._stop = asyncio.Event()
        self._source_done = asyncio.Event()
        self._end_sample: int | None = None          # finite sources: where the timeline ends
        self.chunks_dropped = 0
        self.listeners: list[Callable[[Event], None]] = []
        self.expression_scale = cfg.motion.expression_scale
        self.head_scale = cfg.motion.head_scale
        self.gaze = (0.0, 0.0)
        # Interruption: chunks starting before _mute_before are animated as idle, and jobs started
        # in an older epoch do not deliver their frames.
        self._epoch = 0
        self._mute_before = 0
        self._muted_utterance = 0
        self._utterance = 0                            # id of the latest utterance started
        self._motion_log: dict[int, np.ndarray] = {}   # frame index → motion, recent frames only
        # Speech events: a speech-queue source knows utterance boundaries exactly; otherwise
        # the VAD's decisions are the speech events.
        self._source_events = hasattr(source, "subscribe")
        if self._source_events:
            source.subscribe(lambda kind, data: self._emit(kind, **data))

    # -------------------------------------------------------------------------------------------
    # Lifecycle
    # -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Warm up, start the sinks, run until the source ends (and plays out) or :meth:`stop`."""
        await self.warm_up()
        for sink in list(self.sinks):
            try:
                await sink.start(self.cfg.render.size, self.cfg.render.size, self.fps)
            except Exception as e:  # a sink that cannot start must not stop the others
                log.error("sink %s could not start and is disabled: %s", sink.name, e)
                self.sinks.remove(sink)
        self.player.sinks = self.sinks
        tasks = [asyncio.create_task(self._listen(), name="listen"),
                 asyncio.create_task(self._animate(), name="animate"),
                 asyncio.create_task(self._play(), name="play")]
        self.notifier.ready(f"running at {self.fps} fps")
        log.info("agent running: %d fps, latency %d ms, sinks: %s", self.fps,
                 self.cfg.player.latency_ms, ", ".join(s.name for s in self.sinks) or "none")
        try:
            await self._stop.wait()
        finally:
            self.notifier.stopping()
            await self._shutdown(tasks)

    async def warm_up(self) -> None:
        """Prepare the avatar and render its rest pose once (loads and JIT-warms the models)."""
        if self.avatar is None:
            await self.set_avatar(self._image)

    async def set_avatar(self, image: np.ndarray | None) -> None:
        """Prepare a portrait in the background and switch to it between two frames."""
        if image is None:
            from .face.landmarks import load_image

            image = load_image(self.cfg.avatar_path())
        img = image
        avatar = await self._infer(self.renderer.prepare, img)
        await self._infer(self.motion.prepare, avatar)
        if hasattr(self.motion, "set_emotion"):
            self.motion.set_emotion(self.emotion, self.intensity)
        # The generator's own rest (e.g. the portrait's pose with the mouth closed) if it has one.
        rest = np.asarray(getattr(self.motion, "rest_pose", avatar.rest_motion), np.float32)
        frame = (await self._infer(self.renderer.render, avatar, rest[None]))[0]
        swapped = self.avatar is not None
        self.avatar = avatar
        if self._prev is None or swapped:             # a new identity starts from its own rest
            self._prev = rest
        self.player.set_idle_image(frame)

    def stop(self) -> None:
        """Ask the agent to stop (SIGTERM): drain ≤ service.drain_s, then finalise the sinks."""
        self._stop.set()

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        # Let already rendered frames play for up to drain_s so a file gets the tail.
        deadline = time.monotonic() + self.cfg.service.drain_s
        while self.player.buffered() and time.monotonic() < deadline and not tasks[2].done():
            await asyncio.sleep(0.02)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception as e:
                log.error("closing sink %s failed: %s", sink.name, e)
        with contextlib.suppress(Exception):
            await self.source.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.notifier.close()

    # -------------------------------------------------------------------------------------------
    # LISTEN: audio frames → timeline + VAD + chunker → chunk queue
    # -------------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        try:
            async for frame in self.source.frames():
                self.timeline.append(frame.index, frame.samples)
                speech = self.vad.is_speech(frame.samples)
                for item in self.chunker.push(frame, speech):
                    await self._handle_chunker_output(item)
            for item in self.chunker.flush():
                await self._handle_chunker_output(item)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("audio source failed")
        finally:
            self._end_sample = self.timeline.end
            self._source_done.set()
            with contextlib.suppress(asyncio.QueueFull):
                self._chunks.put_nowait(None)

    async def _handle_chunker_output(self, item: SpeechChunk | SpeechStarted | SpeechEnded) -> None:
        if isinstance(item, SpeechChunk):
            if self._chunks.full():
                self._chunks.get_nowait()            # drop oldest: the freshest audio matters most
                self.chunks_dropped += 1
                self.metrics.frames.labels("chunk_dropped").inc()
            self._chunks.put_nowait(item)
            self.metrics.queue_depth.labels("chunks").set(self._chunks.qsize())
        elif isinstance(item, SpeechStarted):
            self.metrics.speaking.set(1)
            self._utterance = item.utterance
            kind = "voice_started" if self._source_events else "speech_started"
            self._emit(kind, utterance=item.utterance, sample=item.onset,
                       frame=item.onset // self.spf)
        elif isinstance(item, SpeechEnded):
            self.metrics.speaking.set(0)
            kind = "voice_ended" if self._source_events else "speech_finished"
            self._emit(kind, utterance=item.utterance, sample=item.offset,
                       frame=item.offset // self.spf, interrupted=False, reason=item.reason)

    # -------------------------------------------------------------------------------------------
    # ANIMATE: chunk → motion (continuing from _prev) → frames → player buffer
    # -------------------------------------------------------------------------------------------

    async def _animate(self) -> None:
        while True:
            chunk = await self._chunks.get()
            if chunk is None:
                return
            try:
                await self._animate_chunk(chunk)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad chunk never kills the agent: its frames fall back
                log.exception("animating chunk at sample %d failed; continuing", chunk.start)
                self.metrics.frames.labels("chunk_failed").inc()

    async def _animate_chunk(self, chunk: SpeechChunk) -> None:
        assert self.avatar is not None and self._prev is not None
        first = chunk.start // self.spf
        n = chunk.n_new // self.spf
        speech = (chunk.speech and chunk.start >= self._mute_before
                  and chunk.utterance > self._muted_utterance)
        epoch = self._epoch
        t0 = time.perf_counter()
        if speech:
            motion = await self._infer(self.motion.generate, chunk, self._prev, self.emotion,
                                       self.intensity)
        else:
            motion = await self._infer(self.motion.idle, n, self._prev, first / self.fps)
        self.metrics.stage_seconds.labels("motion").observe(time.perf_counter() - t0)
        if epoch != self._epoch:                      # interrupted meanwhile: refill owns this
            return
        await self._deliver(first, self._scaled(motion), speech, epoch)

    async def _deliver(self, first: int, motion: np.ndarray, speech: bool, epoch: int) -> None:
        """Render ``motion`` (frames first, first+1, …) in batches and hand them to the player."""
        assert self.avatar is not None
        self._prev = motion[-1].copy()
        for k, m in enumerate(motion):
            self._motion_log[first + k] = m
        for old in [i for i in self._motion_log if i < first + len(motion) - 4 * self.fps]:
            del self._motion_log[old]
        avatar = self.avatar
        batch = max(1, self.cfg.render.batch)
        n = len(motion)
        # The chunk's first frame is due soonest (its deadline is what the latency budget is
        # for): render it alone, then the rest in batches, which are due 40 ms apart each.
        starts = [0, *range(1, n, batch)] if batch > 1 else list(range(n))
        for b, e in zip(starts, [*starts[1:], n]):
            idx = range(first + b, first + e)
            live = [i for i in idx if not self.player.is_late(i)]
            if not live:                              # behind: skip work, the clock goes on
                self.metrics.frames.labels("skipped_late").inc(len(idx))
                continue
            t1 = time.perf_counter()
            images = await self._infer(self.renderer.render, avatar, motion[[i - first for i in live]])
            self.metrics.stage_seconds.labels("render").observe(time.perf_counter() - t1)
            if epoch != self._epoch:
                return
            for i, img in zip(live, images):
                if self.player.push(i, img, speech):
                    self.metrics.frames.labels("produced").inc()
            self.metrics.queue_depth.labels("frames").set(self.player.buffered())

    def _scaled(self, motion: np.ndarray) -> np.ndarray:
        """Apply the expression/head-motion scales around the avatar's rest motion."""
        if self.expression_scale == 1.0 and self.head_scale == 1.0 and self.gaze == (0.0, 0.0):
            return motion
        assert self.avatar is not None
        rest = self.avatar.rest_motion
        out = motion.copy()
        out[:, :63] = rest[:63] + (motion[:, :63] - rest[:63]) * self.expression_scale
        out[:, 63:] = rest[63:] + (motion[:, 63:] - rest[63:]) * self.head_scale
        # Gaze: the embedded keypoints have no iris, so the head turns a little towards it.
        out[:, 68] += 10.0 * self.gaze[0]
        out[:, 67] += 8.0 * self.gaze[1]
        return out

    # -------------------------------------------------------------------------------------------
    # PLAY: the master clock
    # -------------------------------------------------------------------------------------------

    async def _play(self) -> None:
        while not self.timeline.started:             # the clock starts with the first audio
            if self._source_done.is_set():
                self._stop.set()
                return
            await self.clock.sleep_until(self.clock.now() + 0.005)
        while True:
            end = self._end_sample
            if end is not None and self.player.next_index * self.spf >= end:
                self._stop.set()                     # finite source fully played out
                return
            await self.player.tick()

    async def _on_tick(self, frame: VideoFrame, lateness: float) -> None:
        m = self.metrics
        m.frames.labels("delivered").inc()
        m.frames.labels("speech" if frame.speech else "idle").inc()
        m.clock_lateness.set(lateness)
        m.av_offset.set(self.clock.now() - self.timeline.time_of(frame.index * self.spf))
        self.notifier.watchdog(self.clock.now())
        if frame.index and frame.index % (60 * self.fps) == 0:   # a status line every minute
            log.info("status: %s", self.status_line())

    # -------------------------------------------------------------------------------------------
    # Control (from the API or signals), and helpers
    # -------------------------------------------------------------------------------------------

    def set_emotion(self, name: str, intensity: float | None = None) -> None:
        """Change the emotion; takes effect from the next chunk."""
        self.emotion = emotion_label(name)
        if intensity is not None:
            self.intensity = float(np.clip(intensity, 0.0, 1.0))
        if hasattr(self.motion, "set_emotion"):      # idle frames show the emotion too
            self.motion.set_emotion(self.emotion, self.intensity)

    def set_scales(self, expression: float | None = None, head: float | None = None) -> None:
        """Multipliers on expression and head motion around the rest pose (0 = still)."""
        if expression is not None:
            self.expression_scale = float(np.clip(expression, 0.0, 3.0))
        if head is not None:
            self.head_scale = float(np.clip(head, 0.0, 3.0))

    def set_gaze(self, x: float, y: float) -> None:
        """Look direction in [-1, 1]² (right/down positive)."""
        self.gaze = (float(np.clip(x, -1, 1)), float(np.clip(y, -1, 1)))

    def say(self, text: str, voice: str | None = None, emotion: str | None = None) -> int:
        """Queue text for the TTS source; returns the utterance id."""
        if not hasattr(self.source, "say"):
            raise ValueError("say() needs a text-to-speech source: start with audio.source = \"tts\"")
        if emotion is not None:
            self.set_emotion(emotion)
        return self.source.say(text, voice)

    def push_audio(self, samples: np.ndarray, final: bool = False) -> int:
        """Queue 16 kHz mono float32 speech (chatbot TTS audio); returns the utterance id."""
        if not hasattr(self.source, "push"):
            raise ValueError("push_audio() needs a speech-queue source: start with "
                             "audio.source = \"tts\"")
        return self.source.push(samples, SAMPLE_RATE, 1, final=final)

    def interrupt(self) -> dict[str, Any]:
        """Drop queued speech and return to idle smoothly, effective from the next frame.

        Audio not yet played is muted on the timeline, queued chunks and rendered frames after
        "now" are dropped, and idle motion continuing from the frame on screen refills the gap.
        """
        src = self.source.interrupt() if hasattr(self.source, "interrupt") else None
        nxt = self.player.next_index
        self._epoch += 1
        self._mute_before = max(self._mute_before, self.timeline.end)
        self._muted_utterance = self._utterance       # its hangover tail stays idle too
        self.timeline.silence(nxt * self.spf, self.timeline.end)
        dropped_chunks = 0
        while not self._chunks.empty():
            item = self._chunks.get_nowait()
            if item is None:                          # keep the end-of-stream marker
                self._chunks.put_nowait(None)
                break
            dropped_chunks += 1
        dropped_frames = self.player.clear_after(nxt)
        prev = self._motion_log.get(nxt - 1, self._prev)
        upto = max(self.chunker.emitted // self.spf, nxt)
        if prev is not None and upto > nxt:
            asyncio.ensure_future(self._refill(nxt, upto - nxt, prev.copy(), self._epoch))
        else:
            self._prev = prev
        self.metrics.speaking.set(0)
        if not self._source_events:
            self._emit("speech_finished", interrupted=True, frame=nxt, utterance=self._utterance,
                       sample=nxt * self.spf)
        return {"interrupted": src[0] if isinstance(src, tuple) else None,
                "sample": src[1] if isinstance(src, tuple) else nxt * self.spf,
                "frame": nxt, "dropped_frames": dropped_frames, "dropped_chunks": dropped_chunks}

    async def _refill(self, first: int, n: int, prev: np.ndarray, epoch: int) -> None:
        motion = await self._infer(self.motion.idle, n, prev, first / self.fps)
        if epoch == self._epoch:
            await self._deliver(first, self._scaled(motion), False, epoch)

    async def swap_avatar(self, path: str) -> None:
        """Prepare another portrait in the background; switch between two frames."""
        from .face.landmarks import load_image

        await self.set_avatar(load_image(path))
        self._emit("avatar_swapped", path=str(path), frame=self.player.next_index)

    def subscribe(self, callback: Callable[[str, dict], None]) -> Callable[[], None]:
        """Call ``callback(kind, data)`` on every event; returns the unsubscribe function."""
        def listener(ev: Event) -> None:
            callback(ev.kind, ev.data)

        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener) if listener in self.listeners else None

    def stats(self) -> dict[str, Any]:
        """Counters for `check`, logs and the status API."""
        s = dataclasses.asdict(self.player.stats)
        s.update(chunks_dropped=self.chunks_dropped, frames_buffered=self.player.buffered(),
                 chunks_queued=self._chunks.qsize(), timeline_drift_s=self.timeline.drift_s)
        return s

    def status_line(self) -> str:
        """The figures `check` prints for a running agent, in one log line."""
        from .metrics import rss_bytes

        st = self.player.stats
        total = max(1, st.delivered)
        dropped = st.underruns + st.late_dropped + st.overflow_dropped
        return (f"frames {st.delivered} (speech {st.speech}, idle {st.idle}), dropped {dropped} "
                f"({100 * dropped / total:.2f} %), A/V offset {self.player.latency_s * 1000:.0f} ms, "
                f"clock lateness max {st.lateness_max_s * 1000:.1f} ms, buffered {self.player.buffered()}, "
                f"RSS {rss_bytes() / 1e6:.0f} MB")

    def _emit(self, kind: str, **data: Any) -> None:
        ev = Event(kind, data)
        log.info("%s %s", kind, data)
        for cb in list(self.listeners):
            try:
                cb(ev)
            except Exception:
                log.exception("event listener failed")

    async def _infer(self, fn: Callable[..., R], *args: Any) -> R:
        """Run model work on the inference thread (virtual time is held meanwhile)."""
        loop = asyncio.get_running_loop()
        with self.clock.hold():
            return await loop.run_in_executor(self._pool, fn, *args)


def _init_inference_thread(threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(max(1, threads))
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(max(1, threads))
    except ImportError:
        pass
