"""Chunker: hysteresis, exact tiling of the timeline, context/lookahead, latency."""

from __future__ import annotations

import random

import numpy as np
import pytest

from avatar_agent.audio.resample import Framer, to_pipeline
from avatar_agent.audio.vad import WebRtcVad
from avatar_agent.chunker import (Chunker, ChunkerParams, SpeechEnded, SpeechStarted,
                                  chunk_audio)
from avatar_agent.types import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, Phoneme, SpeechChunk

G = 640  # samples per video frame at 25 fps

# The settings these tests are written against (ChunkerParams has no defaults of its own: the
# product's live in config.py).
BASE = dict(fps=25, hop_ms=160, window_ms=3200, left_context_ms=400, lookahead_ms=80,
            min_speech_ms=60, pre_roll_ms=120, hangover_ms=300, max_utterance_s=30.0)


def params_with(**kw) -> ChunkerParams:
    """The test settings with ``kw`` replaced."""
    return ChunkerParams(**{**BASE, **kw})


def make_frames(x: np.ndarray, start: int = 0) -> list[AudioFrame]:
    fr = Framer(start)
    return fr.push(x) + fr.flush()


def run(frames, decisions, params, offline=False):
    """Push frame by frame; return (outputs, [(position at emission, item)])."""
    ch = Chunker(params, offline=offline)
    log = []
    for f, d in zip(frames, decisions, strict=False):
        for item in ch.push(f, d):
            log.append((ch.position, item))
    for item in ch.flush():
        log.append((None, item))
    return ch, log


def chunks_of(log) -> list[SpeechChunk]:
    return [it for _, it in log if isinstance(it, SpeechChunk)]


def check_tiling(chunks, x: np.ndarray, origin: int, params: ChunkerParams) -> None:
    """Every sample in exactly one chunk's new audio; contexts hold the right samples."""
    g = params.frame_samples
    pos = origin
    for c in chunks:
        assert c.start == pos, "chunks must be contiguous"
        assert c.n_new > 0 and c.n_new % g == 0
        assert (c.start - origin) % g == 0
        assert c.audio.size == c.left + c.n_new + c.right
        assert c.left == min(params.left_context_ms * 16, c.start - origin)
        padded = np.concatenate([x, np.zeros(g, np.float32)])
        lo = c.start - origin - c.left
        np.testing.assert_array_equal(c.audio, padded[lo:lo + c.audio.size])
        pos += c.n_new
    new = np.concatenate([c.new_audio for c in chunks]) if chunks else np.zeros(0, np.float32)
    np.testing.assert_array_equal(new[: x.size], x)
    assert new.size - x.size < g and not new[x.size:].any()


@pytest.fixture(scope="module")
def utterance(speech_wav):
    """1 s silence, an espeak-ng sentence, 1 s silence; at 16 kHz with true speech bounds."""
    s = speech_wav("Hello there, how are you today?", lead_s=1.0, tail_s=1.0)
    return to_pipeline(s.samples, s.rate), s.speech_start, s.speech_end


def test_speech_events_on_real_speech(utterance):
    x, t0, t1 = utterance
    params = params_with()
    frames = make_frames(x, start=3200)  # a timeline that does not start at 0
    vad = WebRtcVad(3, 20)
    decisions = [vad.is_speech(f.samples) for f in frames]
    ch, log = run(frames, decisions, params)
    items = [it for _, it in log]
    starts = [it for it in items if isinstance(it, SpeechStarted)]
    ends = [it for it in items if isinstance(it, SpeechEnded)]
    assert len(starts) == 1 and len(ends) == 1
    hop = params.hop_ms * 16
    st, en = starts[0], ends[0]
    assert abs(st.onset - (3200 + t0 * SAMPLE_RATE)) <= hop
    assert abs(en.offset - (3200 + t1 * SAMPLE_RATE)) <= hop
    assert en.reason == "silence"
    assert st.start <= st.onset - params.pre_roll_ms * 16  # pre-roll included
    assert st.start > st.onset - params.pre_roll_ms * 16 - G
    assert en.end >= en.offset + params.hangover_ms * 16
    assert st.decided_at >= st.onset + params.min_speech_ms * 16

    chunks = chunks_of(log)
    check_tiling(chunks, x, 3200, params)
    # Speech chunks are exactly the utterance [start, end); the rest is silence.
    speech = [c for c in chunks if c.speech]
    assert speech[0].start == st.start and speech[-1].start + speech[-1].n_new == en.end
    assert all(c.utterance == 1 for c in speech) and speech[-1].final
    assert sum(c.final for c in chunks) == 1
    assert all(not c.speech for c in chunks if c.start + c.n_new <= st.start or c.start >= en.end)
    assert all(c.utterance == 0 for c in chunks if c.start < st.start)
    assert all(c.utterance == 1 for c in chunks if c.start >= en.end)
    # SpeechStarted arrives before the first speech chunk.
    pos = lambda obj: next(i for i, it in enumerate(items) if it is obj)  # noqa: E731
    assert pos(st) < pos(speech[0])
    # Streaming hops: hop-sized except where speech begins/ends (and at the end of stream).
    assert all(c.n_new <= hop for c in chunks)
    assert sum(c.n_new != hop for c in chunks) <= 3


