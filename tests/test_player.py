
import numpy as np

from avatar_agent.clock import FakeClock
from avatar_agent.player import AudioTimeline, Player
from avatar_agent.types import SAMPLE_RATE
from tests.fakes import MemorySink

FPS = 25
SPF = SAMPLE_RATE // FPS


def _feed(tl: AudioTimeline, clock: FakeClock, audio: np.ndarray) -> None:
    # The block's last sample arrives now, so sample 0 was captured len/16000 s ago.
    tl.append(0, audio, arrival=clock.now() + len(audio) / SAMPLE_RATE)


async def test_frames_due_on_schedule_with_exact_audio_slices():
    clock = FakeClock()
    tl = AudioTimeline(clock)
    audio = np.arange(SPF * 10, dtype=np.float32) / (SPF * 10)
    _feed(tl, clock, audio)
    sink = MemorySink()
    p = Player(FPS, clock, tl, latency_s=0.2, sinks=[sink])
    p.set_idle_image(np.zeros((8, 8, 3), np.uint8))
    for i in range(10):
        p.push(i, np.full((8, 8, 3), i, np.uint8), speech=i % 2 == 0)
    sent_at = []
    for _ in range(10):
        await p.tick()
        sent_at.append(clock.now())
    base = tl.time_of(0) + 0.2
    assert abs(tl.time_of(0)) < 1e-9
    assert np.allclose(sent_at, base + np.arange(10) / FPS)       # due = capture + latency
    for i, f in enumerate(sink.frames):
        assert f.index == i and f.image[0, 0, 0] == i and f.speech == (i % 2 == 0)
        assert np.array_equal(f.audio, audio[i * SPF:(i + 1) * SPF])
    assert p.stats.delivered == 10 and p.stats.underruns == 0 and p.stats.speech == 5


async def test_late_images_dropped_missing_ones_repeat_last_image():
    clock = FakeClock()
    tl = AudioTimeline(clock)
    _feed(tl, clock, np.zeros(SPF * 6, np.float32))
    sink = MemorySink()
    p = Player(FPS, clock, tl, latency_s=0.0, sinks=[sink])
    p.set_idle_image(np.full((4, 4, 3), 7, np.uint8))
    p.push(0, np.full((4, 4, 3), 1, np.uint8), True)
    await p.tick()                                  # frame 0 rendered
    await p.tick()                                  # frame 1 missing → last image repeated
    assert sink.frames[1].image[0, 0, 0] == 1 and p.stats.underruns == 1
    assert p.push(1, np.zeros((4, 4, 3), np.uint8), True) is False   # too late
    assert p.stats.late_dropped == 1
    assert p.is_late(2) is False and p.is_late(1) is True


async def test_overflow_drops_oldest_and_counts():
    clock = FakeClock()
    tl = AudioTimeline(clock)
    _feed(tl, clock, np.zeros(SPF, np.float32))
    p = Player(FPS, clock, tl, 0.0, sinks=[], capacity=3)
    for i in range(5):
        p.push(i, np.zeros((2, 2, 3), np.uint8), False)
    assert p.buffered() == 3 and p.stats.overflow_dropped == 2
    assert p.clear(3) == 2 and p.buffered() == 1


async def test_a_cleared_next_frame_shows_its_image_silent_unless_replaced_in_time():
    """clear(i) keeps frame i's image as a silent fallback: a fresh frame, not an underrun."""
    clock = FakeClock()
    tl = AudioTimeline(clock)
    _feed(tl, clock, np.zeros(SPF * 6, np.float32))
    sink = MemorySink()
    p = Player(FPS, clock, tl, latency_s=0.0, sinks=[sink])
    for i in range(4):
        p.push(i, np.full((4, 4, 3), 10 + i, np.uint8), True)
    await p.tick()                                  # frame 0
    assert p.clear(1) == 3                          # interrupted: 1, 2, 3 dropped
    await p.tick()                                  # frame 1: no replacement → its own image
    assert sink.frames[1].image[0, 0, 0] == 11 and not sink.frames[1].speech
    p.push(2, np.full((4, 4, 3), 99, np.uint8), False)
    await p.tick()                                  # frame 2: the replacement
    await p.tick()                                  # frame 3: nothing, no fallback → repeat
    assert [f.image[0, 0, 0] for f in sink.frames] == [10, 11, 99, 99]
    assert p.stats.underruns == 1
    p.push(5, np.full((4, 4, 3), 50, np.uint8), False)
    p.clear(5)
    p.push(5, np.full((4, 4, 3), 55, np.uint8), False)   # replaced in time: the new image wins
    await p.tick()
    await p.tick()
    assert sink.frames[-1].image[0, 0, 0] == 55


async def test_failing_sink_does_not_stop_others():
    clock = FakeClock()
    tl = AudioTimeline(clock)
    _feed(tl, clock, np.zeros(SPF * 20, np.float32))
    bad, good = MemorySink("bad", fail_every=1), MemorySink("good")
    p = Player(FPS, clock, tl, 0.0, sinks=[bad, good])
    p.set_idle_image(np.zeros((2, 2, 3), np.uint8))
    for _ in range(20):
        await p.tick()
    assert len(good.frames) == 20 and p.stats.sink_errors == 20


def test_timeline_follows_a_drifting_audio_clock():
    """A sound card 0.05 % slow: the anchor follows it, so frames never run ahead of audio."""
    clock = FakeClock()
    tl = AudioTimeline(clock, window_s=2.0, max_step_s=0.002)
    ratio = 1.0005
    n = 320
    for k in range(0, 16000 * 600 // n):           # 10 minutes of 20 ms blocks
        arrival = (k + 1) * n / SAMPLE_RATE * ratio
        tl.append(k * n, np.zeros(n, np.float32), arrival=arrival)
    end = 16000 * 600
    predicted = tl.time_of(end)
    actual = end / SAMPLE_RATE * ratio
    assert abs(predicted - actual) < 0.02           # 0.3 s of drift tracked to < 20 ms
    assert tl.drift_s > 0.25


def test_timeline_slices_gaps_as_silence():
    clock = FakeClock()
    tl = AudioTimeline(clock)
    tl.append(0, np.ones(320, np.float32))
    tl.append(640, np.full(320, 2.0, np.float32))   # 320..640 never arrived
    s = tl.slice(0, 960)
    assert s[:320].min() == 1 and s[320:640].max() == 0 and s[640:].min() == 2
    assert tl.slice(5000, 10).max() == 0
