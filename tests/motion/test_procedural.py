"""Procedural lip-sync on real espeak-ng speech: sync, closure, continuity, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from avatar_agent.audio.features import AudioInputError
from avatar_agent.motion.procedural import MotionInputError, ProceduralMotion
from avatar_agent.motion.space import (KP, LIP_KEYPOINTS, eye_opening, exp_points, lip_opening,
                                       transform_keypoints)
from avatar_agent.motion.template import neutral_template, template_avatar, template_rest_motion
from avatar_agent.motion.visemes import (OPEN, PRESS, ROUND, SPREAD, articulation_track, face_unit,
                                         ipa_to_visemes)
from avatar_agent.types import N_KP, PITCH, YAW, MotionGenerator, Phoneme, SpeechChunk

SPF = 640


def envelope(audio: np.ndarray, n: int) -> np.ndarray:
    """Plain RMS per 40 ms frame (full band), computed independently of the generator."""
    return np.sqrt(np.mean(audio[: n * SPF].reshape(n, SPF).astype(np.float64) ** 2, 1))


def best_lag_corr(x: np.ndarray, y: np.ndarray, max_lag: int = 2) -> float:
    n = len(x)
    return max(np.corrcoef(x[max(0, k) : n + min(0, k)], y[max(0, -k) : n - max(0, k)])[0, 1]
               for k in range(-max_lag, max_lag + 1))


def silent_frames(audio: np.ndarray, n: int, margin: int = 3) -> np.ndarray:
    """Frames with no audio energy and no speech within ``margin`` frames (120 ms)."""
    speech = envelope(audio, n) > 1e-4
    near = speech.copy()
    for s in range(1, margin + 1):
        near[s:] |= speech[:-s]
        near[:-s] |= speech[s:]
    return ~near


def stream(gen: ProceduralMotion, audio: np.ndarray, phonemes=(), hop: int = 3200,
           left: int = 1280, right: int = 640, prev: np.ndarray | None = None):
    """Feed audio in 200 ms chunks like the agent does; returns motion and chunk start frames."""
    prev = gen.rest_pose if prev is None else prev
    out, starts = [], []
    n_total = len(audio) // SPF * SPF
    for start in range(0, n_total - hop + 1, hop):
        a, b = max(start - left, 0), min(start + hop + right, len(audio))
        t_a, t_b = a / 16000, b / 16000
        ph = tuple(p for p in phonemes if p.end > t_a and p.start < t_b)
        chunk = SpeechChunk(audio=audio[a:b], start=start, n_new=hop, left=start - a,
                            right=b - start - hop, speech=True, phonemes=ph)
        m = gen.generate(chunk, prev)
        starts.append(len(out) and sum(len(o) for o in out))
        out.append(m)
        prev = m[-1]
    return np.concatenate(out), starts


def mouth_speed(motion: np.ndarray, kp: np.ndarray) -> np.ndarray:
    """Per-frame max displacement of the lip keypoints (canonical units), [T-1]."""
    pts = kp[None] + exp_points(motion)                                  # [T, 21, 3]
    lips = pts[:, list(LIP_KEYPOINTS)]
    return np.linalg.norm(np.diff(lips, axis=0), axis=-1).max(-1)


def head_speed(motion: np.ndarray, kp: np.ndarray) -> np.ndarray:
    """Per-frame max displacement of the driven keypoints (pose + scale + t + exp), [T-1]."""
    x = transform_keypoints(kp, motion)
    return np.linalg.norm(np.diff(x, axis=0), axis=-1).max(-1)


@pytest.fixture()
def gen(avatar) -> ProceduralMotion:
    g = ProceduralMotion(seed=3)
    g.prepare(avatar)
    return g


def test_is_a_motion_generator(gen):
    assert isinstance(gen, MotionGenerator)
    assert gen.profile == "embedded" and gen.fps == 25


def test_template_is_a_neutral_face():
    kp = neutral_template()
    assert kp.shape == (N_KP, 3) and kp.dtype == np.float32
    zero = np.zeros(70, np.float32)
    assert lip_opening(zero, kp) == pytest.approx(0.0, abs=1e-6)       # mouth closed
    assert eye_opening(zero, kp) > 0.03                                  # eyes open
    assert face_unit(kp) == pytest.approx(0.40, abs=1e-6)               # eye distance
    width = kp[KP["jaw_r"], 0] - kp[KP["jaw_l"], 0]
    assert 0.55 < width < 0.87
    assert kp[KP["brow_inner_l"], 1] < kp[KP["upper_lid_l"], 1] < kp[KP["lip_corner_l"], 1] \
        < kp[KP["chin"], 1]                                              # y grows downwards


def test_visemes_from_ipa():
    assert ipa_to_visemes("m") == ["PP"] and ipa_to_visemes("b") == ["PP"]
    assert ipa_to_visemes("f") == ["FF"]
    assert ipa_to_visemes("oʊ") == ["O", "U"]            # diphthong → two shapes
    assert ipa_to_visemes("ˈaɪ") == ["aa", "I"]          # stress mark ignored
    assert ipa_to_visemes("tʃ") == ["CH"]                 # affricate is one class
    assert ipa_to_visemes("uː") == ["U"] and ipa_to_visemes("") == ["sil"]
    assert ipa_to_visemes("☃") == ["@"]                   # unknown → neutral


def test_coarticulation_blends_neighbours():
    # "a m a": the bilabial closes the lips fully at its centre even between open vowels,
    # and the vowels are open.
    ph = [Phoneme("ɑ", 0.0, 0.15), Phoneme("m", 0.15, 0.23), Phoneme("ɑ", 0.23, 0.40)]
    tr = articulation_track(ph, np.array([0.075, 0.19, 0.315]))
    assert tr[1, PRESS] > 0.8 and tr[0, PRESS] < 0.2 and tr[2, PRESS] < 0.2
    assert tr[0, OPEN] > 0.7 and tr[2, OPEN] > 0.7
    # "t" takes its lip shape from the vowel around it (anticipatory rounding in "tu" vs "ti").
    tu = articulation_track([Phoneme("t", 0.0, 0.06), Phoneme("uː", 0.06, 0.25)], np.array([0.03]))
    ti = articulation_track([Phoneme("t", 0.0, 0.06), Phoneme("iː", 0.06, 0.25)], np.array([0.03]))
    assert tu[0, ROUND] > ti[0, ROUND] + 0.3 and ti[0, SPREAD] > tu[0, SPREAD] + 0.3
    # Far from any phoneme the mouth rests closed.
    far = articulation_track(ph, np.array([-1.0, 2.0]))
    assert np.all(far[:, OPEN] < 0.02)


@pytest.mark.parametrize("use_phonemes", [False, True])
def test_mouth_opening_follows_the_speech_envelope(gen, avatar, speech, use_phonemes):
    m = gen.generate_utterance(speech.audio, speech.phonemes if use_phonemes else None)
    assert m.shape == (len(speech.audio) // SPF, 70) and m.dtype == np.float32
    lo = lip_opening(m, avatar.kp_canonical)
    env = envelope(speech.audio, len(m))
    assert best_lag_corr(lo, env) >= 0.6
    u = face_unit(avatar.kp_canonical)
    assert lo.max() > 0.15 * u              # really opens (≥ 6 % of eye distance)
    assert lo.min() > -0.01 * u             # lips never cross


@pytest.mark.parametrize("use_phonemes", [False, True])
def test_mouth_is_closed_in_silence(gen, avatar, speech, use_phonemes):
    m = gen.generate_utterance(speech.audio, speech.phonemes if use_phonemes else None)
    lo = lip_opening(m, avatar.kp_canonical)
    quiet = silent_frames(speech.audio, len(m))
    assert quiet.sum() >= 40                # the 1 s pads and the sentence pause
    closed = lo[quiet] < 0.02 * face_unit(avatar.kp_canonical)
    assert closed.mean() >= 0.95


def test_rounding_and_spreading_from_phonemes(gen, avatar):
    # Corner distance: "ooo" narrower than "eee" in both modes.
    from avatar_agent.audio.tts import synthesize

    def corner_width(text: str, with_ph: bool) -> float:
        u = synthesize(text)
        m = gen.generate_utterance(u.audio, u.phonemes if with_ph else None)
        pts = avatar.kp_canonical[None] + exp_points(m)
        w = pts[:, KP["lip_corner_r"], 0] - pts[:, KP["lip_corner_l"], 0]
        loud = envelope(u.audio, len(m)) > 0.05
        return float(w[loud].mean())

    for with_ph in (True, False):
        assert corner_width("who knew you", with_ph) < corner_width("he sees me", with_ph) - 0.01


@pytest.mark.parametrize("use_phonemes", [False, True])
def test_streaming_is_seamless_and_matches_offline(avatar, speech, use_phonemes):
    ph = speech.phonemes if use_phonemes else ()
    g = ProceduralMotion(seed=3)
    g.prepare(avatar)
    m, starts = stream(g, speech.audio, ph)
    off = g.generate_utterance(speech.audio, ph or None, seed=3)[: len(m)]
    kp = avatar.kp_canonical
    # Velocity at chunk boundaries is no larger than the largest within chunks.
    for speed in (mouth_speed(m, kp), head_speed(m, kp)):
        at_seam = np.zeros(len(speed), bool)
        at_seam[[s - 1 for s in starts if s > 0]] = True
        assert speed[at_seam].max() <= speed[~at_seam].max()
    # And streaming equals the offline result (exactly without phonemes; phonemes beyond a
    # chunk's lookahead are unknown to it, so anticipation differs a little), once the start
    # from prev = rest pose (offline starts mid-sway) has decayed.
    diff = np.abs(lip_opening(m, kp) - lip_opening(off, kp))
    if use_phonemes:
        assert diff.max() <= 0.04 * face_unit(kp) and diff.mean() <= 0.003 * face_unit(kp)
    else:
        assert diff.max() <= 1e-4
    assert np.abs(m[0, PITCH:] - g.rest_pose[PITCH:]).max() < 0.5
    assert np.abs(m[50:, PITCH:] - off[50:, PITCH:]).max() < 1e-3


def test_first_frame_continues_from_a_foreign_prev(gen, avatar, speech):
    prev = gen.rest_pose.copy()
    prev[YAW] += 8.0                                   # e.g. the last frame of another generator
    m, _ = stream(gen, speech.audio[:16000], prev=prev)
    assert abs(m[0, YAW] - prev[YAW]) < 4.0            # no snap: starts near prev …
    assert np.all(np.diff(np.abs(m[:8, YAW] - gen.rest_pose[YAW])) < 0.05)   # … decays …
    assert abs(m[-1, YAW] - gen.rest_pose[YAW]) < 2.5  # … to the idle sway around rest


@pytest.mark.parametrize("use_phonemes", [False, True])
def test_idle_relaxes_from_prev_and_closes_the_mouth(gen, avatar, speech, use_phonemes):
    u = face_unit(avatar.kp_canonical)
    ph = speech.phonemes if use_phonemes else ()
    m, _ = stream(gen, speech.audio[: 16000 + 3200 * 4], ph)   # interrupted mid-speech
    lo_speech = lip_opening(m, avatar.kp_canonical)
    assert lo_speech[-5:].max() > 0.05 * u                       # mouth moving
    prev = m[-1].copy()
    prev[PITCH] += 6.0
    idle = gen.idle(75, prev, t0=3.0)
    assert idle.shape == (75, 70)
    lo = lip_opening(idle, avatar.kp_canonical)
    # The mouth closes without snapping shut in one frame …
    assert abs(lo[0] - lo_speech[-1]) <= max(0.5 * lo_speech[-1], 0.02 * u)
    assert np.all(lo[15:] < 0.01 * u)                            # … and is closed within 0.6 s
    assert abs(idle[0, PITCH] - prev[PITCH]) < 1.0               # no snap
    assert abs(idle[-1, PITCH] - gen.rest_pose[PITCH]) < 2.5     # relaxed to rest (+ sway)
    both = np.concatenate([m, idle])
    assert head_speed(both, avatar.kp_canonical)[len(m) - 1] <= \
        head_speed(both, avatar.kp_canonical).max()
    # A long idle stretch keeps moving (never a frozen frame).
    more = gen.idle(250, idle[-1], t0=6.0)
    assert np.abs(np.diff(more[:, YAW])).max() > 1e-3


def test_rest_pose_closes_a_portrait_with_an_open_mouth():
    kp = neutral_template()
    rest = template_rest_motion(yaw=10.0)
    rest[3 * KP["lower_lip_inner"] + 1] += 0.05                  # photo taken mid-word
    rest[3 * KP["lip_corner_l"] + 1] -= 0.02                     # … with a smile
    av = template_avatar(rest_motion=rest)
    g = ProceduralMotion()
    g.prepare(av)
    assert lip_opening(rest, kp) == pytest.approx(0.05, abs=1e-6)
    assert lip_opening(g.rest_pose, kp) == pytest.approx(0.0, abs=1e-6)
    assert g.rest_pose[YAW] == pytest.approx(10.0)
    silence = g.generate_utterance(np.zeros(32000, np.float32))
    assert np.abs(lip_opening(silence, kp)).max() < 1e-5
    # The smile (a non-mouth-opening part of the portrait's expression) survives.
    corner = kp[KP["lip_corner_l"], 1] + exp_points(silence)[:, KP["lip_corner_l"], 1]
    assert corner.mean() < kp[KP["lip_corner_l"], 1] - 0.01


def test_seed_determinism(avatar, speech):
    a = ProceduralMotion(seed=1)
    a.prepare(avatar)
    b = ProceduralMotion(seed=1)
    b.prepare(avatar)
    audio = speech.audio[:48000]
    np.testing.assert_array_equal(a.generate_utterance(audio, seed=7),
                                  b.generate_utterance(audio, seed=7))
    x, _ = stream(a, audio)
    y, _ = stream(b, audio)
    np.testing.assert_array_equal(x, y)
    c = ProceduralMotion(seed=2)
    c.prepare(avatar)
    z, _ = stream(c, audio)
    assert np.abs(x - z).max() > 1e-3                  # the seed changes blinks and sway
    # generate_utterance does not disturb the streaming state.
    a.reset()
    x2, _ = stream(a, audio)
    a.generate_utterance(audio)
    np.testing.assert_array_equal(x, x2)


def test_bad_and_empty_input(gen, avatar):
    bad = np.zeros(6400, np.float32)
    bad[10] = np.inf
    with pytest.raises(AudioInputError, match="NaN or inf"):
        gen.generate_utterance(bad)
    chunk = SpeechChunk(audio=bad, start=0, n_new=6400, left=0, right=0, speech=True)
    with pytest.raises(AudioInputError, match="NaN or inf"):
        gen.generate(chunk, gen.rest_pose)
    assert gen.generate_utterance(np.zeros(0, np.float32)).shape == (0, 70)
    empty = SpeechChunk(audio=np.zeros(640, np.float32), start=0, n_new=0, left=640, right=0,
                        speech=False)
    assert gen.generate(empty, gen.rest_pose).shape == (0, 70)
    with pytest.raises(MotionInputError, match="multiple of 640"):
        gen.generate(SpeechChunk(np.zeros(1000, np.float32), 0, 1000, 0, 0, True), gen.rest_pose)
    with pytest.raises(MotionInputError, match="prev"):
        gen.idle(3, np.full(70, np.nan, np.float32), 0.0)
    with pytest.raises(ValueError, match="emotion"):
        gen.generate_utterance(np.zeros(640, np.float32), emotion=11)
    with pytest.raises(MotionInputError, match="prepare"):
        ProceduralMotion().idle(3, np.zeros(70, np.float32), 0.0)
    official = template_avatar()
    object.__setattr__(official, "profile", "official")
    with pytest.raises(MotionInputError, match="embedded"):
        ProceduralMotion().prepare(official)


def test_non_speech_chunk_keeps_the_mouth_closed(gen, avatar, speech):
    # A chunk the VAD marked as silence (e.g. loud background noise) does not move the lips.
    noise = np.random.default_rng(0).normal(0, 0.1, 6400).astype(np.float32)
    chunk = SpeechChunk(audio=noise, start=0, n_new=6400, left=0, right=0, speech=False)
    m = gen.generate(chunk, gen.rest_pose)
    assert np.abs(lip_opening(m, avatar.kp_canonical)).max() < 1e-5
    chunk = SpeechChunk(audio=noise, start=6400, n_new=6400, left=0, right=0, speech=True)
    m = gen.generate(chunk, m[-1])
    assert lip_opening(m, avatar.kp_canonical).max() > 0.02 * face_unit(avatar.kp_canonical)
    assert np.all(np.isfinite(m))


def _vowel(f1: float, f2: float, seconds: float = 1.0) -> np.ndarray:
    """A synthetic vowel (pulse train through formant resonators) at a fixed RMS."""
    from scipy.signal import lfilter

    n = int(16000 * seconds)
    x = np.zeros(n)
    x[::133] = 1.0
    for f, bw in ((f1, 80.0), (f2, 100.0), (2800.0, 150.0)):
        r, th = np.exp(-np.pi * bw / 16000), 2 * np.pi * f / 16000
        x = lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], x)
    x = lfilter([1.0], [1.0, -0.9], x)
    return (0.1 * x / np.sqrt(np.mean(x ** 2))).astype(np.float32)


def test_audio_only_jaw_opens_wider_for_open_vowels(avatar):
    # Equal loudness, different first formant: "a" (F1 750 Hz) opens the jaw, "i" (300 Hz) barely.
    opening = {}
    for name, f1, f2 in (("a", 750.0, 1200.0), ("i", 300.0, 2300.0)):
        g = ProceduralMotion()
        g.prepare(avatar)
        m = g.generate_utterance(_vowel(f1, f2))
        opening[name] = float(np.median(lip_opening(m, avatar.kp_canonical)[5:-5]))
    assert opening["a"] > 2.0 * opening["i"] > 0, opening


def _chunks(audio: np.ndarray, phonemes=(), hop: int = 6400, left: int = 1280, right: int = 640):
    n_total = len(audio) // SPF * SPF
    for start in range(0, n_total - hop + 1, hop):
        a, b = max(start - left, 0), min(start + hop + right, len(audio))
        ph = tuple(p for p in phonemes if p.end > a / 16000 and p.start < b / 16000)
        yield SpeechChunk(audio=audio[a:b], start=start, n_new=hop, left=start - a,
                          right=b - start - hop, speech=True, phonemes=ph)


def test_articulate_replaces_the_mouth_and_keeps_the_rest(avatar, speech):
    # Another generator's speech motion (here: rest + random face motion) gets this generator's
    # mouth; brows, lids, head pose and scale stay exactly as given.
    from avatar_agent.motion.space import JAW_KEYPOINTS

    g = ProceduralMotion()
    g.prepare(avatar)
    rng = np.random.default_rng(0)
    mouth = np.array([3 * k + a for k in LIP_KEYPOINTS + JAW_KEYPOINTS for a in range(3)])
    others = np.setdiff1d(np.arange(70), mouth)
    openings = []
    for chunk in _chunks(speech.audio):
        n = chunk.n_new // SPF
        given = (g.rest_pose[None] + rng.normal(0, 0.01, (n, 70))).astype(np.float32)
        out = g.articulate(chunk, given)
        assert out.shape == (n, 70) and out.dtype == np.float32
        np.testing.assert_array_equal(out[:, others], given[:, others])
        openings.append(lip_opening(out, avatar.kp_canonical))
    opening = np.concatenate(openings)
    n = len(opening)
    assert best_lag_corr(opening, envelope(speech.audio, n)) > 0.5
    assert np.abs(opening[silent_frames(speech.audio, n)]).max() < 0.01 * face_unit(avatar.kp_canonical)
    with pytest.raises(MotionInputError, match="motion must be"):
        g.articulate(next(_chunks(speech.audio)), np.zeros((3, 70), np.float32))


def test_articulate_with_phonemes_closes_bilabials_and_rounds(avatar, speech):
    # TTS chunks carry phonemes: p/b/m close the lips, o/u round them (narrower than i/e).
    g = ProceduralMotion()
    g.prepare(avatar)
    out = np.concatenate([g.articulate(c, np.repeat(g.rest_pose[None], c.n_new // SPF, 0))
                          for c in _chunks(speech.audio, speech.phonemes)])
    kp = avatar.kp_canonical
    opening = lip_opening(out, kp)
    pts = kp[None] + exp_points(out)
    width = pts[:, KP["lip_corner_r"], 0] - pts[:, KP["lip_corner_l"], 0]
    frame = lambda p: min(int((p.start + p.end) / 2 * 25), len(out) - 1)  # noqa: E731
    vis = [(ipa_to_visemes(p.symbol), frame(p)) for p in speech.phonemes]
    closed = [f for v, f in vis if v == ["PP"]]
    rounded = [f for v, f in vis if v[0] in ("U", "O") and len(v) == 1]
    spread = [f for v, f in vis if v[0] in ("I", "E") and len(v) == 1]
    assert closed and rounded and spread
    wide = np.percentile(opening, 95)
    assert np.all(opening[closed] <= 0.2 * wide), opening[closed] / wide
    assert np.median(width[rounded]) < 0.9 * np.median(width[spread])


def test_rest_pose_before_prepare_is_a_clear_attribute_error() -> None:
    gen = ProceduralMotion()
    with pytest.raises(MotionInputError, match="prepare"):
        gen.rest_pose  # noqa: B018
    assert not hasattr(gen, "rest_pose")          # AttributeError: protocol checks do not blow up


def test_revised_phones_replace_the_remembered_ones(avatar):
    # Live recognition may relabel the last phone once more audio is heard: the next chunk's
    # phones win on the span they cover, so the mouth follows the revision (a bilabial that
    # turned out to be an open vowel opens the lips), not a blend of both guesses.
    audio = (0.2 * np.sin(np.arange(16000) * 2 * np.pi * 180 / 16000)).astype(np.float32)

    def run(second: tuple) -> np.ndarray:
        g = ProceduralMotion()
        g.prepare(avatar)
        first = (Phoneme("a", 0.0, 0.20), Phoneme("m", 0.20, 0.40))     # the early guess
        c1 = SpeechChunk(audio[:4000], 0, 3200, 0, 800, True, phonemes=first)
        m1 = g.generate(c1, g.rest_pose)
        c2 = SpeechChunk(audio[1600:8000], 3200, 3200, 1600, 1600, True, phonemes=second)
        return g.generate(c2, m1[-1])

    revised = run((Phoneme("a", 0.0, 0.20), Phoneme("ɑ", 0.20, 0.45)))
    kept = run((Phoneme("a", 0.0, 0.20), Phoneme("m", 0.20, 0.45)))
    opening = lip_opening(revised, avatar.kp_canonical)
    closed = lip_opening(kept, avatar.kp_canonical)
    # frames 0.20–0.40 s are chunk 2's first frames (0.20–0.36 s): open after the revision
    assert opening[:4].mean() > 3 * max(closed[:4].mean(), 1e-4), (opening[:4], closed[:4])
    g = ProceduralMotion()
    g.prepare(avatar)
    g._remember((Phoneme("a", 0.0, 0.2), Phoneme("m", 0.2, 0.4)), 0.0)
    known = g._remember((Phoneme("a", 0.0, 0.2), Phoneme("ɑ", 0.2, 0.45)), 0.2)
    assert [p.symbol for p in known] == ["a", "ɑ"]


@pytest.mark.parametrize("path", ["generate", "articulate"])
def test_heard_phones_share_the_mouth_with_the_audio_tts_phones_do_not(avatar, speech, path):
    # A recogniser's phones are guesses: the mouth is half the audio-only estimate and half the
    # visemes.  Here every phone "heard" is an m (lips closed) while the audio is open speech:
    # with heard phones the mouth still opens with the sound (about half as wide as from the
    # audio alone), with the same phones from a TTS (heard=False) it stays closed.
    def run(phones: tuple) -> np.ndarray:
        g = ProceduralMotion()
        g.prepare(avatar)
        out = []
        for c in _chunks(speech.audio, phones):
            if path == "generate":
                out.append(g.generate(c, out[-1][-1] if out else g.rest_pose))
            else:
                out.append(g.articulate(c, np.repeat(g.rest_pose[None], c.n_new // SPF, 0)))
        return lip_opening(np.concatenate(out), avatar.kp_canonical)

    end = len(speech.audio) / 16000
    as_m = lambda heard: (Phoneme("m", 0.0, end, heard=heard),)  # noqa: E731
    audio_only, heard, tts = run(()), run(as_m(True)), run(as_m(False))
    loud = audio_only > np.percentile(audio_only, 75)
    ratio = heard[loud].mean() / audio_only[loud].mean()
    assert 0.35 < ratio < 0.65, ratio
    assert tts[loud].mean() < 0.1 * audio_only[loud].mean()
