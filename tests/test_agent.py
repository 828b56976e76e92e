"""The agent's wiring on a fake clock with fakes for motion/renderer (fast, deterministic).
Real-component end-to-end runs are in tests/test_e2e.py."""

import numpy as np

import dataclasses

from avatar_agent.agent import Agent
from avatar_agent.session import Session
from avatar_agent.types import SegmentStarted
from avatar_agent.clock import FakeClock
from avatar_agent.config import load_config
from avatar_agent.types import SAMPLE_RATE
from tests.fakes import ArraySource, EnergyVad, LevelMotion, LevelRenderer, MemorySink

FPS = 25
SPF = SAMPLE_RATE // FPS


def _speechlike(seconds: float, on: list[tuple[float, float]]) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    x = np.zeros_like(t, dtype=np.float32)
    for a, b in on:
        m = (t >= a) & (t < b)
        x[m] = 0.3 * np.sin(2 * np.pi * 220 * t[m]) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t[m]))
    return x


def _agent(audio, clock, sinks, **over):
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()], use_default_path=False)
    motion = LevelMotion()
    agent = Agent(cfg, source=ArraySource(audio, clock), vad=EnergyVad(), motion=motion,
                  renderer=LevelRenderer(), sinks=sinks, clock=clock,
                  image=np.zeros((64, 64, 3), np.uint8))
    return agent, motion


async def test_every_frame_delivered_once_with_its_audio_and_speech_where_spoken():
    clock = FakeClock()
    audio = _speechlike(6.0, [(1.0, 2.5), (4.0, 4.8)])
    sink = MemorySink()
    agent, motion = _agent(audio, clock, [sink])
    await agent.run()
    n = len(audio) // SPF
    assert [f.index for f in sink.frames] == list(range(n))
    got = np.concatenate([f.audio for f in sink.frames])
    assert np.array_equal(got, audio[: n * SPF])                 # exact audio, in order
    st = agent.player.stats
    assert st.underruns == 0 and st.late_dropped == 0 and st.delivered == n
    speech = np.array([f.speech for f in sink.frames])
    t = np.arange(n) / FPS
    truth = ((t >= 1.0) & (t < 2.5)) | ((t >= 4.0) & (t < 4.8))
    assert (speech & truth).sum() / truth.sum() > 0.9             # spoken frames animated as speech
    v = agent.cfg.vad                                             # only pre-roll + hangover extra
    assert (speech & ~truth).sum() <= 2 * (v.pre_roll_ms + v.hangover_ms + 80) * FPS / 1000
    # Brightness (= fake mouth level) follows the audio level frame by frame: lip sync.
    level = np.array([f.image[0, 0, 0] for f in sink.frames], float)
    rms = np.sqrt(np.mean(audio[: n * SPF].reshape(n, SPF) ** 2, axis=1))
    assert np.corrcoef(level[speech], rms[speech])[0, 1] > 0.95
    assert sink.started == (512, 512, FPS) and sink.closed


