"""SpeechQueueSource: pacing, TTS and pushed audio on one timeline, interruption, bounds, events."""

from __future__ import annotations

import numpy as np
import pytest

from avatar_agent.audio.queue import (QueueFullError, SpeechQueueSource, StreamError, TooLongError,
                                      pcm_to_array)
from avatar_agent.audio.resample import to_pipeline
from avatar_agent.audio.tts import synthesize
from avatar_agent.clock import FakeClock
from avatar_agent.types import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame


class Recorder:
    """Collects events from a source."""

    def __init__(self, src: SpeechQueueSource) -> None:
        self.events: list[tuple[str, dict]] = []
        src.subscribe(lambda kind, data: self.events.append((kind, dict(data))))

    def of(self, kind: str) -> list[dict]:
        return [d for k, d in self.events if k == kind]


async def take(src: SpeechQueueSource, n: int, clock: FakeClock | None = None,
               times: list[float] | None = None) -> list[AudioFrame]:
    out: list[AudioFrame] = []
    agen = src.frames()
    async for f in agen:
        out.append(f)
        if times is not None and clock is not None:
            times.append(clock.now())
        if len(out) == n:
            break
    await agen.aclose()
    return out


class Stream:
    """One frames() iterator consumed in steps (the timeline continues between steps)."""

    def __init__(self, src: SpeechQueueSource) -> None:
        self.agen = src.frames()

    async def take(self, n: int) -> list[AudioFrame]:
        return [await self.agen.__anext__() for _ in range(n)]


def joined(frames: list[AudioFrame]) -> np.ndarray:
    return np.concatenate([f.samples for f in frames])


async def test_paced_silence_on_a_continuous_timeline() -> None:
    clock = FakeClock(start=100.0)
    src = SpeechQueueSource(clock)
    times: list[float] = []
    frames = await take(src, 6, clock, times)
    assert [f.index for f in frames] == [k * FRAME_SAMPLES for k in range(6)]
    assert times == pytest.approx([100.0 + (k + 1) * 0.02 for k in range(6)])
    assert all(f.samples.shape == (FRAME_SAMPLES,) and not f.samples.any() for f in frames)
    assert src.position == 6 * FRAME_SAMPLES