def test_lookahead_waits_and_latency_bound(utterance):
    x, _, _ = utterance
    params = params_with()
    frames = make_frames(x)
    vad = WebRtcVad(3, 20)
    ch, log = run(frames, [vad.is_speech(f.samples) for f in frames], params)
    look = params.lookahead_ms * 16
    for pos, c in log:
        if isinstance(c, SpeechChunk) and pos is not None:
            assert c.right == look  # full lookahead while streaming
            assert pos >= c.start + c.n_new + look  # it had arrived
            assert pos - c.start <= ch.latency_ms * 16  # and nothing waited longer than stated
    # hop + max(lookahead, pre_roll + min_speech - one 20 ms frame)
    assert ch.latency_ms == 160 + max(80, 120 + 60 - 20)


@pytest.mark.parametrize("params", [
    params_with(hop_ms=120, lookahead_ms=40, left_context_ms=200, pre_roll_ms=100,
                  min_speech_ms=60, hangover_ms=200, max_utterance_s=1.0),
    params_with(fps=20, hop_ms=200, window_ms=400, lookahead_ms=300, pre_roll_ms=0,
                  min_speech_ms=0),
    params_with(fps=50, hop_ms=100, lookahead_ms=10, pre_roll_ms=30, min_speech_ms=50)],
    ids=["25fps", "20fps", "50fps"])
