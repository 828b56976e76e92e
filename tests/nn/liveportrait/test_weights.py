"""Strict loading of the release's checkpoint files: key checks, spectral-norm folding, errors."""

from pathlib import Path

import pytest
import torch
from torch import nn

from avatar_agent.nn.liveportrait.spade import SpadeGenerator, SpadeResBlock
from avatar_agent.nn.liveportrait.stitching import StitchingRetargeting
from avatar_agent.nn.liveportrait.weights import (
    MODULE_FILES, WeightsError, build_modules, check_keys, find_weight_files, fold_spectral_norm,
    load_state, load_stitching, official_manifest, read_checkpoint)
from tests.nn.liveportrait.helpers import MANIFESTS, recipe

torch.set_num_threads(1)


def test_module_key_sets_equal_the_release_manifests() -> None:
    import json
    mods = build_modules()
    for name, mod in zip(MODULE_FILES, mods.all(), strict=False):
        ref = {k: tuple(s) for k, s in json.loads((MANIFESTS / f"{name}.json").read_text())}
        assert official_manifest(mod) == ref, name


def test_parameter_counts_match_the_release() -> None:
    import json
    summary = json.loads((MANIFESTS / "summary.json").read_text())
    mods = build_modules()
    for name, mod in zip(MODULE_FILES, mods.all(), strict=False):
        elems = sum(int(torch.Size(s).numel()) for s in official_manifest(mod).values())
        assert elems == summary[name]["state_dict_elements"], name
        assert len(official_manifest(mod)) == summary[name]["tensors"], name


def test_errors_name_missing_extra_and_misshaped_keys() -> None:
    sd = recipe("stitching_retargeting_module")
    sd.pop("retarget_eye.mlp.10.bias")
    sd["retarget_eye.mlp.12.weight"] = torch.zeros(1)
    sd["retarget_mouth.mlp.0.weight"] = torch.zeros(128, 64)
    with pytest.raises(WeightsError) as e:
        load_state(StitchingRetargeting(), sd, "S.pth")
    msg = str(e.value)
    assert "S.pth" in msg
    assert "missing 1 keys: retarget_eye.mlp.10.bias" in msg
    assert "unexpected 1 keys: retarget_eye.mlp.12.weight" in msg
    assert "retarget_mouth.mlp.0.weight: shape (128, 64) in file, network expects (128, 65)" in msg
    assert "avatar-agent models fetch official" in msg


def test_spectral_norm_fold_equals_torch_spectral_norm_in_eval() -> None:
    torch.manual_seed(0)
    block = SpadeResBlock(8, 4, label_nc=6, hidden=5)
    ref = SpadeResBlock(8, 4, label_nc=6, hidden=5)
    for name in ("conv_0", "conv_1", "conv_s"):
        nn.utils.spectral_norm(getattr(ref, name))
    ref.train()
    x, seg = torch.randn(2, 8, 6, 6), torch.randn(2, 6, 3, 3)
    ref(x, seg)                                                      # one power iteration: u, v ≠ init
    ref.eval()
    sd = fold_spectral_norm(ref.state_dict(), {"conv_0", "conv_1", "conv_s"})
    block.load_state_dict(sd, strict=True)
    block.eval()
    with torch.no_grad():
        assert torch.allclose(block(x, seg), ref(x, seg), atol=1e-6, rtol=0)


def test_spade_file_folds_at_load() -> None:
    sd = recipe("spade_generator")
    g = load_state(SpadeGenerator(), sd, "G")
    w, u, v = (sd[f"up_1.conv_s.weight_{s}"] for s in ("orig", "u", "v"))
    sigma = u @ (w.reshape(w.shape[0], -1) @ v)
    assert torch.equal(g.up_1.conv_s.weight, w / sigma)
    assert "up_1.conv_s.weight" in g.state_dict() and "up_1.conv_s.bias" not in g.state_dict()


def test_stitching_file_strips_module_prefix_and_requires_subdicts() -> None:
    sd = recipe("stitching_retargeting_module")
    obj = {s: {f"module.{k[len(s) + 1:]}": v for k, v in sd.items() if k.startswith(s + ".")}
           for s in ("retarget_shoulder", "retarget_mouth", "retarget_eye")}
    obj["extra_thing"] = torch.zeros(3)                              # ignored: only 3 sub-dicts read
    s = load_stitching(StitchingRetargeting(), obj, "S")
    assert torch.equal(s.retarget_eye.mlp[10].bias, sd["retarget_eye.mlp.10.bias"])
    del obj["retarget_mouth"]
    with pytest.raises(WeightsError, match="retarget_mouth"):
        load_stitching(StitchingRetargeting(), obj, "S")


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "warping_module.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="corrupt"):
        read_checkpoint(bad)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="state dict"):
        read_checkpoint(tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(WeightsError) as e:
        find_weight_files(tmp_path)
    msg = str(e.value)
    for fname in ("appearance_feature_extractor.pth", "motion_extractor.pth", "spade_generator.pth",
                  "stitching_retargeting_module.pth"):
        assert fname in msg
    assert "avatar-agent models fetch official" in msg


def test_check_keys_accepts_exact_match() -> None:
    check_keys({"a": torch.zeros(2)}, {"a": (2,)}, "x")
    with pytest.raises(WeightsError):
        check_keys({"a": torch.zeros(3)}, {"a": (2,)}, "x")


def test_missing_files_named_in_the_fetch_layout(tmp_path: Path) -> None:
    """Below a models dir the error names <dir>/liveportrait/... (models/manifest.toml layout)."""
    with pytest.raises(WeightsError) as e:
        find_weight_files(tmp_path)
    assert str(tmp_path / "liveportrait" / "base_models" / "warping_module.pth") in str(e.value)
    assert str(tmp_path / "liveportrait" / "retargeting_models" / "stitching_retargeting_module.pth") \
        in str(e.value)


def test_finds_files_in_the_fetch_layout(tmp_path: Path) -> None:
    for name, fname in MODULE_FILES.items():
        sub = "retargeting_models" if name.startswith("stitching") else "base_models"
        p = tmp_path / "liveportrait" / sub / fname
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    found = find_weight_files(tmp_path)
    assert found["spade_generator"] == tmp_path / "liveportrait" / "base_models" / "spade_generator.pth"
