"""RenderBatcher: render requests of several sessions that wait together become one W + G call
(tiny LivePortrait presets on the real inference thread)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_agent.clock import SystemClock
from avatar_agent.inference import Inference
from avatar_agent.nn.liveportrait.weights import build_modules
from avatar_agent.render.batching import RenderBatcher
from avatar_agent.render.liveportrait import LivePortraitRenderer, RenderInputError
from tests.nn.liveportrait.helpers import fixture
from tests.render.test_liveportrait_gpu_path import WarpCalls, motions

torch.set_num_threads(1)
PORTRAIT = Path(__file__).resolve().parents[2] / "avatars" / "default.png"


@pytest.fixture(scope="module")
def lp() -> LivePortraitRenderer:
    torch.manual_seed(0)
    return LivePortraitRenderer(build_modules("tiny"), device="cpu", max_batch=16)


async def _three_sessions(batcher: RenderBatcher, inference: Inference, jobs: list) -> list:
    """Submit the jobs while the inference thread is busy, then let it go."""
    gate = threading.Event()
    blocker = asyncio.ensure_future(inference.run(0.0, gate.wait))
    await asyncio.sleep(0.05)                         # the thread is now inside gate.wait
    tasks = [asyncio.ensure_future(batcher.render(due, av, m)) for due, av, m in jobs]
    await asyncio.sleep(0.05)                         # all three requests queued behind it
    gate.set()
    await blocker
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_waiting_sessions_share_one_warp_call(lp: LivePortraitRenderer) -> None:
    src = fixture("source")["source_rgb_u8"]
    a1, a2 = lp.prepare_crop(src), lp.prepare_crop(np.ascontiguousarray(255 - src[:, ::-1]))
    m1, m2, m3 = motions(a1, 2, 1), motions(a2, 3, 2), motions(a1, 1, 3)
    alone = [lp.render(a1, m1), lp.render(a2, m2), lp.render(a1, m3)]
    inference = Inference(SystemClock())
    try:
        batcher = RenderBatcher(lp, inference)
        calls = WarpCalls(lp)
        outs = await _three_sessions(batcher, inference, [(2.0, a1, m1), (1.0, a2, m2), (3.0, a1, m3)])
        assert calls.sizes == [6] and batcher.calls == 1              # 2 + 3 + 1 frames, one call
        for got, ref in zip(outs, alone, strict=True):
            assert got.shape == ref.shape and np.abs(got.astype(int) - ref).max() <= 1
        # Alone (nothing else waiting) a request is its own call.
        calls.sizes.clear()
        one = await batcher.render(0.0, a2, m2)
        assert calls.sizes == [3] and np.abs(one.astype(int) - alone[1]).max() <= 1
    finally:
        inference.close()


async def test_max_frames_and_a_bad_request_stay_apart(lp: LivePortraitRenderer) -> None:
    av = lp.prepare_crop(fixture("source")["source_rgb_u8"])
    bad = np.full((2, 70), np.nan, np.float32)
    inference = Inference(SystemClock())
    try:
        batcher = RenderBatcher(lp, inference, max_frames=4)
        calls = WarpCalls(lp)
        outs = await _three_sessions(batcher, inference, [(1.0, av, motions(av, 3)),
                                                         (2.0, av, bad), (3.0, av, motions(av, 2))])
        assert isinstance(outs[1], RenderInputError)                 # only its own session fails
        assert outs[0].shape[0] == 3 and outs[2].shape[0] == 2
        assert sorted(calls.sizes) == [2, 3]                         # 3 + 2 > max_frames: two calls
    finally:
        inference.close()
    with pytest.raises(ValueError, match="max_frames"):
        RenderBatcher(lp, inference, max_frames=0)


async def test_two_workers_serve_every_request_once(lp: LivePortraitRenderer) -> None:
    """With two inference workers a request can be taken into another worker's batch while its
    own job starts: that job waits for the frames instead of rendering them again."""
    av = lp.prepare_crop(fixture("source")["source_rgb_u8"])
    ms = [motions(av, k % 3 + 1, seed=k) for k in range(8)]
    ref = [lp.render(av, m) for m in ms]
    inference = Inference(SystemClock(), workers=2)
    try:
        batcher = RenderBatcher(lp, inference, max_frames=5)
        calls = WarpCalls(lp)
        outs = await asyncio.gather(*(batcher.render(float(k), av, m) for k, m in enumerate(ms)))
        for got, want in zip(outs, ref, strict=True):
            assert np.abs(got.astype(int) - want).max() <= 1
        assert sum(calls.sizes) == sum(len(m) for m in ms)           # every frame rendered once
    finally:
        inference.close()


async def test_a_renderer_without_render_many_renders_each_request_in_its_own_job() -> None:
    from avatar_agent.face.landmarks import load_image
    from avatar_agent.render.warp import WarpRenderer

    r = WarpRenderer(size=128)
    av = r.prepare(load_image(PORTRAIT))
    m = np.repeat(av.rest_motion[None], 2, 0)
    inference = Inference(SystemClock())
    try:
        batcher = RenderBatcher(r, inference)
        outs = await _three_sessions(batcher, inference, [(1.0, av, m), (2.0, av, m[:1]), (3.0, av, m)])
        assert [o.shape[0] for o in outs] == [2, 1, 2] and batcher.calls == 3
        assert np.array_equal(outs[1][0], r.render(av, m[:1])[0])
    finally:
        inference.close()


async def test_a_request_taken_after_its_frames_were_due_is_not_rendered(
        lp: LivePortraitRenderer) -> None:
    """Under overload a render that starts after its last frame's due time would only be thrown
    away as late: it is skipped (RenderExpired), and the requests still in time render as usual."""
    from avatar_agent.render.batching import RenderExpired

    av = lp.prepare_crop(fixture("source")["source_rgb_u8"])
    clock = SystemClock()
    inference = Inference(clock)
    try:
        batcher = RenderBatcher(lp, inference)
        calls = WarpCalls(lp)
        gate = threading.Event()
        blocker = asyncio.ensure_future(inference.run(0.0, gate.wait))
        await asyncio.sleep(0.05)                     # the thread is busy (a stall)
        now = clock.now()
        stale = asyncio.ensure_future(batcher.render(now, av, motions(av, 3), expire=now + 0.05))
        fresh = asyncio.ensure_future(batcher.render(now + 0.01, av, motions(av, 2),
                                                     expire=now + 60.0))
        await asyncio.sleep(0.2)                      # the stale request's frames are now past
        gate.set()
        await blocker
        with pytest.raises(RenderExpired):
            await stale
        assert (await fresh).shape[0] == 2
        assert calls.sizes == [2]                     # only the request still in time rendered
    finally:
        inference.close()