def test_randomised_decisions_tile_and_respect_latency(params):
    worst = 0
    for trial in range(80):
        r = random.Random(trial)
        dec: list[bool] = []
        n = r.randint(0, 300)
        while len(dec) < n:
            dec += [r.random() < 0.5] * r.choice([1, 2, 3, 5, 10, 20, 60])
        rng = np.random.default_rng(trial)
        x = (0.1 * rng.standard_normal(len(dec) * FRAME_SAMPLES)).astype(np.float32)
        origin = FRAME_SAMPLES * trial
        frames = make_frames(x, start=origin)
        ch, log = run(frames, dec, params)
        check_tiling(chunks_of(log), x, origin, params)
        for pos, c in log:
            if isinstance(c, SpeechChunk) and pos is not None:
                assert pos - c.start <= ch.latency_ms * 16
                worst = max(worst, pos - c.start)
        # Events alternate start/end with increasing utterance ids; speech chunks match them.
        ev = [it for _, it in log if not isinstance(it, SpeechChunk)]
        assert [type(e) for e in ev] == [SpeechStarted, SpeechEnded] * (len(ev) // 2)
        assert [e.utterance for e in ev] == [k // 2 + 1 for k in range(len(ev))]
        regions = [(a.start, b.end) for a, b in zip(ev[::2], ev[1::2], strict=False)]
        for c in chunks_of(log):
            in_region = any(s <= c.start < e for s, e in regions)
            assert c.speech == in_region
            assert not c.speech or any(s <= c.start and c.start + c.n_new <= e for s, e in regions)
    assert worst == ch.latency_ms * 16  # the stated latency is tight, not just an upper bound


def test_silence_and_empty_input():
    params = params_with()
    x = np.zeros(SAMPLE_RATE * 2 + 100, np.float32)
    ch, log = run(make_frames(x), [False] * 200, params)
    chunks = chunks_of(log)
    assert len(log) == len(chunks) and chunks and not any(c.speech for c in chunks)
    check_tiling(chunks, np.zeros(101 * FRAME_SAMPLES, np.float32), 0, params)
    empty = Chunker(params)
    assert empty.flush() == [] and empty.flush() == []
    assert chunk_audio([], [], params_with()) == []


def test_single_click_is_ignored_but_real_speech_is_not():
    params = params_with()
    dec = [False] * 40 + [True] + [False] * 40
    _, log = run(make_frames(np.zeros(81 * FRAME_SAMPLES, np.float32)), dec, params)
    assert not any(isinstance(it, (SpeechStarted, SpeechEnded)) for _, it in log)
    assert not any(c.speech for c in chunks_of(log))
    # Same through the real VAD: a 20 ms noise burst in silence.
    x = np.zeros(SAMPLE_RATE * 2, np.float32)
    x[16000:16320] = 0.5 * np.random.default_rng(0).standard_normal(320)
    frames = make_frames(x)
    vad = WebRtcVad(2, 20)
    _, log = run(frames, [vad.is_speech(f.samples) for f in frames], params)
    assert not any(c.speech for c in chunks_of(log))
    # Three voiced frames (60 ms = min_speech) do start speech.
    dec = [False] * 40 + [True] * 3 + [False] * 40
    _, log = run(make_frames(np.zeros(83 * FRAME_SAMPLES, np.float32)), dec, params)
    assert sum(isinstance(it, SpeechStarted) for _, it in log) == 1


def test_max_utterance_splits_seamlessly():
    params = params_with(max_utterance_s=1.0)
    dec = [False] * 20 + [True] * 200 + [False] * 30
    x = np.zeros(len(dec) * FRAME_SAMPLES, np.float32)
    _, log = run(make_frames(x), dec, params)
    ev = [it for _, it in log if not isinstance(it, SpeechChunk)]
    ends = [e for e in ev if isinstance(e, SpeechEnded)]
    starts = [e for e in ev if isinstance(e, SpeechStarted)]
    assert [e.reason for e in ends[:-1]] == ["max_length"] * (len(ends) - 1)
    assert ends[-1].reason == "silence" and len(starts) == len(ends) >= 4
    for e, s in zip(ends, starts[1:], strict=False):
        assert s.start == e.end  # next utterance starts where the split was: no silence gap
    speech = [c for c in chunks_of(log) if c.speech]
    assert all(speech[k].start + speech[k].n_new == speech[k + 1].start
               for k in range(len(speech) - 1))
    for s, e in zip(starts, ends, strict=False):
        assert e.end - s.start <= 1.0 * SAMPLE_RATE + G


def test_offline_mode_uses_window_and_matches_streaming(utterance):
    x, _, _ = utterance
    params = params_with(window_ms=1200)
    frames = make_frames(x)
    vad = WebRtcVad(3, 20)
    dec = [vad.is_speech(f.samples) for f in frames]
    out = chunk_audio(frames, dec, params, offline=True)
    chunks = [c for c in out if isinstance(c, SpeechChunk)]
    check_tiling(chunks, x, 0, params)
    assert max(c.n_new for c in chunks) == 1200 * 16
    _, log = run(frames, dec, params)
    stream = chunks_of(log)
    # Same speech/silence labelling sample by sample.
    lab = lambda cs: np.concatenate([np.full(c.n_new, c.speech) for c in cs])  # noqa: E731
    np.testing.assert_array_equal(lab(chunks), lab(stream))


def test_phonemes_carried_gaps_filled_and_order_enforced():
    params = params_with(left_context_ms=0, lookahead_ms=0)
    ph = Phoneme("h", 0.10, 0.15)
    ch = Chunker(params)
    out = []
    for k in range(10):
        samples = np.full(FRAME_SAMPLES, 0.01 * k, np.float32)
        phon = (ph,) if 5 <= k <= 7 else ()
        out += ch.push(AudioFrame(samples, k * FRAME_SAMPLES, phon), True)
    out += ch.push(AudioFrame(np.ones(FRAME_SAMPLES, np.float32), 12 * FRAME_SAMPLES), False)
    assert ch.gap_samples == 2 * FRAME_SAMPLES
    with pytest.raises(ValueError, match="back in time"):
        ch.push(AudioFrame(np.ones(FRAME_SAMPLES, np.float32), 0), False)
    out += ch.flush()
    chunks = [c for c in out if isinstance(c, SpeechChunk)]
    new = np.concatenate([c.new_audio for c in chunks])
    assert not new[10 * FRAME_SAMPLES:12 * FRAME_SAMPLES].any()  # the gap became silence
    assert (new[12 * FRAME_SAMPLES:13 * FRAME_SAMPLES] == 1).all()
    with_ph = [c for c in chunks if ph in c.phonemes]
    assert with_ph and all(c.start / SAMPLE_RATE < 0.15 and (c.start + c.n_new) / SAMPLE_RATE
                           > 0.10 for c in with_ph)
    assert all(c.phonemes.count(ph) == 1 for c in with_ph)
    with pytest.raises(RuntimeError, match="after flush"):
        ch.push(AudioFrame(np.ones(FRAME_SAMPLES, np.float32), 13 * FRAME_SAMPLES), False)


@pytest.mark.parametrize("kw,match", [
    (dict(hop_ms=100), "hop_ms"), (dict(fps=30), "fps"), (dict(window_ms=80), "window_ms"),
    (dict(lookahead_ms=-1), "lookahead_ms"), (dict(max_utterance_s=0.05), "max_utterance_s")])
def test_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        params_with(**kw)


def test_other_fps_grid():
    params = params_with(fps=20, hop_ms=200, window_ms=400)  # 800-sample video frames
    dec = [False] * 30 + [True] * 30 + [False] * 40
    x = np.random.default_rng(0).standard_normal(100 * FRAME_SAMPLES).astype(np.float32)
    _, log = run(make_frames(x), dec, params)
    chunks = chunks_of(log)
    assert all(c.n_new % 800 == 0 and c.start % 800 == 0 for c in chunks)
    new = np.concatenate([c.new_audio for c in chunks])
    np.testing.assert_array_equal(new[: x.size], x)
