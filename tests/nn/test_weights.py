"""Checkpoint loading: strict key checks, clear errors, HuBERT key mapping, our safetensors format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_agent.nn.hubert import HubertFeatures, build_hubert, hubert_config
from avatar_agent.nn.moda import RELEASE_PREFIX, MoDADiT, MoDAParams
from avatar_agent.nn.weights import (
    WeightsError, load_hubert, load_mean_std, load_moda_release, load_moda_state,
    rename_hubert_keys, save_mean_std,
)

SMALL = MoDAParams(hidden=32, heads=2, audio_dim=8, audio_blocks=2, n_four=1, n_two=1, n_single=1,
                   seq_len=8)


def small_model(seed: int = 0) -> MoDADiT:
    torch.manual_seed(seed)
    return MoDADiT(SMALL).eval()


def release_layout(model: MoDADiT) -> dict[str, torch.Tensor]:
    return {RELEASE_PREFIX + k: v.clone() for k, v in model.state_dict().items()}


def test_release_layout_roundtrip_through_file(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    src = small_model(1)
    state = release_layout(src)
    state["scheduler.sigmas"] = torch.arange(1, 1001) / 1000                     # wrapper entries
    state["null_audio_feat"] = torch.full((1, 1, 1, 1, 8), 0.5)
    torch.save(state, tmp_path / "net.pth")
    model, null = load_moda_release(tmp_path / "net.pth", params=SMALL)
    assert null is not None and null.shape == (1, 1, 1, 1, 8) and float(null[0, 0, 0, 0, 3]) == 0.5
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_mismatches_are_all_named() -> None:
    model = small_model()
    state = release_layout(small_model(2))
    del state[RELEASE_PREFIX + "final_layer.linear.bias"]
    state[RELEASE_PREFIX + "blocks.0.bogus.weight"] = torch.zeros(3)
    state[RELEASE_PREFIX + "emo_embedder.embedding_table.weight"] = torch.zeros(10, 32)
    with pytest.raises(WeightsError) as e:
        load_moda_state(state, model)
    msg = str(e.value)
    assert "missing keys 1 (talking_head_dit.final_layer.linear.bias)" in msg
    assert "unexpected keys 1 (talking_head_dit.blocks.0.bogus.weight)" in msg
    assert "emo_embedder.embedding_table.weight: file (10, 32) vs model (9, 32)" in msg


def test_wrong_and_corrupt_checkpoints(tmp_path: Path) -> None:
    model = small_model()
    with pytest.raises(WeightsError, match="not MoDA's net-200.pth"):
        load_moda_state({"state_dict": {}, "epoch": torch.tensor(3)}, model)
    with pytest.raises(WeightsError, match="not MoDA's"):
        load_moda_state(dict(model.state_dict()), model)                         # unprefixed
    bad = tmp_path / "net.pth"
    good = tmp_path / "good.pth"
    torch.save(release_layout(model), good)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])               # truncated download
    with pytest.raises(WeightsError, match="corrupt"):
        load_moda_release(bad, params=SMALL)
    with pytest.raises(WeightsError, match="not found"):
        load_moda_release(tmp_path / "absent.pth", params=SMALL)


def test_mean_std(tmp_path: Path) -> None:
    mean, std = np.linspace(-1, 1, 70).astype(np.float32), np.linspace(0, 2, 70).astype(np.float32)
    save_mean_std(tmp_path / "mean.pt", mean, std)
    m, s = load_mean_std(tmp_path / "mean.pt")
    assert np.array_equal(m, mean) and np.array_equal(s, std)
    torch.save({"mean": torch.zeros(1, 63), "std": torch.ones(1, 63)}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"shape \(1, 63\), expected \[1, 70\]"):
        load_mean_std(tmp_path / "bad.pt")
    torch.save({"avg": torch.zeros(1, 70)}, tmp_path / "bad2.pt")
    with pytest.raises(WeightsError, match="'mean' and 'std'"):
        load_mean_std(tmp_path / "bad2.pt")


def tiny_hubert_config():  # noqa: ANN201 - a transformers HubertConfig
    return hubert_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(32,) * 7, num_conv_pos_embedding_groups=4)


def test_hubert_dir_with_old_weight_norm_names(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tiny_hubert_config()
    ref = build_hubert(cfg)
    ref.config.save_pretrained(str(tmp_path))
    # An upstream-style checkpoint: weight_g/weight_v names and a "hubert." prefix.
    old = {}
    for k, v in ref.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v")
        old["hubert." + k] = v.clone()
    torch.save(old, tmp_path / "pytorch_model.bin")
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original1" in rename_hubert_keys(old)
    loaded = load_hubert(tmp_path)
    audio = np.sin(np.arange(8000) / 5.0).astype(np.float32)
    torch.testing.assert_close(HubertFeatures(loaded)(audio), HubertFeatures(ref)(audio), atol=0, rtol=0)
    # A checkpoint of another geometry is rejected with the mismatching keys named.
    del old["hubert.encoder.layers.1.final_layer_norm.bias"]
    torch.save(old, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="missing keys 1 \\(encoder.layers.1.final_layer_norm.bias\\)"):
        load_hubert(tmp_path)
    with pytest.raises(WeightsError, match="not found"):
        load_hubert(tmp_path / "nope")
