"""Model-file manifest, verification and fail-fast fetching (no real downloads)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from avatar_agent import models


def write_manifest(path: Path, entries: list[str]) -> Path:
    path.write_text("\n".join(entries), encoding="utf-8")
    return path


def entry(name: str, **kw: str) -> str:
    fields = {"name": name, "set": "official", "source": "url", "url": "http://127.0.0.1:9/x", **kw}
    return "[[file]]\n" + "\n".join(f'{k} = "{v}"' for k, v in fields.items()) + "\n"


def test_project_manifest_lists_the_official_files() -> None:
    files = models.load_manifest()
    names = {f.name for f in files}
    assert {"moda/net-200.pth", "moda/mean.pt", "audio/chinese-hubert-base/pytorch_model.bin",
            "liveportrait/base_models/appearance_feature_extractor.pth",
            "liveportrait/base_models/motion_extractor.pth", "liveportrait/base_models/warping_module.pth",
            "liveportrait/base_models/spade_generator.pth",
            "liveportrait/retargeting_models/stitching_retargeting_module.pth"} <= names
    mean = next(f for f in files if f.name == "moda/mean.pt")
    assert (mean.sha256_prefix, mean.sha256_suffix) == ("db742e76", "6dfc")
    assert all(f.license for f in files)
    net = next(f for f in files if f.name == "moda/net-200.pth")
    assert (net.source, net.repo, net.path) == ("hf", "lixinyizju/moda", "moda/net-200.pth")


def test_models_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AVATAR_AGENT_MODELS", str(tmp_path / "m"))
    assert models.models_dir() == tmp_path / "m"
    monkeypatch.delenv("AVATAR_AGENT_MODELS")
    assert models.models_dir() == Path.home() / ".local/share/avatar-agent/models"


def test_verify_full_partial_and_missing_hashes(tmp_path: Path) -> None:
    data = b"weights"
    digest = hashlib.sha256(data).hexdigest()
    man = write_manifest(tmp_path / "m.toml", [
        entry("a.bin", sha256=digest), entry("b.bin", sha256_prefix=digest[:8], sha256_suffix=digest[-4:]),
        entry("c.bin"), entry("d.bin", sha256=digest), entry("e.bin", sha256_prefix="00000000"),
    ])
    dest = tmp_path / "models"
    dest.mkdir()
    for n in ("a.bin", "b.bin", "c.bin", "e.bin"):
        (dest / n).write_bytes(data)
    states = {s.file.name: s.state for s in models.verify(dest, manifest=man)}
    assert states == {"a.bin": "ok", "b.bin": "prefix-ok", "c.bin": "unverified", "d.bin": "missing",
                      "e.bin": "mismatch"}
    listed = {s.file.name: s.state for s in models.list_models(dest, manifest=man)}
    assert listed["d.bin"] == "missing" and listed["a.bin"] == "present"


def test_fetch_offline_fails_fast_naming_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    man = write_manifest(tmp_path / "m.toml", [entry("x.bin"), entry("y.bin")])
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "x.bin").write_bytes(b"present")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelsError, match="HF_HUB_OFFLINE.*y.bin"):
        models.fetch("official", tmp_path / "dest", manifest=man)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # Unreachable host (closed local port): an error, quickly, and nothing written.
    t0 = time.monotonic()
    with pytest.raises(models.ModelsError, match="cannot reach 127.0.0.1:9"):
        models.fetch("official", tmp_path / "dest", manifest=man)
    assert time.monotonic() - t0 < 30
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["x.bin"]
    # Everything present and verified: no network needed at all.
    (tmp_path / "dest" / "y.bin").write_bytes(b"present")
    assert all(s.good for s in models.fetch("official", tmp_path / "dest", manifest=man))


def test_hf_entries_probe_the_hf_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    man = write_manifest(tmp_path / "m.toml", [
        '[[file]]\nname = "n.pth"\nset = "official"\nsource = "hf"\nrepo = "o/r"\npath = "n.pth"\n'])
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)     # CI sets it for the whole suite
    with pytest.raises(models.ModelsError, match="cannot reach 127.0.0.1:9"):
        models.fetch("official", tmp_path / "d", manifest=man)


def test_bad_manifest_and_unknown_set(tmp_path: Path) -> None:
    with pytest.raises(models.ModelsError, match="unknown or missing field"):
        models.load_manifest(write_manifest(tmp_path / "a.toml", ['[[file]]\nname = "x"\nset = "s"\nsource = "url"\n'
                                                                   'url = "u"\ncolour = "red"\n']))
    with pytest.raises(models.ModelsError, match="source must be"):
        models.load_manifest(write_manifest(tmp_path / "b.toml", ['[[file]]\nname = "x"\nset = "s"\nsource = "hf"\n']))
    with pytest.raises(models.ModelsError, match="unknown model set 'nope'"):
        models.verify(tmp_path, name="nope")
