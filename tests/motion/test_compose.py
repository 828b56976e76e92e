"""One composition for both profiles: speech from MoDA, silence from the idle layer.

The official path is exercised with a small MoDA DiT in the official profile (LivePortrait motion
space, rescale ratio, no relative model) and the official idle source, through the same
:class:`SpeechAndIdle` the wiring builds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar_agent.motion import space
from avatar_agent.motion.compose import LID_LOWER, LID_UPPER, LivePortraitIdle, SpeechAndIdle
from avatar_agent.motion.moda import MoDAMotion
from avatar_agent.nn.moda import MoDADiT, MoDAParams
from avatar_agent.types import Avatar, MotionGenerator, SpeechChunk

SMALL = MoDAParams(hidden=32, heads=2, audio_dim=16, audio_blocks=1, n_four=1, n_two=1, n_single=1,
                   seq_len=16)


def band_energy(audio: np.ndarray) -> np.ndarray:
    """Stand-in features: per 40 ms frame, log energy of 16 sample-strided bands."""
    n = audio.size // 640
    frames = audio[: n * 640].reshape(n, 16, 40)
    return np.log(1e-6 + (frames ** 2).mean(-1))[:, None, :].astype(np.float32)


def official_avatar() -> Avatar:
    """A LivePortrait-like source motion: small exp, scale ≈ 1.3, a slightly turned head."""
    rng = np.random.default_rng(3)
    rest = np.zeros(70, np.float32)
    rest[space.EXP] = 0.02 * rng.standard_normal(63)
    rest[space.SCALE] = 1.3
    rest[64:66] = (0.01, -0.02)
    rest[space.POSE] = (4.0, -7.0, 1.5)
    kp = (0.3 * rng.standard_normal((21, 3))).astype(np.float32)
    return Avatar(profile="official", image=np.zeros((8, 8, 3), np.uint8),
                  crop=np.zeros((8, 8, 3), np.uint8), crop_to_image=np.eye(3), kp_canonical=kp,
                  rest_motion=rest)


def official_generator(seed: int = 0) -> SpeechAndIdle:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mean = np.zeros(70, np.float32)
    mean[63] = 1.28646
    std = np.full(70, 0.05, np.float32)
    moda = MoDAMotion(MoDADiT(SMALL), band_energy, mean, std, profile="official", steps=2, seed=seed)
    return SpeechAndIdle(moda, LivePortraitIdle(seed=seed))


def speech(n_frames: int, start_frame: int = 0) -> SpeechChunk:
    rng = np.random.default_rng(start_frame)
    left, right = 640 * 4, 640 * 2
    audio = (0.1 * rng.standard_normal(left + 640 * n_frames + right)).astype(np.float32)
    return SpeechChunk(audio=audio, start=640 * start_frame, n_new=640 * n_frames, left=left,
                       right=right, speech=True)


def blink_events(lid: np.ndarray, threshold: float) -> int:
    closed = lid > threshold
    return int(np.sum(closed[1:] & ~closed[:-1]) + closed[0])


def test_official_silence_is_alive() -> None:
    """10 s of silence: the head sways and breathes, the lids blink, gaze moves: never frozen."""
    gen = official_generator()
    av = official_avatar()
    gen.prepare(av)
    assert isinstance(gen, MotionGenerator) and gen.profile == "official"
    rest = av.rest_motion
    frames = [gen.idle(10, rest, 0.0)]
    for i in range(24):                                  # the agent asks for small batches
        frames.append(gen.idle(10, frames[-1][-1], 0.4 * (i + 1)))
    m = np.concatenate(frames)                           # [250, 70]
    assert m.shape == (250, 70) and m.dtype == np.float32 and np.isfinite(m).all()
    assert (m[:, space.POSE].std(0) > 0.2).all()                       # degrees of sway per axis
    assert m[:, 65].std() > 5e-4                                       # breathing on ty
    upper = m[:, space.exp_index(LID_UPPER[0], 1)] - rest[space.exp_index(LID_UPPER[0], 1)]
    lower = m[:, space.exp_index(LID_LOWER[0], 1)] - rest[space.exp_index(LID_LOWER[0], 1)]
    depth = gen.idle_gen.params.blink_depth
    assert 2 <= blink_events(upper, 0.7 * depth) <= 6                  # blinks every 2-6 s
    assert upper.max() > 0.9 * depth and lower.min() < -0.2 * depth    # lids meet
    both = np.flatnonzero(upper > 0.7 * depth)
    right = m[both, space.exp_index(LID_UPPER[1], 1)] - rest[space.exp_index(LID_UPPER[1], 1)]
    assert (right > 0.6 * depth).all()                                 # both eyes blink together
    # Frame-to-frame steps stay small: living, not jittering.
    assert np.abs(np.diff(m[:, space.POSE], axis=0)).max() < 0.5
    # Batching does not change the motion (the idle layer keeps its own timeline).
    again = official_generator()
    again.prepare(av)
    assert np.allclose(again.idle(250, rest, 0.0), m, atol=1e-5)


def test_speech_to_silence_has_no_jump_and_relaxes_to_rest() -> None:
    gen = official_generator()
    av = official_avatar()
    gen.prepare(av)
    quiet = gen.idle(20, av.rest_motion, 0.0)
    talk = gen.generate(speech(30, start_frame=20), quiet[-1])           # MoDA, conditioned on prev
    assert talk.shape == (30, 70)
    after = gen.idle(100, talk[-1], 2.0)
    jump = np.abs(after[0] - talk[-1])
    distance = np.abs(after[-1] - talk[-1])
    moving = distance > 1e-3
    assert moving.sum() > 10                                           # speech did move the face
    # A hard switch would jump the whole distance; the seam moves a small part of it per frame.
    assert (jump[moving] <= 0.35 * distance[moving] + 1e-4).all()
    # ... and the face ends at the living rest: pose sways around the portrait's, exp back home.
    tail = after[-25:]
    assert np.abs(tail[:, space.POSE].mean(0) - av.rest_motion[space.POSE]).max() < 3.0
    mouth = [space.exp_index(k, a) for k in (6, 12, 14, 17, 19, 20) for a in range(3)]
    assert np.abs(tail[:, mouth] - av.rest_motion[mouth]).max() < 0.1 * np.abs(
        talk[-1, mouth] - av.rest_motion[mouth]).max() + 1e-5
    # Speech again: the speech generator starts from the frame shown last.
    more = gen.generate(speech(10, start_frame=150), after[-1])
    assert more.shape == (10, 70) and np.isfinite(more).all()


def test_idle_timeline_continues_across_calls_and_bad_inputs() -> None:
    gen = official_generator()
    av = official_avatar()
    gen.prepare(av)
    a = gen.idle(30, av.rest_motion, 0.0)
    b = gen.idle(30, a[-1], 1.2)
    ref = official_generator()
    ref.prepare(av)
    assert np.allclose(np.concatenate([a, b]), ref.idle(60, av.rest_motion, 0.0), atol=1e-5)
    with pytest.raises(ValueError, match="official"):
        LivePortraitIdle().prepare(Avatar(profile="embedded", image=av.image, crop=av.crop,
                                          crop_to_image=np.eye(3), kp_canonical=av.kp_canonical,
                                          rest_motion=av.rest_motion))
    with pytest.raises(RuntimeError, match="prepare"):
        LivePortraitIdle().idle(3, av.rest_motion, 0.0)
    with pytest.raises(ValueError, match="prev"):
        gen.idle(3, np.zeros(5, np.float32), 0.0)
    assert gen.idle(0, av.rest_motion, 0.0).shape == (0, 70)



def test_embedded_profile_uses_the_same_composition_and_idle_forks() -> None:
    from avatar_agent.motion.moda import EmbeddedMoDA

    assert issubclass(EmbeddedMoDA, SpeechAndIdle)
    idle = LivePortraitIdle(seed=1)
    other = idle.fork(7)
    av = official_avatar()
    idle.prepare(av)
    other.prepare(av)
    a, b = idle.idle(100, av.rest_motion, 0.0), other.idle(100, av.rest_motion, 0.0)
    assert other.params == idle.params and not np.allclose(a, b)   # its own blinks and sway
