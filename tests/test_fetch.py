"""`models fetch` through the real huggingface_hub client against a loopback Hub of our own.

The loopback "hub" answers ``HEAD/GET /{repo}/resolve/{revision}/{path}`` as huggingface.co does:
small files directly (ETag = a git hash, ``X-Repo-Commit``, ``Content-Length``), LFS files with a
302 to a second server, the "CDN" (``X-Linked-Size``, ``X-Linked-Etag`` = the sha256,
``Location``), and unknown files with 404 + ``X-Error-Code: EntryNotFound``.  The CDN honours
``Range`` (206 + ``Content-Range``) and logs every request, so a test can see a resume happen.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import torch

from avatar_agent import models

hf_constants = pytest.importorskip("huggingface_hub.constants")

COMMIT = "a" * 40
LFS_SUFFIXES = (".pth", ".bin", ".safetensors", ".pt")


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@dataclass
class FakeHub:
    """Files per repo, plus what the CDN serves when it should lie (``corrupt``)."""

    files: dict[tuple[str, str], bytes] = field(default_factory=dict)
    corrupt: dict[str, bytes] = field(default_factory=dict)       # sha → bytes actually sent
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, range)
    hub_url: str = ""
    cdn_url: str = ""
    blobs: dict[str, bytes] = field(default_factory=dict)

    def add(self, repo: str, path: str, data: bytes) -> None:
        self.files[(repo, path)] = data
        self.blobs[sha(data)] = data

    def requested(self, what: str) -> list[tuple[str, str, str]]:
        return [r for r in self.log if what in r[1]]


def _hub_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:      # keep test output clean
            pass

        def _resolve(self, body: bool) -> None:
            hub.log.append((self.command, self.path, self.headers.get("Range", "")))
            parts = self.path.split("/resolve/", 1)
            repo = parts[0].strip("/")
            rev, _, path = parts[1].partition("/") if len(parts) == 2 else ("", "", "")
            if not any(r == repo for r, _ in hub.files):
                self.send_response(401)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = hub.files.get((repo, path)) if rev in ("main", COMMIT) or len(rev) == 40 else None
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path.endswith(LFS_SUFFIXES):
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn_url}/blob/{sha(data)}")
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("X-Linked-Etag", f'"{sha(data)}"')
                self.send_header("ETag", '"0123456789abcdef0123456789abcdef01234567"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's names)
            self._resolve(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._resolve(body=True)

    return Hub


def _cdn_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Cdn(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            rng = self.headers.get("Range", "")
            hub.log.append(("GET", self.path, rng))
            key = self.path.rsplit("/", 1)[-1]
            data = hub.corrupt.get(key, hub.blobs.get(key))
            if data is None:
                self.send_error(404)
                return
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

    return Cdn


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A loopback Hub + CDN; the hub client pointed at it and allowed online (CI sets
    HF_HUB_OFFLINE=1 for the suite; huggingface_hub reads it once, at import, into constants)."""
    h = FakeHub()
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _hub_handler(h)),
               ThreadingHTTPServer(("127.0.0.1", 0), _cdn_handler(h))]
    for s in servers:
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    h.hub_url = f"http://127.0.0.1:{servers[0].server_address[1]}"
    h.cdn_url = f"http://127.0.0.1:{servers[1].server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", h.hub_url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    # Small chunks, so that a progress report (and an interruption) can fall mid-file.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    yield h
    for s in servers:
        s.shutdown()
        s.server_close()


