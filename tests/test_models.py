"""Model-file manifest, verification and fail-fast fetching (no downloads; see test_fetch.py)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from avatar_agent import models
from avatar_agent.cli import main


def write_manifest(path: Path, entries: list[str]) -> Path:
    path.write_text("\n".join(entries), encoding="utf-8")
    return path


def entry(name: str, check: str = "", **src: str) -> str:
    fields = {"origin": "moda", "kind": "url", "url": "http://127.0.0.1:9/x", **src}
    return (f'[[file]]\nname = "{name}"\nset = "official"\ngroup = "g"\ncheck = "{check}"\n'
            'license = "t"\n[[file.source]]\n' + "\n".join(f'{k} = "{v}"' for k, v in fields.items()) + "\n")


def test_project_manifest_pins_what_is_published() -> None:
    files = {f.name: f for f in models.load_manifest()}
    lp = ["liveportrait/base_models/appearance_feature_extractor.pth",
          "liveportrait/base_models/motion_extractor.pth", "liveportrait/base_models/warping_module.pth",
          "liveportrait/base_models/spade_generator.pth",
          "liveportrait/retargeting_models/stitching_retargeting_module.pth"]
    assert {"moda/net-200.pth", "moda/mean.pt", "audio/chinese-hubert-base/config.json",
            "audio/chinese-hubert-base/model.safetensors", *lp} <= set(files)
    assert all(f.license and f.check for f in files.values())
    for name in lp:                  # MoDA's copy first (what the release loads), upstream pinned
        moda, up = models.candidate_sources(files[name])
        assert (moda.repo, moda.path) == ("lixinyizju/moda", name.replace("liveportrait/",
                                                                          "decode/v1/first_stage/"))
        assert (up.repo, up.path) == ("KlingTeam/LivePortrait", name) and up.size > 0 and len(up.sha256) == 64
        assert models.candidate_sources(files[name], {"liveportrait": "upstream"}) == [up]
    spade = files["liveportrait/base_models/spade_generator.pth"].pinned_digests()
    assert [s.size for s in spade.values()] == [221_813_590]
    mean = files["moda/mean.pt"].sources[0]
    assert "/70490302d8a5bb404258f65a9c3a315c26996e48/" in mean.url and mean.sha256.startswith("db742e76")
    # Either weights format; the entry is named after the one load_hubert prefers.
    hub = files["audio/chinese-hubert-base/model.safetensors"]
    assert hub.alternatives == ("audio/chinese-hubert-base/pytorch_model.bin",)
    up = [s for s in hub.sources if s.origin == "upstream"]
    assert [(s.repo, s.revision, s.size, s.save_as) for s in up] == [
        ("TencentGameMate/chinese-hubert-base", "fce0375452b1dd6c080ac3248d423d4d037bc831", 377_552_987,
         "audio/chinese-hubert-base/pytorch_model.bin")]
    assert [s.path.rsplit("/", 1)[-1] for s in models.candidate_sources(hub)] == [
        "pytorch_model.bin", "model.safetensors", "pytorch_model.bin"]
    assert not files["moda/net-200.pth"].pinned_digests()      # unknown: loader-checked


def test_models_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AVATAR_AGENT_MODELS", str(tmp_path / "m"))
    assert models.models_dir() == tmp_path / "m"
    monkeypatch.delenv("AVATAR_AGENT_MODELS")
    assert models.models_dir() == Path.home() / ".local/share/avatar-agent/models"


def test_verify_states(tmp_path: Path) -> None:
    data = b'{"a": 1}'
    digest = hashlib.sha256(data).hexdigest()
    man = write_manifest(tmp_path / "m.toml", [
        entry("a.json", sha256=digest), entry("c.json", check="json"), entry("d.json", sha256=digest),
        entry("e.json", sha256="0" * 64), entry("f.json", check="json")])
    dest = tmp_path / "models"
    dest.mkdir()
    for n in ("a.json", "c.json", "e.json"):
        (dest / n).write_bytes(data)
    (dest / "f.json").write_bytes(b"{not json")
    rows = {s.file.name: s for s in models.verify(dest, manifest=man)}
    assert {k: s.state for k, s in rows.items()} == {
        "a.json": "ok", "c.json": "unpinned", "d.json": "missing", "e.json": "mismatch", "f.json": "corrupt"}
    assert "JSONDecodeError" in rows["f.json"].detail
    listed = {s.file.name: s.state for s in models.list_models(dest, manifest=man)}
    assert listed["d.json"] == "missing" and listed["a.json"] == "present"


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
    # Everything present and accepted: no network needed at all.
    (tmp_path / "dest" / "y.bin").write_bytes(b"present")
    assert all(s.good for s in models.fetch("official", tmp_path / "dest", manifest=man))


def test_hf_entries_probe_the_hf_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    man = write_manifest(tmp_path / "m.toml", [entry("n.pth", kind="hf", repo="o/r", path="n.pth", url="")])
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)     # CI sets it for the whole suite
    with pytest.raises(models.ModelsError, match="cannot reach 127.0.0.1:9"):
        models.fetch("official", tmp_path / "d", manifest=man)


def test_bad_manifest_and_unknown_set(tmp_path: Path) -> None:
    with pytest.raises(models.ModelsError, match="unknown or missing field"):
        models.load_manifest(write_manifest(tmp_path / "a.toml", [entry("x", colour="red")]))
    with pytest.raises(models.ModelsError, match="source kind must be"):
        models.load_manifest(write_manifest(tmp_path / "b.toml", [entry("x", kind="hf", url="")]))
    with pytest.raises(models.ModelsError, match="sha256 must be 64"):
        models.load_manifest(write_manifest(tmp_path / "c.toml", [entry("x", sha256="abc")]))
    with pytest.raises(models.ModelsError, match="at least one"):
        models.load_manifest(write_manifest(tmp_path / "d.toml", [
            '[[file]]\nname = "x"\nset = "s"\ngroup = "g"\ncheck = ""\nlicense = "t"\n']))
    with pytest.raises(models.ModelsError, match="unknown model set 'nope'"):
        models.verify(tmp_path, name="nope")


def test_cli_verify_pin_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "m"
    (d / "audio/chinese-hubert-base").mkdir(parents=True)
    (d / "audio/chinese-hubert-base/config.json").write_text('{"model_type": "hubert"}')
    assert main(["models", "verify", "--dir", str(d)]) == 1          # most files are missing
    out = capsys.readouterr()
    assert "size-checked, not pinned" in out.out and "missing" in out.out
    assert "audio/chinese-hubert-base/model.safetensors: missing (or pytorch_model.bin)" in out.out
    assert "avatar-agent models fetch official" in out.err
    assert main(["models", "verify", "--pin", "--dir", str(d)]) == 1
    out = capsys.readouterr()
    assert "pinned by you" in out.out and f"pins written to {d / models.PINS_FILE}" in out.out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "fetch", "--liveportrait", "upstream", "--dir", str(d)]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
