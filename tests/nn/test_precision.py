"""Reduced-precision wrappers: bf16 autocast runs on a CPU too, so the plumbing is tested here;
fp16 needs CUDA (tests/test_cuda_conformance.py measures both against the fixtures there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar_agent.motion.moda import MoDAMotion
from avatar_agent.nn.moda import MoDADiT, MoDAParams
from avatar_agent.nn.precision import AutocastDiT, AutocastFeatures, autocast, autocast_dtype
from avatar_agent.types import Avatar, SpeechChunk

SMALL = MoDAParams(hidden=32, heads=2, audio_dim=16, audio_blocks=1, n_four=1, n_two=1, n_single=1,
                   seq_len=16)


def test_names_and_refusals() -> None:
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="precision 'half': use one of fp32, fp16, bf16"):
        autocast_dtype("half")
    with pytest.raises(ValueError, match="needs CUDA"):
        autocast("cpu", "fp16")


def test_dit_under_bf16_is_close_and_float32() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = MoDADiT(SMALL).eval()
    args = (torch.randn(2, 16, 140), torch.tensor([1000.0, 300.0]), torch.randn(2, 16, 1, 1, 16),
            torch.tensor([0, 8]), torch.randn(2, 63))
    with torch.no_grad():
        ref = model(*args)
        low = AutocastDiT(model, "bf16")(*args)
    assert low.dtype == torch.float32 and AutocastDiT(model, "bf16").params is SMALL
    rel = float((low - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 4e-2                       # autocast really ran, within bf16's budget


def test_streaming_generator_takes_the_wrappers() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    seen: list[bool] = []

    def features(audio: np.ndarray) -> torch.Tensor:
        seen.append(torch.is_autocast_enabled("cpu"))
        n = audio.size // 640
        x = torch.from_numpy(audio[: n * 640].reshape(n, 16, 40).copy())
        return (x @ torch.ones(40, 1)).reshape(n, 1, 16)          # a matmul: autocast applies

    mean, std = np.zeros(70, np.float32), np.full(70, 0.05, np.float32)
    mean[63] = 1.3
    gen = MoDAMotion(AutocastDiT(MoDADiT(SMALL).eval(), "bf16"), AutocastFeatures(features, "cpu", "bf16"),
                     mean, std, profile="official", steps=2)
    rest = np.zeros(70, np.float32)
    rest[63] = 1.3
    gen.prepare(Avatar(profile="official", image=np.zeros((8, 8, 3), np.uint8),
                       crop=np.zeros((8, 8, 3), np.uint8), crop_to_image=np.eye(3),
                       kp_canonical=np.zeros((21, 3), np.float32), rest_motion=rest))
    audio = (0.1 * np.random.default_rng(0).standard_normal(640 * 12)).astype(np.float32)
    out = gen.generate(SpeechChunk(audio=audio, start=0, n_new=640 * 6, left=640 * 4, right=640 * 2,
                                   speech=True), rest)
    assert out.shape == (6, 70) and out.dtype == np.float32 and np.isfinite(out).all()
    assert seen == [True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs CUDA")
def test_fp16_on_cuda() -> None:
    torch.manual_seed(0)
    model = MoDADiT(SMALL).eval().cuda()
    args = (torch.randn(2, 16, 140), torch.tensor([1000.0, 300.0]), torch.randn(2, 16, 1, 1, 16),
            torch.tensor([0, 8]), torch.randn(2, 63))
    args = tuple(a.cuda() for a in args)
    with torch.no_grad():
        ref, low = model(*args), AutocastDiT(model, "fp16")(*args)
    assert low.dtype == torch.float32
    assert float((low - ref).abs().max() / ref.abs().max()) < 1e-2


# --------------------------------------------------------------------------------------------
# The config keys: motion.precision (DiT + HuBERT), render.precision (LivePortrait)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def small_official(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """official_motion's loaders return small real networks (no release files on CI)."""
    from avatar_agent import wiring
    from avatar_agent.nn import weights
    from avatar_agent.nn.hubert import build_hubert, hubert_config

    hub = build_hubert(hubert_config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, conv_dim=(16,) * 7,
                                     num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4))
    monkeypatch.setattr(wiring, "require_official_files", lambda cfg, prefixes: tmp_path)
    monkeypatch.setattr(weights, "load_moda_release", lambda path, dev: (MoDADiT(SMALL).eval(), None))
    monkeypatch.setattr(weights, "load_mean_std", lambda path: (np.zeros(70, np.float32),
                                                                np.ones(70, np.float32)))
    monkeypatch.setattr(weights, "load_hubert", lambda path, dev: hub)


def _official(*sets: str):  # noqa: ANN202
    from avatar_agent.config import load_config

    return load_config(None, ["avatar.profile=official", *sets], use_default_path=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal of fp16")
def test_fp16_without_cuda_is_a_one_line_config_error(small_official) -> None:  # noqa: ANN001
    from avatar_agent.config import ConfigError
    from avatar_agent.wiring import make_renderer, official_motion

    with pytest.raises(ConfigError) as e:
        official_motion(_official("motion.precision=fp16"))
    assert str(e.value) == ('motion.precision = "fp16" needs a CUDA GPU and there is none here: '
                            'use "bf16" or "fp32" on a CPU')
    with pytest.raises(ConfigError, match=r'^render.precision = "fp16" needs a CUDA GPU[^\n]*$'):
        make_renderer(_official("render.precision=fp16"))


def test_motion_precision_wraps_the_dit_and_hubert(small_official) -> None:  # noqa: ANN001
    from avatar_agent.wiring import official_motion

    plain = official_motion(_official())
    assert isinstance(plain.moda.model, MoDADiT)                       # fp32: the release as is
    low = official_motion(_official("motion.precision=bf16"))
    assert isinstance(low.moda.model, AutocastDiT) and low.moda.model.precision == "bf16"
    feats = low.moda.features.extract                                 # inside the live streaming
    assert isinstance(feats, AutocastFeatures) and feats.precision == "bf16"


def test_check_shows_the_precisions() -> None:
    from avatar_agent.check import Report, _check_gpu

    r = Report()
    _check_gpu(r, _official("motion.precision=bf16", "render.precision=bf16", "render.compile=compile"))
    lp = "bf16"
    assert any(f"official precision: DiT + HuBERT bf16, LivePortrait {lp}" in ln for ln in r.lines)
    if not torch.cuda.is_available():
        assert any("render.compile = \"compile\" is for CUDA" in ln for ln in r.lines)
        r = Report()
        _check_gpu(r, _official("render.precision=fp16"))
        assert [w for w, _ in r.problems] == ['render.precision = "fp16" needs a CUDA GPU and there is none here']
