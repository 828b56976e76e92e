"""Phone recognition (pocketsphinx, English model from its wheel) on recorded human speech."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import soundfile as sf

from avatar_agent.audio import recognizer
from avatar_agent.audio.recognizer import ARPABET_IPA, phoneme_source, recognize_phonemes
from avatar_agent.clock import FakeClock
from avatar_agent.motion.visemes import ipa_to_visemes
from tests.fakes import recorded_voice



def test_every_model_phone_maps_to_a_viseme():
    for arpa, ipa in ARPABET_IPA.items():
        assert "@" not in ipa_to_visemes(ipa), (arpa, ipa)


def test_recognises_the_phones_of_front_center():
    audio = recorded_voice("Front_Center.wav")                    # "front center"
    ph = recognize_phonemes(audio)
    symbols = [p.symbol for p in ph]
    assert {"n", "t", "s"} <= set(symbols), symbols
    assert symbols.count("ɛ") + symbols.count("ʌ") + symbols.count("ɪ") >= 2, symbols
    starts = [p.start for p in ph]
    assert starts == sorted(starts) and all(p.end > p.start for p in ph)
    assert 0 <= starts[0] and ph[-1].end <= len(audio) / 16000 + 0.02
    # The "s" of "center" comes after the "n t" of "front".
    assert ph[symbols.index("s")].start > ph[symbols.index("n")].start + 0.3
    assert recognize_phonemes(np.zeros(0, np.float32)) == ()


def test_phoneme_source_attaches_phones_to_the_file_frames(tmp_path):
    audio = recorded_voice("Front_Left.wav")
    wav = tmp_path / "speech.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")

    async def run() -> list:
        src = await phoneme_source(wav, FakeClock())
        assert src is not None
        return [f async for f in src.frames()]

    frames = asyncio.run(run())
    samples = np.concatenate([f.samples for f in frames])
    np.testing.assert_allclose(samples[: len(audio)], audio, atol=1e-4)
    tagged = {p.symbol for f in frames for p in f.phonemes}
    assert {"l", "f"} <= tagged, tagged                    # "front left"


def test_without_pocketsphinx_render_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(recognizer, "available", lambda: False)
    assert asyncio.run(phoneme_source(tmp_path / "x.wav", FakeClock())) is None


@pytest.mark.parametrize("name", ["Rear_Right.wav"])
def test_decoding_is_faster_than_real_time(name):
    import time

    audio = recorded_voice(name)
    recognize_phonemes(audio[:1600])                        # model load, once per process
    t = time.perf_counter()
    recognize_phonemes(audio)
    assert time.perf_counter() - t < 0.6 * len(audio) / 16000


# ---- live: PhoneTracker -------------------------------------------------------------------------


def live_chunks(audio: np.ndarray, tracker: recognizer.PhoneTracker | None,
                with_phonemes: tuple = ()) -> list:
    """What the agent's listen task does, frame by frame: tracker, VAD, chunker, annotate.
    Returns (chunk, chunker still in speech when it was emitted) for every chunk."""
    from avatar_agent.audio.resample import frame_audio
    from avatar_agent.audio.vad import WebRtcVad
    from avatar_agent.chunker import Chunker, SpeechChunk
    from avatar_agent.config import chunker_params, load_config

    cfg = load_config(None, [], use_default_path=False)
    chunker, vad = Chunker(chunker_params(cfg, 160)), WebRtcVad()
    out = []
    for frame in frame_audio(audio, with_phonemes):
        if tracker is not None:
            tracker.push(frame)
        for item in chunker.push(frame, vad.is_speech(frame.samples)):
            if isinstance(item, SpeechChunk):
                if tracker is not None:
                    item = tracker.annotate(item)
                out.append((item, chunker.in_speech))
            elif tracker is not None:
                tracker.on_event(item)
    return out


def padded(name: str) -> np.ndarray:
    """A recording with 0.5 s of silence before and 0.8 s after (the VAD ends the utterance)."""
    return np.concatenate([np.zeros(8000, np.float32), recorded_voice(name),
                           np.zeros(12800, np.float32)])


def test_tracker_gives_live_speech_chunks_the_phones_heard_so_far():
    audio = padded("Front_Center.wav")                       # "front center"
    tracker = recognizer.PhoneTracker()
    tracker.prepare()
    chunks = live_chunks(audio, tracker)
    speech = [(c, live) for c, live in chunks if c.speech]
    assert len(speech) >= 5
    assert not any(c.phonemes for c, _ in chunks if not c.speech)
    tagged = [c for c, _ in speech if c.phonemes]
    assert len(tagged) >= len(speech) - 1, "speech chunks without phones"
    for c in tagged:                                        # phones overlap the chunk's audio
        t0, t1 = (c.start - c.left) / 16000, (c.start + c.n_new + c.right) / 16000
        assert all(p.start < t1 and p.end > t0 for p in c.phonemes)
    # Live: chunks emitted while the utterance was still open already had phones, and none of
    # them lay in audio the chunk could not have heard yet (its lookahead is the limit).
    early = [c for c, live in speech if live and c.phonemes]
    assert len(early) >= 3
    for c in early:
        heard = (c.start + c.n_new + c.right) / 16000 + 0.03  # (+ grid rounding)
        assert max(p.start for p in c.phonemes) < heard
    symbols = {p.symbol for c in tagged for p in c.phonemes}
    assert {"n", "t", "s"} <= symbols, symbols               # as the whole-file decode finds
    # the phones sit in the speech: not in the 0.5 s of silence before it
    assert min(p.start for c in tagged for p in c.phonemes) > 0.4


def test_tracker_matches_the_whole_file_decode_once_the_utterance_ends():
    audio = padded("Front_Left.wav")
    tracker = recognizer.PhoneTracker()
    chunks = live_chunks(audio, tracker)
    whole = recognize_phonemes(audio)
    from avatar_agent.types import SpeechChunk

    n = len(audio) // 640 * 640                              # a chunk over all of it, after
    final = tracker.annotate(SpeechChunk(audio[:n], 0, n, 0, 0, True)).phonemes   # SpeechEnded
    assert final, "no final path"
    # The utterance starts at its pre-roll, not at 0: the same phones, timed alike (±30 ms).
    common = [p.symbol for p in final]
    assert len(set(common) & {p.symbol for p in whole}) >= 0.7 * len(set(common))
    first_live = min(p.start for p in final)
    first_whole = min(p.start for p in whole if p.start > 0.3)
    assert abs(first_live - first_whole) < 0.06
    assert any(c.phonemes for c, _ in chunks)


def test_tracker_leaves_tts_speech_to_its_own_phonemes():
    from avatar_agent.types import Phoneme

    audio = padded("Front_Right.wav")
    end = len(audio) / 16000 - 0.8
    # (espeak-ng's phonemes cover its speech from the first sample on)
    own = (Phoneme("a", 0.45, 0.5 * (0.45 + end)), Phoneme("m", 0.5 * (0.45 + end), end))
    tracker = recognizer.PhoneTracker()
    tracker.prepare()
    fed = []
    real = tracker._dec.process_raw
    tracker._dec = _Spy(tracker._dec, lambda *a, **k: (fed.append(1), real(*a, **k))[1])
    chunks = live_chunks(audio, tracker, with_phonemes=own)
    assert fed == [], "TTS speech was decoded"
    speech = [c for c, _ in chunks if c.speech]
    assert speech and all(set(c.phonemes) <= set(own) for c in speech)


class _Spy:
    """The real decoder with ``process_raw`` replaced."""

    def __init__(self, dec, process_raw) -> None:
        self._dec, self.process_raw = dec, process_raw

    def __getattr__(self, name):
        return getattr(self._dec, name)


def test_a_decoder_error_turns_the_tracker_off_and_speech_goes_on(caplog):
    audio = padded("Rear_Left.wav")
    tracker = recognizer.PhoneTracker()
    tracker.prepare()

    def broken(*a, **k):
        raise RuntimeError("decoder state corrupt")

    tracker._dec = _Spy(tracker._dec, broken)
    with caplog.at_level("ERROR"):
        chunks = live_chunks(audio, tracker)
    assert tracker.off
    assert [c for c, _ in chunks if c.speech], "speech chunks still come"
    assert not any(c.phonemes for c, _ in chunks)
    errors = [r for r in caplog.records if "phone recognition failed" in r.getMessage()]
    assert len(errors) == 1                                  # logged once, not per frame


def test_make_phones_follows_audio_recognizer():
    from avatar_agent.config import load_config
    from avatar_agent.wiring import make_phones

    cfg = load_config(None, [], use_default_path=False)
    assert isinstance(make_phones(cfg, shared=False), recognizer.PhoneTracker)
    assert make_phones(cfg, shared=True) is None             # server sessions: off by default
    on = load_config(None, ["audio.recognizer=on"], use_default_path=False)
    assert isinstance(make_phones(on, shared=True), recognizer.PhoneTracker)
    off = load_config(None, ["audio.recognizer=off"], use_default_path=False)
    assert make_phones(off, shared=False) is None
    official = load_config(None, ["avatar.profile=official"], use_default_path=False)
    assert make_phones(official, shared=False) is None


def test_without_pocketsphinx_live_lip_sync_runs_from_the_audio(monkeypatch):
    from avatar_agent.config import load_config
    from avatar_agent.wiring import make_phones

    monkeypatch.setattr(recognizer, "available", lambda: False)
    assert make_phones(load_config(None, [], use_default_path=False), shared=False) is None


def test_an_utterances_last_chunks_keep_its_phones_after_the_next_one_starts():
    # The chunker reports a new utterance's start as soon as it is decided, which can be before
    # the last chunks of the previous one are queued: those still get the previous final path.
    from avatar_agent.audio.resample import frame_audio
    from avatar_agent.chunker import SpeechEnded, SpeechStarted
    from avatar_agent.types import SpeechChunk

    audio = padded("Front_Center.wav")
    n = len(audio) // 640 * 640
    tracker = recognizer.PhoneTracker()
    frames = frame_audio(audio)
    for f in frames[:25]:
        tracker.push(f)
    tracker.on_event(SpeechStarted(1, 8000, 7360, f.index + 320))
    for f in frames[25:]:
        tracker.push(f)
    end = frames[-1].index + 320
    tracker.on_event(SpeechEnded(1, end - 12800, end - 9600, end, "silence"))
    tracker.on_event(SpeechStarted(2, end, end, end))
    tail = SpeechChunk(audio[:n], 0, n, 0, 0, True, utterance=1)
    got = tracker.annotate(tail).phonemes
    assert {"n", "t", "s"} <= {p.symbol for p in got} and all(p.heard for p in got)


def test_check_reports_live_recognition_and_a_missing_recogniser(monkeypatch):
    from avatar_agent.check import run_check
    from avatar_agent.config import load_config

    lines: list[str] = []
    run_check(load_config(None, [], use_default_path=False), out=lines.append)
    text = "\n".join(lines)
    assert "live phone recognition (pocketsphinx, audio.recognizer = auto): on for start, " \
           "off for serve's sessions" in text
    monkeypatch.setattr(recognizer, "available", lambda: False)
    lines.clear()
    code = run_check(load_config(None, ["audio.recognizer=on"], use_default_path=False),
                     out=lines.append)
    text = "\n".join(lines)
    assert code == 1 and "PROBLEM  audio.recognizer = \"on\" but pocketsphinx" in text
