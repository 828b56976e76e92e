"""Rectified-flow sampler and multi-condition CFG: release conformance + eq. 8 algebra."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_agent.nn.moda import RELEASE_PREFIX, MoDADiT, MoDAParams, build_dit
from avatar_agent.nn.sampling import (Conditions, Guidance, euler_step, guided_velocity, sample,
                                      sample_flow, timesteps)
from tests.reference.recipe import load_manifest, recipe_state_dict

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "moda"


def assert_conform(yours: torch.Tensor, ref: np.ndarray, atol: float, rtol: float = 1e-4) -> None:
    y = yours.detach().cpu().numpy()
    assert y.shape == ref.shape
    err = np.abs(y - ref) - (atol + rtol * np.abs(ref))
    assert err.max() <= 0, f"max excess {err.max():.3g}, max |diff| {np.abs(y - ref).max():.3g}"


@pytest.fixture(scope="module")
def release() -> MoDADiT:
    torch.set_num_threads(1)
    model = build_dit("release", device="meta").to_empty(device="cpu")
    sd = recipe_state_dict(load_manifest(FIX / "dit_state_dict_manifest.json"))
    model.load_state_dict({k[len(RELEASE_PREFIX):]: v for k, v in sd.items()}, strict=True)
    return model.eval()


def release_conditions(b: int) -> Conditions:
    inp = np.load(FIX / "inputs.npz")
    return Conditions(prev=torch.from_numpy(inp["prev_motion"][b : b + 1]),
                      audio=torch.from_numpy(inp["audio"][b : b + 1]),
                      emotion=torch.from_numpy(inp["sample_emo"][b : b + 1]),
                      identity=torch.from_numpy(inp["ref_kp"][b : b + 1]),
                      null_audio=torch.from_numpy(inp["null_audio_feat"]))


def test_timestep_grid_is_the_release_grid() -> None:
    ref = np.load(FIX / "sample_10step_cfg.npz")["timesteps"]
    assert np.array_equal(timesteps(10).numpy(), ref)
    assert timesteps(10).tolist() == [1000, 889, 778, 667, 556, 445, 334, 223, 112, 1]
    with pytest.raises(ValueError):
        timesteps(1)


def test_euler_step_sigma_deltas() -> None:
    x, v = torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
    assert euler_step(x, v, 1000.0, 10).item() == pytest.approx(-0.111, abs=1e-6)
    assert euler_step(x, v, 1.0, 10).item() == pytest.approx(-0.001, abs=1e-7)   # clamped at σ' = 0


@pytest.mark.slow
def test_ten_step_cfg_sampling_matches_official(release: MoDADiT) -> None:
    """Sample 1 (emotion 4 = happiness) end to end; both samples' final step teacher-forced."""
    inp, ref = np.load(FIX / "inputs.npz"), np.load(FIX / "sample_10step_cfg.npz")
    g = Guidance.release(float(inp["cfg_scale"]))
    trace: dict[str, list[torch.Tensor]] = {}
    x0 = sample(release, release_conditions(1), torch.from_numpy(inp["init_noise"][1:2]), g, 10, trace)
    assert_conform(x0[0], ref["x0"][1], 2e-4)
    assert_conform(torch.cat(trace["latents"]), ref["latents_after_step"][:, 1], 2e-4)
    assert_conform(torch.cat(trace["velocity"]), ref["guided_velocity"][:, 1], 2e-4)
    # Sample 0 (release default emotion 8): the last step from the reference latents.
    vel = guided_velocity(release, release_conditions(0), g)
    with torch.no_grad():
        v = vel(torch.from_numpy(ref["latents_after_step"][8, 0:1]), torch.ones(1))
    assert_conform(v[0], ref["guided_velocity"][9, 0], 2e-4)
    assert_conform(euler_step(torch.from_numpy(ref["latents_after_step"][8, 0:1]), v, 1.0, 10)[0],
                   ref["x0"][0], 2e-4)


def tiny_setup() -> tuple[MoDADiT, Conditions, torch.Tensor]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    p = MoDAParams(hidden=32, heads=2, audio_dim=8, audio_blocks=2, n_four=1, n_two=1, n_single=1,
                   seq_len=12)
    model = MoDADiT(p).eval()
    cond = Conditions(prev=torch.randn(2, 1, 70), audio=torch.randn(2, 12, 1, 2, 8),
                      emotion=torch.tensor([3, 4]), identity=torch.randn(2, 63),
                      null_audio=torch.randn(1, 1, 1, 1, 8))
    return model, cond, torch.randn(2, 12, 70)