async def test_generator_min_hop_sets_the_chunk_hop_and_first_frames_render_alone():
    """A generator that needs longer hops (the tiny MoDA: one DiT window each) gets them."""
    clock = FakeClock()
    audio = _speechlike(3.0, [(0.5, 2.5)])
    cfg = load_config(None, [], use_default_path=False)
    motion = LevelMotion()
    motion.min_hop_ms = 160

    class Counting(LevelRenderer):
        batches: list[int] = []

        def render(self, avatar, m):  # noqa: ANN001, ANN201
            self.batches.append(len(m))
            return super().render(avatar, m)

    renderer = Counting()
    sink = MemorySink()
    agent = Agent(cfg, source=ArraySource(audio, clock), vad=EnergyVad(), motion=motion,
                  renderer=renderer, sinks=[sink], clock=clock, image=np.zeros((64, 64, 3), np.uint8))
    await agent.run()
    sizes = [n for _, n in motion.calls]
    assert max(sizes) == 4 and sizes.count(4) >= len(sizes) - 1     # 160 ms hops (last may be short)
    # Each chunk's first frame (the one due soonest) is rendered alone, the rest in one batch
    # (the first call is the warm-up's rest frame).
    assert renderer.batches[1:5] == [1, 3, 1, 3] and max(renderer.batches) == 3
    assert [f.index for f in sink.frames] == list(range(len(audio) // SPF))
    assert agent.player.stats.late_dropped == 0


async def test_due_time_is_capture_time_plus_latency():
    clock = FakeClock()
    audio = _speechlike(2.0, [(0.5, 1.5)])
    times: list[float] = []

    class Timed(MemorySink):
        async def send(self, frame):
            times.append(clock.now())
            await super().send(frame)

    agent, _ = _agent(audio, clock, [Timed()], **{"player.latency_ms": 400})
    await agent.run()
    cap = np.array([agent.timeline.time_of(i * SPF) for i in range(len(times))])
    assert np.allclose(np.array(times) - cap, 0.4, atol=1e-6)


async def test_failing_sink_and_failing_chunk_do_not_stop_the_agent():
    clock = FakeClock()
    audio = _speechlike(3.0, [(0.5, 2.5)])
    good, bad = MemorySink("good"), MemorySink("bad", fail_every=3)
    agent, motion = _agent(audio, clock, [bad, good])
    real = motion.generate
    calls = {"n": 0}

    def flaky(chunk, prev, *a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("bad chunk")
        return real(chunk, prev, *a)

    motion.generate = flaky
    await agent.run()
    n = len(audio) // SPF
    assert len(good.frames) == n                        # every frame still went out
    assert agent.player.stats.sink_errors == n // 3
    hop = agent.cfg.chunker.hop_ms * FPS // 1000
    assert agent.player.stats.underruns == hop          # the failed chunk's frames repeated


async def test_motion_continuity_prev_is_last_emitted_frame():
    clock = FakeClock()
    audio = _speechlike(2.0, [(0.2, 1.8)])
    seen: list[np.ndarray] = []
    agent, motion = _agent(audio, clock, [MemorySink(keep=False)])
    real = motion.generate

    def spy(chunk, prev, *a):
        seen.append(prev.copy())
        out = real(chunk, prev, *a)
        spy.last = out[-1].copy()
        return out

    motion.generate = spy
    await agent.run()
    assert len(seen) > 3
    assert np.array_equal(agent.animator.prev, spy.last)


async def test_interrupt_mutes_next_frame_and_returns_to_idle_without_gaps():
    import asyncio

    clock = FakeClock()
    audio = _speechlike(4.0, [(0.5, 3.5)])
    sink = MemorySink()
    agent, motion = _agent(audio, clock, [sink])
    session = Session(agent)
    events: list[tuple[str, dict]] = []
    session.subscribe(lambda k, d: events.append((k, d)))
    result = {}

    async def interrupter():
        while agent.player.next_index < 50:          # 2.0 s: mid-utterance
            await clock.sleep_until(clock.now() + 0.01)
        result.update(dataclasses.asdict(session.interrupt()))

    task = asyncio.create_task(interrupter())
    await agent.run()
    await task
    k = result["frame"]
    assert 50 <= k <= 52
    assert result["dropped_frames"] > 0               # rendered speech frames were discarded
    frames = {f.index: f for f in sink.frames}
    assert all(frames[i].speech for i in range(k - 5, k))            # speaking until the request
    after = [frames[i] for i in range(k, int(3.5 * FPS))]
    assert [f.index for f in after if f.speech or f.audio.any()] == []   # silent from the next frame
    assert agent.player.stats.underruns == 0          # the idle refill closed the gap
    assert [f.index for f in sink.frames] == list(range(len(sink.frames)))
    ends = [(d, f) for f in sink.frames for d in [e for e in f.segments]]
    assert any(kind == "speech_finished" and d["interrupted"] and d["frame"] == k
               for kind, d in events)
    assert [(type(m).__name__, m.interrupted, f.index) for m, f in ends
            if not isinstance(m, SegmentStarted)] == [("SegmentEnded", True, k)]
    assert motion.resets == 1                         # the generator was told once


async def test_live_speech_without_phonemes_reaches_the_motion_with_recognised_phones():
    # A microphone gives no phonemes; the agent's phone tracker (pocketsphinx) supplies them,
    # live: each speech chunk the motion generator sees carries the phones of its audio.
    from avatar_agent.audio.vad import WebRtcVad
    from avatar_agent.wiring import make_phones
    from tests.fakes import recorded_voice

    audio = np.concatenate([np.zeros(SAMPLE_RATE // 2, np.float32), recorded_voice(),
                            np.zeros(SAMPLE_RATE, np.float32)])

    async def run(setting: str) -> list:
        clock = FakeClock()
        cfg = load_config(None, [f"audio.recognizer={setting}"], use_default_path=False)
        motion = LevelMotion()
        agent = Agent(cfg, source=ArraySource(audio, clock), vad=WebRtcVad(), motion=motion,
                      renderer=LevelRenderer(), sinks=[MemorySink()], clock=clock,
                      image=np.zeros((64, 64, 3), np.uint8),
                      phones=make_phones(cfg, shared=False))
        await agent.run()
        return [c for c in motion.chunks if c.speech]

    speech = await run("auto")
    assert len(speech) >= 5
    assert sum(bool(c.phonemes) for c in speech) >= len(speech) - 1
    assert {"n", "t", "s"} <= {p.symbol for c in speech for p in c.phonemes}
    assert not any(c.phonemes for c in await run("off"))
