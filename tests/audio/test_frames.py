"""The one framing (Framer / frame_audio) and the one pacing (paced / capture_time)."""

from __future__ import annotations

import numpy as np

from avatar_agent.audio.frames import FramesSource, capture_time, paced
from avatar_agent.audio.resample import Framer, frame_audio
from avatar_agent.clock import FakeClock
from avatar_agent.types import FRAME_SAMPLES, SAMPLE_RATE, Phoneme


def test_phonemes_reach_frames_that_later_pushes_and_the_flush_complete():
    fr = Framer()
    p = Phoneme("a", 0.015, 0.05)            # samples 240..800: frames 0, 320, 640
    out = fr.push(np.zeros(100, np.float32), phonemes=[p])   # no frame complete yet
    assert out == []
    out += fr.push(np.zeros(600, np.float32))                # frames 0 and 320
    out += fr.flush()                                         # 640, zero-padded
    assert [f.index for f in out] == [0, 320, 640]
    assert all(f.phonemes == (p,) for f in out)


def test_frame_audio_picks_exactly_the_overlapping_phonemes_out_of_order_input():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(5 * FRAME_SAMPLES + 17).astype(np.float32)
    ph = [Phoneme("b", 0.04, 0.061), Phoneme("a", 0.0, 0.02), Phoneme("long", 0.01, 0.1)]
    frames = frame_audio(x, ph, start=0)
    assert [f.index for f in frames] == [k * FRAME_SAMPLES for k in range(6)]
    np.testing.assert_array_equal(np.concatenate([f.samples for f in frames])[:x.size], x)
    assert not frames[-1].samples[17:].any()
    for f in frames:                          # the brute-force filter, frame by frame
        t0, t1 = f.index / SAMPLE_RATE, (f.index + FRAME_SAMPLES) / SAMPLE_RATE
        want = {p for p in ph if p.start < t1 and p.end > t0}
        assert set(f.phonemes) == want
    assert [p.symbol for p in frames[0].phonemes] == ["a", "long"]
    assert [p.symbol for p in frames[3].phonemes] == ["long", "b"]   # by start; 0.06..0.08 s
    assert frames[5].phonemes == ()                                     # 0.1..0.12 s


async def test_paced_delivers_frame_k_at_its_capture_time_and_closes_its_input():
    clock = FakeClock(start=5.0)
    closed = []

    async def gen():
        try:
            for f in frame_audio(np.zeros(10 * FRAME_SAMPLES, np.float32)):
                yield f
        finally:
            closed.append(True)

    seen = []
    stream = paced(gen(), clock)
    async for f in stream:
        seen.append((f.index, clock.now()))
        if len(seen) == 4:
            break
    await stream.aclose()
    assert closed == [True]                   # the input's finally ran at once
    assert [t for _, t in seen] == [capture_time(5.0, i) for i, _ in seen]
    assert [t for _, t in seen] == [5.0 + 0.02 * (k + 1) for k in range(4)]


async def test_frames_source_plays_from_audio_paced_and_stops_when_closed():
    clock = FakeClock()
    src = FramesSource.from_audio(np.ones(3 * FRAME_SAMPLES + 1, np.float32), clock,
                                  (Phoneme("m", 0.0, 0.01),))
    got = []
    async for f in src.frames():
        got.append((f.index, clock.now(), f.phonemes))
        if len(got) == 2:
            await src.close()
    assert [g[0] for g in got] == [0, 320]
    assert got[1][1] == 0.04
    assert got[0][2] and not got[1][2]