async def test_say_plays_the_synthesized_audio_with_shifted_phonemes() -> None:
    clock = FakeClock()
    made = []

    def tts(text: str, voice: str, rate: int):          # the real espeak-ng, remembering its output
        made.append(synthesize(text, voice, rate))
        return made[-1]

    src = SpeechQueueSource(clock, synthesize=tts)
    rec = Recorder(src)
    stream = Stream(src)
    await stream.take(3)                              # some silence first: the timeline runs
    uid = src.say("Hello world.")
    frames0 = await stream.take(1)
    (ref,) = made
    assert ref.text == "Hello world." and ref.duration > 0.5
    n = -(-ref.audio.size // FRAME_SAMPLES)
    frames = frames0 + await stream.take(n + 1)
    (started,) = rec.of("speech_started")
    # Virtual time is held during synthesis, so speech starts on the very next frame.
    assert started == {"utterance": uid, "sample": 3 * FRAME_SAMPLES}
    got = joined(frames[:n])
    assert np.array_equal(got[:ref.audio.size], ref.audio)
    assert not got[ref.audio.size:].any() and not joined(frames[n:]).any()
    (fin,) = rec.of("speech_finished")
    assert fin == {"utterance": uid, "sample": 3 * FRAME_SAMPLES + ref.audio.size,
                   "interrupted": False, "started": True}
    # Phonemes ride on the frames they overlap, shifted onto the source timeline.
    off = 3 * FRAME_SAMPLES / SAMPLE_RATE
    carried = {p for f in frames for p in f.phonemes}
    assert {(p.symbol, round(p.start - off, 6)) for p in carried} == \
        {(p.symbol, round(p.start, 6)) for p in ref.phonemes}
    for f in frames:
        for p in f.phonemes:
            assert p.start < f.t + 0.02 and p.end > f.t


async def test_push_any_format_is_resampled_and_queued_in_order() -> None:
    clock = FakeClock()
    src = SpeechQueueSource(clock)
    rec = Recorder(src)
    rng = np.random.default_rng(0)
    stereo48 = (rng.standard_normal((4800, 2)) * 3000).astype(np.int16)   # 100 ms
    mono16 = rng.uniform(-0.5, 0.5, 1000).astype(np.float32)
    a = src.push(stereo48, 48000, 2)
    b = src.push(mono16.tobytes(), 16000, 1, "f32le")
    assert b == a + 1
    frames = await take(src, 12)
    want_a = to_pipeline(stereo48, 48000, 2)
    n_a = -(-want_a.size // FRAME_SAMPLES) * FRAME_SAMPLES
    x = joined(frames)
    assert np.array_equal(x[:want_a.size], want_a)
    assert np.array_equal(x[n_a:n_a + mono16.size], mono16)      # b starts on the next frame
    assert [d["utterance"] for d in rec.of("speech_started")] == [a, b]
    assert [d["sample"] for d in rec.of("speech_started")] == [0, n_a]
    assert [d["sample"] for d in rec.of("speech_finished")] == [want_a.size, n_a + mono16.size]


async def test_streaming_pushes_extend_one_utterance_and_underruns_fill_with_silence() -> None:
    clock = FakeClock()
    src = SpeechQueueSource(clock, prebuffer_ms=100)
    rec = Recorder(src)
    stream = Stream(src)
    x = np.linspace(-0.9, 0.9, 16000, dtype=np.float32)
    uid = src.push(x[:800], final=False)              # 50 ms < prebuffer: not started yet
    f1 = await stream.take(2)
    assert not joined(f1).any() and rec.of("speech_started") == []
    assert src.push(x[800:3200], final=False) == uid  # 200 ms buffered: starts
    f2 = await stream.take(12)                        # 10 frames of audio, then it runs dry
    assert rec.of("speech_started") == [{"utterance": uid, "sample": 2 * FRAME_SAMPLES}]
    assert np.array_equal(joined(f2[:10]), x[:3200])
    assert not joined(f2[10:]).any() and src.underruns == 2
    assert src.current == uid
    assert src.push(x[3200:4000], final=True) == uid
    f3 = await stream.take(3)
    assert np.array_equal(joined(f3)[:800], x[3200:4000])
    (fin,) = rec.of("speech_finished")
    assert fin["utterance"] == uid and fin["sample"] == 2 * FRAME_SAMPLES + 4000 + 2 * FRAME_SAMPLES
    assert src.current is None


async def test_interrupt_drops_everything_not_yet_emitted() -> None:
    clock = FakeClock()
    src = SpeechQueueSource(clock)
    rec = Recorder(src)
    stream = Stream(src)
    tone = (0.5 * np.sin(np.arange(32000) * 0.1)).astype(np.float32)
    a = src.push(tone)
    b = src.push(tone)
    await stream.take(5)
    playing, pos = src.interrupt()
    assert (playing, pos) == (a, 5 * FRAME_SAMPLES)
    after = await stream.take(3)
    assert not joined(after).any()                    # the very next frame is silent
    assert rec.of("speech_finished") == [
        {"utterance": a, "sample": pos, "interrupted": True, "started": True},
        {"utterance": b, "sample": pos, "interrupted": True, "started": False}]
    assert src.pending == 0 and src.queued_seconds == 0
    assert src.interrupt() == (None, 8 * FRAME_SAMPLES)
    c = src.push(tone[:640])                          # the queue works again afterwards
    more = await stream.take(3)
    assert np.array_equal(joined(more)[:640], tone[:640]) and c == b + 1


async def test_interrupt_during_synthesis_discards_its_result() -> None:
    clock = FakeClock()
    src = SpeechQueueSource(clock)
    rec = Recorder(src)
    uid = src.say("This sentence is never heard.")
    src.interrupt()
    frames = await take(src, 40)
    assert not joined(frames).any()
    assert rec.of("speech_started") == []
    assert rec.of("speech_finished") == [{"utterance": uid, "sample": 0, "interrupted": True,
                                          "started": False}]


async def test_bounded_queue_refuses_overflow_and_keeps_what_it_accepted() -> None:
    clock = FakeClock()
    src = SpeechQueueSource(clock, max_queued_s=1.0)
    x = np.full(12800, 0.25, np.float32)             # 0.8 s
    src.push(x)
    with pytest.raises(QueueFullError, match="speech queue full"):
        src.push(np.full(8000, 0.5, np.float32))       # +0.5 s > 1 s
    with pytest.raises(QueueFullError):
        src.say("Hi.")                                   # ≈ 0.7 s: fits alone, not now
    with pytest.raises(TooLongError, match="more than the speech queue ever holds"):
        src.say("A sentence long enough to need more than two tenths of a second.")  # never fits
    assert src.queued_seconds == pytest.approx(0.8)
    frames = await take(src, 45)
    y = joined(frames)
    assert np.array_equal(y[:12800], x) and not y[12800:].any()   # nothing of the refused block


async def test_failed_synthesis_reports_the_error() -> None:
    clock = FakeClock()
    src = SpeechQueueSource(clock)
    rec = Recorder(src)
    uid = src.say("hello", voice="no-such-voice-xx")
    frames = await take(src, 3)
    assert not joined(frames).any()
    (fin,) = rec.of("speech_finished")
    assert fin["utterance"] == uid and not fin["started"]
    assert "no-such-voice-xx" in fin["error"]


def test_bad_input_is_refused_with_clear_errors() -> None:
    src = SpeechQueueSource(FakeClock())
    with pytest.raises(ValueError, match="non-empty"):
        src.say("   ")
    with pytest.raises(ValueError, match="at most"):
        src.say("a" * 20_000)
    with pytest.raises(StreamError, match="whole number"):
        src.push(b"\x00\x01\x02", 16000, 1, "s16le")
    with pytest.raises(StreamError, match="not supported"):
        src.push(b"\x00\x01", 16000, 1, "mp3")
    with pytest.raises(ValueError, match="sample rate"):
        src.push(np.zeros(10, np.int16), 0, 1)
    src.push(np.zeros(320, np.float32), 16000, 1, final=False)
    with pytest.raises(StreamError, match="open stream"):
        src.push(np.zeros(320, np.float32), 48000, 1)


def test_pcm_bytes_decode_like_arrays() -> None:
    x = np.array([0, 1000, -32768, 32767], np.int16)
    assert np.array_equal(pcm_to_array(x.astype("<i2").tobytes(), "s16le"), x)
    f = np.array([0.5, -0.25], np.float32)
    assert np.array_equal(pcm_to_array(f.tobytes(), "float32"), f)


def test_say_from_a_plain_thread_synthesizes_in_the_worker() -> None:
    import threading

    made = []
    main = threading.get_ident()

    def tts(text: str, voice: str, rate: int):
        made.append((threading.get_ident(), synthesize(text, voice, rate)))
        return made[-1][1]

    src = SpeechQueueSource(FakeClock(), synthesize=tts)
    src.say("Hi.")                                    # no event loop in this thread
    for _ in range(500):
        if made and src.queued_seconds == made[0][1].duration:
            break
        threading.Event().wait(0.01)
    (thread, utt), = made
    assert thread != main
    assert src.queued_seconds == utt.duration > 0.1
