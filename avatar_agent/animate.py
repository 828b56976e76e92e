"""ANIMATE: a chunk → motion continuing from the last emitted frame → rendered images → player.

All model work goes through the shared inference thread, each job ordered by the due time of the
first frame it produces; renders go through the process's :class:`RenderBatcher`, which puts
sessions' requests that wait together into one renderer call where the renderer can (GPU).  Motion continuity: every chunk starts from ``prev``, the last motion
frame handed to the renderer; after :meth:`Animator.clear` it restarts from the motion of the
frame before the cleared ones, and work started earlier delivers nothing (one epoch).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .config import Config
from .inference import Inference
from .metrics import Metrics
from .motion import space
from .player import Player
from .render.batching import RenderBatcher, RenderExpired
from .types import SAMPLE_RATE, Avatar, MotionGenerator, Renderer, SpeechChunk

log = logging.getLogger(__name__)


class Animator:
    """Turns chunks into images in the player's buffer for one avatar."""

    def __init__(self, cfg: Config, motion: MotionGenerator, renderer: Renderer, player: Player,
                 inference: Inference, metrics: Metrics, steering: space.Steering,
                 batcher: RenderBatcher) -> None:
        self.motion, self.renderer, self.player, self.batcher = motion, renderer, player, batcher
        self.inference, self.metrics, self.steering = inference, metrics, steering
        self.fps, self.batch = cfg.player.fps, max(1, cfg.render.batch)
        self.spf = SAMPLE_RATE // self.fps
        self.avatar: Avatar | None = None
        self.prev: np.ndarray | None = None           # last emitted motion frame (continuity)
        self.epoch = 0                                # bumped by clear(): older work is discarded
        self._recent: dict[int, np.ndarray] = {}      # frame index → motion, last few seconds
        self._reset = False

    async def set_avatar(self, image: np.ndarray) -> None:
        """Prepare a portrait and switch to it between two frames (its rest pose is shown until
        the first frame is rendered)."""
        later = self.player.clock.now() + 1.0         # frames due sooner go first
        avatar = await self.inference.run_aside(self.renderer.prepare, image)
        await self.inference.run(later, self.motion.prepare, avatar)
        self.motion.set_emotion(self.steering.emotion, self.steering.intensity)
        rest = np.asarray(self.motion.rest_pose, np.float32)
        frame = (await self.inference.run(later, self.renderer.render, avatar, rest[None]))[0]
        swapped, self.avatar = self.avatar is not None, avatar
        if self.prev is None or swapped:              # a new identity starts from its own rest
            self.prev = rest
        self.player.set_idle_image(frame)

    async def animate(self, chunk: SpeechChunk, speech: bool) -> None:
        """Motion for the chunk's new frames (speech or idle), rendered into the player."""
        assert self.avatar is not None and self.prev is not None
        first, n = chunk.start // self.spf, chunk.n_new // self.spf
        due, epoch, st, t0 = self.player.due(first), self.epoch, self.steering, time.perf_counter()
        if self._reset:                               # after clear(): forget speech history
            self._reset = False
            await self.inference.run(due, self.motion.reset)
            self.motion.set_emotion(st.emotion, st.intensity)
        motion = None
        if speech:
            motion = await self.inference.run(due, self.motion.generate, chunk, self.prev,
                                              st.emotion, st.intensity)
            if not space.valid(motion):               # NaN/inf must never become continuity
                log.error("motion generator returned invalid motion at frame %d; idling", first)
                self.metrics.frames.labels("motion_invalid").inc()
                motion = None
        if motion is None:
            motion = await self.inference.run(due, self.motion.idle, n, self.prev, first / self.fps)
        self.metrics.stage_seconds.labels("motion").observe(time.perf_counter() - t0)
        if epoch == self.epoch:                       # else cleared meanwhile: discard
            await self._deliver(first, st.apply(motion, self.avatar.rest_motion), speech, epoch)

    def clear(self, frame: int) -> None:
        """New epoch: work in flight is discarded; motion continues from frame ``frame − 1``."""
        self.epoch += 1
        self._reset = True
        self.prev = self._recent.get(frame - 1, self.prev)

    async def _deliver(self, first: int, motion: np.ndarray, speech: bool, epoch: int) -> None:
        """Render ``motion`` (frames first, first+1, …) in batches and hand them to the player."""
        avatar, n = self.avatar, len(motion)
        assert avatar is not None                     # animate() runs after set_avatar()
        self.prev = motion[-1].copy()
        self._recent.update((first + k, m) for k, m in enumerate(motion))
        for old in [i for i in self._recent if i < first + n - 4 * self.fps]:
            del self._recent[old]
        # The chunk's first frame is due soonest (its deadline is what the latency budget is
        # for): render it alone, then the rest in batches, which are due 40 ms apart each.
        starts = [0, *range(1, n, self.batch)] if self.batch > 1 else list(range(n))
        for b, e in zip(starts, [*starts[1:], n], strict=True):
            live = [i for i in range(first + b, first + e) if not self.player.is_late(i)]
            if not live:                              # behind: skip work, the clock goes on
                self.metrics.frames.labels("skipped_late").inc(e - b)
                continue
            t1 = time.perf_counter()
            try:
                images = await self.batcher.render(self.player.due(live[0]), avatar,
                                                   motion[[i - first for i in live]],
                                                   expire=self.player.due(live[-1]))
            except RenderExpired:                     # waited past its frames: nothing to show
                self.metrics.frames.labels("skipped_late").inc(len(live))
                continue
            self.metrics.render_seconds.observe(time.perf_counter() - t1)
            if epoch != self.epoch:
                return
            for i, img in zip(live, images, strict=False):
                if self.player.push(i, img, speech):
                    self.metrics.frames_produced.inc()