def manifest(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "manifest.toml"
    p.write_text(text, encoding="utf-8")
    return p


def entry(name: str, *sources: str, check: str = "", group: str = "g", alternatives: str = "") -> str:
    alt = f"alternatives = [{alternatives}]\n" if alternatives else ""
    head = (f'[[file]]\nname = "{name}"\n{alt}set = "official"\ngroup = "{group}"\n'
            f'check = "{check}"\nlicense = "test"\n')
    return head + "".join(f"[[file.source]]\n{s}\n" for s in sources)


def src(origin: str, repo: str, path: str, **kw: object) -> str:
    extra = "".join(f'{k} = {v if isinstance(v, int) else repr(str(v)).replace(chr(39), chr(34))}\n'
                    for k, v in kw.items())
    return f'origin = "{origin}"\nkind = "hf"\nrepo = "{repo}"\npath = "{path}"\n{extra}'


class Ticker:
    """A clock that advances one second per reading: every chunk produces a progress report."""

    def __init__(self) -> None:
        self.t = itertools.count()

    def __call__(self) -> float:
        return float(next(self.t))


def test_fetch_layout_progress_and_pinned_digest(hub: FakeHub, tmp_path: Path) -> None:
    weights = bytes(range(256)) * 200                        # 51 200 B, an LFS file
    cfg = b'{"model_type": "hubert"}'
    hub.add("lixinyizju/moda", "decode/v1/first_stage/base_models/w.pth", weights)
    hub.add("lixinyizju/moda", "audio/chinese-hubert-base/config.json", cfg)
    man = manifest(tmp_path, entry("liveportrait/base_models/w.pth",
                                   src("moda", "lixinyizju/moda", "decode/v1/first_stage/base_models/w.pth",
                                       size=len(weights), sha256=sha(weights)))
                   + entry("audio/chinese-hubert-base/config.json",
                           src("moda", "lixinyizju/moda", "audio/chinese-hubert-base/config.json"),
                           check="json"))
    reports: list[models.FetchProgress] = []
    rows = models.fetch("official", tmp_path / "m", manifest=man, progress=reports.append, now=Ticker())
    assert {r.file.name: r.state for r in rows} == {"liveportrait/base_models/w.pth": "ok",
                                                     "audio/chinese-hubert-base/config.json": "unpinned"}
    assert (tmp_path / "m/liveportrait/base_models/w.pth").read_bytes() == weights
    assert not list((tmp_path / "m").rglob("*.part*"))
    mine = [p for p in reports if p.file == "liveportrait/base_models/w.pth"]
    assert len(mine) >= 3 and mine[-1].finished and mine[-1].done == mine[-1].total == len(weights)
    assert [p.done for p in mine] == sorted(p.done for p in mine)
    assert all(p.rate_bps > 0 for p in mine) and mine[1].eta_s is not None and mine[1].eta_s > 0
    assert "MB/s" in mine[1].line() and "ETA" in mine[1].line()
    # Present and verifying: a second fetch makes no request at all.
    n = len(hub.log)
    models.fetch("official", tmp_path / "m", manifest=man)
    assert len(hub.log) == n


def test_interrupted_fetch_resumes_with_a_range_request(hub: FakeHub, tmp_path: Path) -> None:
    data = bytes((i * 7) % 251 for i in range(40_000))
    hub.add("o/r", "big.bin", data)
    man = manifest(tmp_path, entry("big.bin", src("moda", "o/r", "big.bin", size=len(data), sha256=sha(data))))

    def interrupt(p: models.FetchProgress) -> None:
        if p.done >= 12_288 and not p.finished:
            raise KeyboardInterrupt                                 # Ctrl-C mid-file

    with pytest.raises(KeyboardInterrupt):
        models.fetch("official", tmp_path / "m", manifest=man, progress=interrupt, now=Ticker())
    part = tmp_path / "m/big.bin.part"
    assert not (tmp_path / "m/big.bin").exists() and 0 < part.stat().st_size < len(data)
    kept = part.stat().st_size
    assert models.verify(tmp_path / "m", manifest=man)[0].state == "missing"   # .part is never accepted
    hub.log.clear()
    rows = models.fetch("official", tmp_path / "m", manifest=man)
    assert rows[0].state == "ok" and (tmp_path / "m/big.bin").read_bytes() == data
    gets = [r for r in hub.log if r[1].startswith("/blob/")]
    assert gets == [("GET", f"/blob/{sha(data)}", f"bytes={kept}-")]
    assert not part.exists() and not (tmp_path / "m/big.bin.part.json").exists()


def test_changed_remote_version_restarts_the_partial_file(hub: FakeHub, tmp_path: Path) -> None:
    data = b"x" * 9000
    hub.add("o/r", "f.bin", data)
    man = manifest(tmp_path, entry("f.bin", src("moda", "o/r", "f.bin")))
    d = tmp_path / "m"
    d.mkdir()
    (d / "f.bin.part").write_bytes(b"stale bytes of another version")
    (d / "f.bin.part.json").write_text('{"version": "old"}')
    assert models.fetch("official", d, manifest=man)[0].state == "unpinned"
    assert (d / "f.bin").read_bytes() == data
    assert [r[2] for r in hub.log if r[1].startswith("/blob/")] == [""]       # no Range: from zero


def test_wrong_digest_is_deleted_and_named(hub: FakeHub, tmp_path: Path) -> None:
    good, bad = b"G" * 5000, b"B" * 5000
    hub.add("o/r", "a.pth", bad)
    man = manifest(tmp_path, entry("a.pth", src("moda", "o/r", "a.pth", size=5000, sha256=sha(good))))
    with pytest.raises(models.ModelsError, match=r"a.pth .*sha256 .* does not match the manifest's"):
        models.fetch("official", tmp_path / "m", manifest=man)
    assert not [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    # No pinned digest, but the CDN sends other bytes than the LFS sha256 the hub announced.
    hub.add("o/r", "b.pth", good)
    hub.corrupt[sha(good)] = bad
    man = manifest(tmp_path, entry("b.pth", src("moda", "o/r", "b.pth")))
    with pytest.raises(models.ModelsError, match="does not match the server's"):
        models.fetch("official", tmp_path / "m", manifest=man)
    assert not [p for p in (tmp_path / "m").rglob("*") if p.is_file()]


def test_pinned_size_differs_from_server_nothing_downloaded(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("o/r", "a.pth", b"A" * 100)
    man = manifest(tmp_path, entry("a.pth", src("moda", "o/r", "a.pth", size=99)))
    with pytest.raises(models.ModelsError, match="offers 100 bytes, the manifest pins 99"):
        models.fetch("official", tmp_path / "m", manifest=man)
    assert not hub.requested("/blob/")


def test_missing_file_everywhere_names_every_source(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("lixinyizju/moda", "other.json", b"{}")
    hub.add("Up/stream", "other.json", b"{}")
    man = manifest(tmp_path, entry("x.pth", src("moda", "lixinyizju/moda", "x.pth"),
                                   src("upstream", "Up/stream", "x.pth")))
    with pytest.raises(models.ModelsError, match=r"x.pth: not found at any source \(lixinyizju/moda/x.pth.*"
                                                 r"Up/stream/x.pth"):
        models.fetch("official", tmp_path / "m", manifest=man)


def test_safetensors_alternative_when_the_bin_is_absent(hub: FakeHub, tmp_path: Path) -> None:
    st = b"safetensors bytes" * 100
    hub.add("lixinyizju/moda", "audio/chinese-hubert-base/model.safetensors", st)
    d = "audio/chinese-hubert-base"
    man = manifest(tmp_path, entry(
        f"{d}/pytorch_model.bin",
        src("moda", "lixinyizju/moda", f"{d}/pytorch_model.bin"),
        src("moda", "lixinyizju/moda", f"{d}/model.safetensors", save_as=f"{d}/model.safetensors"),
        alternatives=f'"{d}/model.safetensors"'))
    rows = models.fetch("official", tmp_path / "m", manifest=man)
    assert rows[0].path == tmp_path / "m" / d / "model.safetensors" and rows[0].state == "unpinned"
    assert not (tmp_path / "m" / d / "pytorch_model.bin").exists()
    listed = models.list_models(tmp_path / "m", manifest=man)
    assert listed[0].state == "present" and listed[0].path.name == "model.safetensors"


def test_fallback_repo_and_explicit_origin(hub: FakeHub, tmp_path: Path) -> None:
    up = b"upstream weights" * 300
    hub.add("lixinyizju/moda", "unrelated.json", b"{}")        # MoDA's repo exists, lacks the file
    hub.add("KlingTeam/LivePortrait", "liveportrait/base_models/w.pth", up)
    man = manifest(tmp_path, entry(
        "liveportrait/base_models/w.pth",
        src("moda", "lixinyizju/moda", "decode/v1/first_stage/base_models/w.pth"),
        src("upstream", "KlingTeam/LivePortrait", "liveportrait/base_models/w.pth",
            size=len(up), sha256=sha(up)), group="liveportrait"))
    rows = models.fetch("official", tmp_path / "a", manifest=man)
    assert rows[0].state == "ok" and "KlingTeam/LivePortrait" in rows[0].detail
    assert hub.requested("lixinyizju/moda/resolve/main/decode/v1/first_stage/base_models/w.pth")
    hub.log.clear()
    rows = models.fetch("official", tmp_path / "b", manifest=man, origins={"liveportrait": "upstream"})
    assert rows[0].state == "ok" and not hub.requested("lixinyizju")


def test_pinned_revision_is_requested(hub: FakeHub, tmp_path: Path) -> None:
    rev = "fce0375452b1dd6c080ac3248d423d4d037bc831"
    hub.add("TencentGameMate/chinese-hubert-base", "preprocessor_config.json", b'{"a": 1}')
    man = manifest(tmp_path, entry("p.json", src("upstream", "TencentGameMate/chinese-hubert-base",
                                                 "preprocessor_config.json", revision=rev), check="json"))
    models.fetch("official", tmp_path / "m", manifest=man)
    assert hub.requested(f"/TencentGameMate/chinese-hubert-base/resolve/{rev}/preprocessor_config.json")


def test_url_source_resumes_too(tmp_path: Path, hub: FakeHub) -> None:
    data = b"mean and std" * 500
    hub.blobs["meanpt"] = data
    man = manifest(tmp_path, '[[file]]\nname = "moda/mean.pt"\nset = "official"\ngroup = "moda"\n'
                   'check = ""\nlicense = "t"\n[[file.source]]\norigin = "moda"\nkind = "url"\n'
                   f'url = "{hub.cdn_url}/blob/meanpt"\nsize = {len(data)}\nsha256 = "{sha(data)}"\n')
    d = tmp_path / "m" / "moda"
    d.mkdir(parents=True)
    (d / "mean.pt.part").write_bytes(data[:1000])
    (d / "mean.pt.part.json").write_text(f'{{"version": "{hub.cdn_url}/blob/meanpt"}}')
    assert models.fetch("official", tmp_path / "m", manifest=man)[0].state == "ok"
    assert hub.log == [("GET", "/blob/meanpt", "bytes=1000-")]


def test_verify_pin_and_loader_checks_on_a_real_layout(tmp_path: Path) -> None:
    """The stitching file is small enough to build with the release's exact shapes."""
    from avatar_agent.nn.liveportrait.weights import build_modules, official_manifest, save_official_layout

    net = build_modules().stitching
    sd = {k: torch.randn(s) for k, s in official_manifest(net).items()}
    root = tmp_path / "m"
    save_official_layout({"stitching_retargeting_module": sd}, root / "liveportrait")
    name = "liveportrait/retargeting_models/stitching_retargeting_module.pth"
    man = manifest(tmp_path, entry(name, src("moda", "lixinyizju/moda", "x"),
                                   src("upstream", "K/L", "y", sha256="0" * 64),
                                   check="liveportrait:stitching_retargeting_module"))
    st = models.verify(root, manifest=man)[0]
    assert st.state == "unpinned" and st.describe().startswith("size-checked, not pinned")
    rows, pins = models.pin(root, manifest=man)
    assert rows[0].state == "pinned" and pins == root / models.PINS_FILE
    assert models.read_pins(root)[name]["sha256"] == st.sha256
    # A file changed after pinning is a mismatch, not "unpinned".
    with open(root / name, "ab") as fh:
        fh.write(b"\0")
    assert models.verify(root, manifest=man)[0].state == "mismatch"
    (root / models.PINS_FILE).unlink()
    # Another project's fp16 copy with the same name and keys: rejected by the dtype check.
    save_official_layout({"stitching_retargeting_module": {k: v.half() for k, v in sd.items()}},
                         root / "liveportrait")
    st = models.verify(root, manifest=man)[0]
    assert st.state == "corrupt" and "float16" in st.detail
    # Wrong shapes (a truncated network): every offending key named.
    bad = dict(sd)
    k0 = next(iter(bad))
    bad[k0] = torch.zeros(3)
    save_official_layout({"stitching_retargeting_module": bad}, root / "liveportrait")
    st = models.verify(root, manifest=man)[0]
    assert st.state == "corrupt" and "does not match the network" in st.detail
    models.pin(root, manifest=man)
    assert not (root / models.PINS_FILE).exists()                 # corrupt files are never pinned


def test_the_project_manifest_layout_end_to_end(hub: FakeHub, tmp_path: Path) -> None:
    """Every hf file of models/manifest.toml, served at its real path in lixinyizju/moda (small
    fake bytes), lands where the loaders look; the fakes then fail the strict loader check."""
    from avatar_agent.nn.liveportrait.weights import find_weight_files

    real = models.load_manifest()
    hf = [f for f in real if all(s.kind == "hf" for s in f.sources)]
    assert {f.name for f in real} - {f.name for f in hf} == {"moda/mean.pt"}      # a GitHub URL
    for f in hf:
        src = next(s for s in models.candidate_sources(f) if s.origin == "moda"
                   and not (f.check == "hubert" and s.path.endswith(".bin")))   # MoDA ships .safetensors here
        hub.add(src.repo, src.path, b'{"fake": true}' if f.check == "json" else f"fake {f.name}".encode() * 50)
    text = models.MANIFEST.read_text(encoding="utf-8")
    man = manifest(tmp_path, text.replace("set = \"official\"\ngroup = \"moda\"\ncheck = \"mean-std\"",
                                          "set = \"other\"\ngroup = \"moda\"\ncheck = \"mean-std\""))
    root = tmp_path / "m"
    rows = {r.file.name: r for r in models.fetch("official", root, manifest=man)}
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(
        ["moda/net-200.pth", "audio/chinese-hubert-base/config.json",
         "audio/chinese-hubert-base/preprocessor_config.json",
         "audio/chinese-hubert-base/model.safetensors",
         *[f"liveportrait/{sub}/{n}.pth" for sub, n in (
             ("base_models", "appearance_feature_extractor"), ("base_models", "motion_extractor"),
             ("base_models", "warping_module"), ("base_models", "spade_generator"),
             ("retargeting_models", "stitching_retargeting_module"))]])
    assert set(find_weight_files(root)) == {"appearance_feature_extractor", "motion_extractor",
                                            "warping_module", "spade_generator",
                                            "stitching_retargeting_module"}
    assert rows["audio/chinese-hubert-base/config.json"].state == "unpinned"
    assert {r.state for n, r in rows.items() if not n.endswith(".json")} == {"corrupt"}
    assert not hub.requested("KlingTeam") and not hub.requested("TencentGameMate")
