"""MoDA DiT: release geometry and conformance with the official code (recipe weights, fp32 CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_agent.nn.moda import PRESETS, RELEASE_PREFIX, MoDADiT, MoDAParams, build_dit, count_parameters
from tests.reference.recipe import load_manifest, recipe_state_dict

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "moda"


def assert_conform(yours: torch.Tensor | np.ndarray, ref: np.ndarray, atol: float, rtol: float = 1e-4) -> None:
    y = yours.detach().cpu().numpy() if isinstance(yours, torch.Tensor) else np.asarray(yours)
    assert y.shape == ref.shape
    err = np.abs(y - ref) - (atol + rtol * np.abs(ref))
    assert err.max() <= 0, f"max excess {err.max():.3g}, max |diff| {np.abs(y - ref).max():.3g}"


def recipe_release_dit() -> MoDADiT:
    torch.set_num_threads(1)
    model = build_dit("release", device="meta").to_empty(device="cpu")
    sd = recipe_state_dict(load_manifest(FIX / "dit_state_dict_manifest.json"))
    model.load_state_dict({k[len(RELEASE_PREFIX):]: v for k, v in sd.items()}, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def release() -> MoDADiT:
    return recipe_release_dit()


def test_release_parameter_count_and_keys() -> None:
    model = build_dit("release", device="meta")
    assert count_parameters(model) == 372_983_878
    manifest = json.loads((FIX / "dit_state_dict_manifest.json").read_text())
    ours = [[RELEASE_PREFIX + k, list(v.shape)] for k, v in model.state_dict().items()]
    assert sorted(ours) == sorted(manifest)
    p = PRESETS["release"]
    assert (p.hidden, p.heads, p.n_four, p.n_two, p.n_single, p.seq_len) == (768, 12, 3, 6, 12, 80)


@pytest.mark.slow
def test_forward_matches_official(release: MoDADiT) -> None:
    inp, ref = np.load(FIX / "inputs.npz"), np.load(FIX / "dit_forward.npz")
    t = lambda k: torch.from_numpy(inp[k])  # noqa: E731
    motion = torch.cat([t("prev_motion").expand(2, 80, 70), t("x_t")], -1)     # [2, 80, 140]
    null = t("null_audio_feat").expand(2, 80, 1, 12, 768)
    audio = torch.cat([t("audio"), null])                                        # [4, 80, 1, 12, 768]
    emo = torch.cat([t("emo_cond"), t("emo_uncond")])
    ident = t("ref_kp")[:, None].repeat(2, 80, 1)                                # [4, 80, 63]
    for step in (1000, 445):
        inter: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            v = release(motion.repeat(2, 1, 1), torch.full((4,), float(step)), audio, emo, ident, inter)
        assert_conform(v[:2], ref[f"v_cond_t{step}"], 2e-4)
        assert_conform(v[2:], ref[f"v_uncond_t{step}"], 2e-4)
        if step == 1000:
            for k in ("time_emb", "emo_emb", "identity_emb"):
                assert_conform(inter[k][:2], ref[f"inter_{k}"], 2e-4)
            for k in ("motion_emb", "audio_emb", "stage4_out", "stage2_out", "stage1_out"):
                assert_conform(inter[k][0], ref[f"inter_{k}_b0"], 2e-4)


def test_tiny_preset_any_length_and_trainable() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    p = MoDAParams(hidden=64, heads=4, audio_dim=80, audio_blocks=1, n_four=1, n_two=1, n_single=1,
                   seq_len=24)
    model = MoDADiT(p)
    assert count_parameters(model) < 2_000_000
    b, n = 3, 17                                                                 # any N works
    motion = torch.randn(b, n, 140)
    audio = torch.randn(b, n, 1, 1, 80)
    emo = torch.tensor([0, 5, p.null_emotion])
    v = model(motion, torch.tensor([1000.0, 500.0, 1.0]), audio, emo, torch.randn(b, 63))
    assert v.shape == (b, n, 70) and torch.isfinite(v).all()
    v.square().mean().backward()
    no_grad = [k for k, q in model.named_parameters() if q.grad is None or not q.grad.abs().sum() > 0]
    assert no_grad == []
    # The emotion label changes the prediction; so does the audio.
    with torch.no_grad():
        base = model(motion, torch.full((b,), 500.0), audio, emo, torch.zeros(b, 63))
        other = model(motion, torch.full((b,), 500.0), audio, torch.tensor([1, 6, 2]), torch.zeros(b, 63))
        quiet = model(motion, torch.full((b,), 500.0), torch.zeros_like(audio), emo, torch.zeros(b, 63))
    assert (base - other).abs().max() > 1e-4 and (base - quiet).abs().max() > 1e-4


def test_tiny_preset_default() -> None:
    model = build_dit("tiny")
    p = model.params
    assert p.motion_dim == 70 and p.hidden % p.heads == 0
    assert 100_000 < count_parameters(model) < 10_000_000


def test_bad_inputs_are_named() -> None:
    model = MoDADiT(MoDAParams(hidden=32, heads=2, audio_dim=8, audio_blocks=1, n_four=1, n_two=1,
                               n_single=1))
    with pytest.raises(ValueError, match="motion"):
        model(torch.zeros(1, 4, 70), torch.ones(1), torch.zeros(1, 4, 1, 1, 8), torch.zeros(1, dtype=torch.long),
              torch.zeros(1, 63))
    with pytest.raises(ValueError, match="audio"):
        model(torch.zeros(1, 4, 140), torch.ones(1), torch.zeros(1, 4, 1, 2, 8), torch.zeros(1, dtype=torch.long),
              torch.zeros(1, 63))
    with pytest.raises(ValueError, match="heads"):
        MoDAParams(hidden=30, heads=4)


def test_traced_dit_matches_eager_and_caches_per_shape() -> None:
    from avatar_agent.nn.moda import TracedDiT

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MoDADiT(MoDAParams(hidden=32, heads=2, audio_dim=8, audio_blocks=1, n_four=1, n_two=1,
                               n_single=1))
    fast = TracedDiT(model, max_shapes=1)

    def args(n: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(2, n, 140), torch.tensor([1000.0, 3.0]), torch.randn(2, n, 1, 1, 8),
                torch.tensor([1, 8]), torch.randn(2, 63))

    a = args(6)
    with torch.no_grad():
        torch.testing.assert_close(fast(*a), model(*a), atol=1e-5, rtol=1e-5)
        b = args(6)                                                              # same shape: reused
        torch.testing.assert_close(fast(*b), model(*b), atol=1e-5, rtol=1e-5)
        c = args(9)                                                              # over max_shapes: eager
        torch.testing.assert_close(fast(*c), model(*c), atol=0, rtol=0)
    assert len(fast._traces) == 1 and fast.failed is None
    # With gradients on it is the model itself (training never goes through a trace).
    out = fast(*a)
    assert out.requires_grad