def raw_velocity(model: MoDADiT, cond: Conditions, x: torch.Tensor, t: torch.Tensor,
                 drop_audio: bool, drop_emotion: bool) -> torch.Tensor:
    audio = cond.null_audio.expand_as(cond.audio) if drop_audio else cond.audio
    emo = torch.full_like(cond.emotion, 8) if drop_emotion else cond.emotion
    motion = torch.cat([cond.prev.expand(-1, x.shape[1], -1), x], -1)
    return model(motion, t, audio, emo, cond.identity)


@torch.no_grad()
def test_release_cfg_is_eq8_with_one_joint_condition() -> None:
    model, cond, x = tiny_setup()
    t = torch.full((2,), 556.0)
    v_c = raw_velocity(model, cond, x, t, False, False)
    v_u = raw_velocity(model, cond, x, t, True, True)
    got = guided_velocity(model, cond, Guidance.release(1.2))(x, t)
    torch.testing.assert_close(got, v_u + 1.2 * (v_c - v_u), atol=1e-5, rtol=1e-5)
    lam = 0.2                                                                    # eq. 8 form
    torch.testing.assert_close(got, (1 + lam) * v_c - lam * v_u, atol=1e-5, rtol=1e-5)
    # No guidance: a single conditional pass.
    torch.testing.assert_close(guided_velocity(model, cond, Guidance())(x, t), v_c, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_per_condition_guidance_eq8() -> None:
    model, cond, x = tiny_setup()
    t = torch.full((2,), 223.0)
    v_c = raw_velocity(model, cond, x, t, False, False)
    v_a = raw_velocity(model, cond, x, t, True, False)                           # audio dropped
    v_e = raw_velocity(model, cond, x, t, False, True)                           # emotion dropped
    g = Guidance(audio=1.5, emotion=0.7)
    want = (1 + 1.5 + 0.7) * v_c - 1.5 * v_a - 0.7 * v_e
    torch.testing.assert_close(guided_velocity(model, cond, g)(x, t), want, atol=1e-5, rtol=1e-5)
    # Emotion guidance actually moves the sample.
    a = sample(model, cond, x, Guidance(audio=1.5), steps=4)
    b = sample(model, cond, x, g, steps=4)
    assert (a - b).abs().max() > 1e-4


@torch.no_grad()
def test_sampling_is_deterministic_and_uses_every_step() -> None:
    model, cond, x = tiny_setup()
    trace: dict[str, list[torch.Tensor]] = {}
    out = sample(model, cond, x, Guidance.release(), steps=5, trace=trace)
    assert len(trace["latents"]) == 5 and torch.equal(trace["latents"][-1], out)
    assert torch.equal(out, sample(model, cond, x, Guidance.release(), steps=5))


@torch.no_grad()
def test_skipping_the_final_step_saves_one_evaluation_and_moves_x_by_a_thousandth() -> None:
    model, cond, x = tiny_setup()
    full: dict[str, list[torch.Tensor]] = {}
    short: dict[str, list[torch.Tensor]] = {}
    a = sample(model, cond, x, Guidance(), steps=4, trace=full)
    b = sample(model, cond, x, Guidance(), steps=4, trace=short, final_step=False)
    assert len(short["velocity"]) == 3 and len(full["velocity"]) == 4
    torch.testing.assert_close(b, full["latents"][2], atol=0, rtol=0)          # same first 3 steps
    torch.testing.assert_close(a, b - 0.001 * full["velocity"][3], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_after_step_hook_sees_each_new_sigma_and_replaces_x() -> None:
    """The one Euler loop takes a hook (inpainting uses it): called after every step with the σ
    just reached; what it returns is the next step's input."""
    model, cond, x = tiny_setup()
    velocity = guided_velocity(model, cond, Guidance())
    seen: list[float] = []

    def hook(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(float(sigma))
        return x

    plain = sample_flow(velocity, x, steps=4)
    assert torch.equal(sample_flow(velocity, x, steps=4, after_step=hook), plain)
    assert seen == pytest.approx([2 / 3 + 1e-3 / 3, 1 / 3 + 2e-3 / 3, 1e-3, 0.0], abs=1e-6)
    pinned = sample_flow(velocity, x, steps=4, after_step=lambda x, s: torch.zeros_like(x))
    assert torch.equal(pinned, torch.zeros_like(x))
