"""Official model files: where they live, how to fetch them once, how to verify them.

Nothing here runs implicitly: only :func:`fetch` downloads, and only when called (the CLI's
``avatar-agent models fetch``).  The file list with sources, hashes and licences is
``models/manifest.toml``; see models/README.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import tomllib
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent.parent / "models" / "manifest.toml"
"""The project's manifest of official files."""

PROBE_TIMEOUT_S = 5.0


class ModelsError(RuntimeError):
    """A model file cannot be fetched or does not verify."""


@dataclass(frozen=True)
class ModelFile:
    """One manifest entry (see models/manifest.toml for the fields)."""

    name: str
    set: str
    source: str
    repo: str = ""
    path: str = ""
    url: str = ""
    sha256: str = ""
    sha256_prefix: str = ""
    sha256_suffix: str = ""
    license: str = ""


@dataclass(frozen=True)
class FileStatus:
    """Verification result of one file.

    Attributes:
        file: the manifest entry.
        path: where it should be.
        state: "ok" (full hash matches), "prefix-ok" (only a partial hash is known and it
            matches), "unverified" (present, no hash known), "missing", "mismatch".
        sha256: the file's digest when it was computed.
    """

    file: ModelFile
    path: Path
    state: str
    sha256: str = ""

    @property
    def good(self) -> bool:
        return self.state in ("ok", "prefix-ok", "unverified")


def models_dir() -> Path:
    """Default models directory: ``$AVATAR_AGENT_MODELS`` or ``~/.local/share/avatar-agent/models``."""
    env = os.environ.get("AVATAR_AGENT_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".local/share/avatar-agent/models"


def load_manifest(path: str | Path = MANIFEST) -> list[ModelFile]:
    """Parse a manifest TOML into entries; raises ModelsError naming a bad entry."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ModelsError(f"cannot read model manifest {path}: {e}") from e
    out = []
    for i, entry in enumerate(data.get("file", [])):
        try:
            f = ModelFile(**entry)
        except TypeError as e:
            raise ModelsError(f"{path}: [[file]] #{i + 1} has an unknown or missing field ({e})") from e
        if f.source not in ("hf", "url") or (f.source == "hf" and not (f.repo and f.path)) \
                or (f.source == "url" and not f.url):
            raise ModelsError(f"{path}: [[file]] {f.name!r}: source must be 'hf' (repo + path) or "
                              "'url' (url)")
        out.append(f)
    return out


def _select(name: str | None, manifest: str | Path) -> list[ModelFile]:
    files = load_manifest(manifest)
    if name is None:
        return files
    chosen = [f for f in files if f.set == name]
    if not chosen:
        sets = sorted({f.set for f in files})
        raise ModelsError(f"unknown model set {name!r}; known: {', '.join(sets)}")
    return chosen


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_file(f: ModelFile, dest: Path) -> FileStatus:
    """Verify one file under ``dest`` against its (full or partial) hash."""
    p = dest / f.name
    if not p.is_file():
        return FileStatus(f, p, "missing")
    if not (f.sha256 or f.sha256_prefix or f.sha256_suffix):
        return FileStatus(f, p, "unverified")
    digest = _sha256(p)
    if f.sha256:
        return FileStatus(f, p, "ok" if digest == f.sha256.lower() else "mismatch", digest)
    good = digest.startswith(f.sha256_prefix.lower()) and digest.endswith(f.sha256_suffix.lower())
    return FileStatus(f, p, "prefix-ok" if good else "mismatch", digest)


def verify(dest: str | Path | None = None, name: str | None = "official",
           manifest: str | Path = MANIFEST) -> list[FileStatus]:
    """Status of every file of set ``name`` (all sets with None) under ``dest``."""
    d = Path(dest) if dest is not None else models_dir()
    return [check_file(f, d) for f in _select(name, manifest)]


def list_models(dest: str | Path | None = None, manifest: str | Path = MANIFEST) -> list[FileStatus]:
    """All manifest entries with their presence (hashes are not computed: fast)."""
    d = Path(dest) if dest is not None else models_dir()
    return [FileStatus(f, d / f.name, "present" if (d / f.name).is_file() else "missing")
            for f in load_manifest(manifest)]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _probe(url: str, timeout: float) -> None:
    """Fail fast (one TCP connect) when the host of ``url`` is unreachable."""
    u = urllib.parse.urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname or "", port), timeout=timeout).close()
    except OSError as e:
        raise ModelsError(f"cannot reach {u.hostname}:{port} ({e}). Fetch the models on a machine "
                          "with internet access and copy the models directory here") from e


def _download_hf(f: ModelFile, tmp: Path, timeout: float) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise ModelsError("fetching official models needs huggingface_hub: "
                          "pip install 'avatar-agent[official]'") from e
    try:
        return Path(hf_hub_download(f.repo, f.path, local_dir=tmp, etag_timeout=timeout,
                                    endpoint=os.environ.get("HF_ENDPOINT") or None))
    except Exception as e:  # network, auth and 404 errors all end the same way for the user
        raise ModelsError(f"download of {f.repo}/{f.path} failed: {type(e).__name__}: {e}") from e


def _download_url(f: ModelFile, tmp: Path, timeout: float) -> Path:
    out = tmp / Path(f.name).name
    try:
        with urllib.request.urlopen(f.url, timeout=timeout) as r, open(out, "wb") as w:
            shutil.copyfileobj(r, w)
    except OSError as e:
        raise ModelsError(f"download of {f.url} failed: {e}") from e
    return out


def fetch(name: str = "official", dest: str | Path | None = None, *, timeout: float = 30.0,
          force: bool = False, manifest: str | Path = MANIFEST) -> list[FileStatus]:
    """Download the files of set ``name`` into ``dest`` (default :func:`models_dir`) and verify them.

    Files already present and verifying are kept (unless ``force``).  Offline (``HF_HUB_OFFLINE``
    set, or the host unreachable within a few seconds) → :class:`ModelsError` at once, naming the
    missing files.  A hash mismatch deletes the download and raises.
    """
    d = Path(dest) if dest is not None else models_dir()
    files = _select(name, manifest)
    todo = [f for f in files if force or not check_file(f, d).good]
    if not todo:
        return verify(d, name, manifest)
    missing = ", ".join(f.name for f in todo)
    if _offline():
        raise ModelsError(f"HF_HUB_OFFLINE is set and these files are missing from {d}: {missing}. "
                          "Unset it to download, or copy the files there")
    hosts = {(os.environ.get("HF_ENDPOINT") or "https://huggingface.co") if f.source == "hf" else f.url
             for f in todo}
    for h in sorted(hosts):
        _probe(h, min(PROBE_TIMEOUT_S, timeout))
    d.mkdir(parents=True, exist_ok=True)
    for f in todo:
        with tempfile.TemporaryDirectory(dir=d, prefix=".fetch-") as tmp:
            got = (_download_hf if f.source == "hf" else _download_url)(f, Path(tmp), timeout)
            target = d / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(got), target)
        st = check_file(f, d)
        if st.state == "mismatch":
            target.unlink(missing_ok=True)
            raise ModelsError(f"{f.name}: sha256 {st.sha256} does not match the manifest; the "
                              "download was deleted")
    return verify(d, name, manifest)
