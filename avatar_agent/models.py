"""Official model files: where they live, how to fetch them once, how to verify them.

Nothing here runs implicitly: only :func:`fetch` downloads, and only when called (the CLI's
``avatar-agent models fetch``).  The file list with sources, sizes, digests and licences is
``models/manifest.toml``; see models/README.md.

How a fetch cannot go wrong:

* Each file is downloaded to ``<name>.part`` beside its final place (a ``<name>.part.json``
  records the remote version).  Only after its size and digest check does an atomic
  ``os.replace`` give it its real name, so ``verify`` and the loaders never see a partial or
  corrupt file.  An interrupted fetch (Ctrl-C, a dropped connection, a killed process) leaves the
  ``.part`` file; the next fetch resumes it with an HTTP range request when the remote version is
  unchanged.
* Hugging Face files go through huggingface_hub's own metadata call (``get_hf_file_metadata``:
  redirects, ``X-Linked-Size``/``X-Linked-Etag``, ``X-Repo-Commit``) and its ``http_get`` with
  ``resume_size``.  ``hf_hub_download`` itself is not used: since huggingface_hub 2.x it downloads
  to a process-unique temporary file that it deletes on failure, so a 370 MB file interrupted at
  90 % would start again from zero.
* A file whose sha256 the manifest pins must match it.  For a file with no published digest
  (MoDA's net-200.pth and its copies of LivePortrait and HuBERT) the download must match the size
  the server announces and, for LFS files, the server's sha256 (its ETag); ``verify`` then checks
  it with the strict loader (every key, shape and dtype) and says "not pinned".  After a first
  trusted download, ``avatar-agent models verify --pin`` records those digests in the user's pin
  file (``<models dir>/pins.toml``), and later verifies compare against it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from .config import Config

MANIFEST = Path(__file__).resolve().parent.parent / "models" / "manifest.toml"
"""The project's manifest of official files."""

PINS_FILE = "pins.toml"
"""Name of the user's pin file in the models directory (written by ``models verify --pin``)."""

PROBE_TIMEOUT_S = 5.0
"""How long the reachability probe waits before a fetch gives up (offline machines fail fast)."""

PROGRESS_EVERY_S = 0.5
"""Minimum interval between two progress reports of one file."""

Origin = Literal["auto", "moda", "upstream"]
"""Which copy of a group to fetch: MoDA's model repo, the original project's, or MoDA's with the
original as fallback when MoDA's repo lacks the file ("auto")."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ModelsError(RuntimeError):
    """A model file cannot be fetched or does not verify."""


@dataclass(frozen=True)
class Source:
    """One place a file can be downloaded from.

    Attributes:
        origin: "moda" (MoDA's own copies) or "upstream" (the original project).
        kind: "hf" (Hugging Face ``repo`` + ``path`` at ``revision``) or "url".
        repo, path, revision: the Hugging Face file ("main" when no revision is pinned).
        url: the plain URL (kind "url"; pin it to a commit, never a branch).
        save_as: local name when it differs from the entry's name (one of its alternatives).
        size: bytes, 0 = unknown.
        sha256: hex digest, "" = unknown.
    """

    origin: str
    kind: str
    repo: str = ""
    path: str = ""
    revision: str = "main"
    url: str = ""
    save_as: str = ""
    size: int = 0
    sha256: str = ""

    def where(self) -> str:
        """Human-readable location."""
        if self.kind == "url":
            return self.url
        rev = "" if self.revision == "main" else f"@{self.revision[:12]}"
        return f"{self.repo}{rev}/{self.path}"


@dataclass(frozen=True)
class ModelFile:
    """One manifest entry (see models/manifest.toml for the fields).

    ``names`` are the accepted local names, preferred first (``name`` + ``alternatives``).
    """

    name: str
    set: str
    group: str
    check: str
    license: str
    sources: tuple[Source, ...]
    alternatives: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Accepted local file names, preferred first."""
        return (self.name, *self.alternatives)

    def pinned_digests(self) -> dict[str, Source]:
        """sha256 → source for every source whose digest is published."""
        return {s.sha256: s for s in self.sources if s.sha256}


STATES = {
    "ok": "ok (sha256 pinned by the manifest)",
    "pinned": "ok (sha256 pinned by you)",
    "unpinned": "size-checked, not pinned",
    "present": "present",
    "missing": "missing",
    "mismatch": "sha256 mismatch",
    "corrupt": "corrupt",
}
"""Verification states and how they are shown."""


@dataclass(frozen=True)
class FileStatus:
    """Verification result of one file.

    Attributes:
        file: the manifest entry.
        path: the file found (or, when missing, where it should be).
        state: a key of :data:`STATES`: "ok" (matches a digest in the manifest), "pinned" (matches
            the user's pin), "unpinned" (no digest known; the strict loader accepts it), "present"
            (listed only, nothing computed), "missing", "mismatch", "corrupt".
        sha256: the file's digest when it was computed.
        detail: why, for "mismatch"/"corrupt"; where the digest comes from otherwise.
    """

    file: ModelFile
    path: Path
    state: str
    sha256: str = ""
    detail: str = ""

    @property
    def good(self) -> bool:
        """Not missing, mismatched or corrupt: "ok", "pinned", "unpinned" or "present" (not checked)."""
        return self.state in ("ok", "pinned", "unpinned", "present")

    def describe(self) -> str:
        """One line for the CLI."""
        extra = f" ({self.detail})" if self.detail else ""
        return f"{STATES.get(self.state, self.state)}{extra}"


@dataclass(frozen=True)
class FetchProgress:
    """One progress report of one file: bytes so far, total (None if unknown), rate and ETA."""

    file: str
    done: int
    total: int | None
    rate_bps: float
    eta_s: float | None
    finished: bool = False

    def line(self) -> str:
        """``name  12.3/221.8 MB  8.1 MB/s  ETA 25 s``."""
        mb = 1e6
        tot = f"/{self.total / mb:.1f}" if self.total else ""
        eta = "" if self.eta_s is None or self.finished else f"  ETA {self.eta_s:.0f} s"
        return f"{self.file}  {self.done / mb:.1f}{tot} MB  {self.rate_bps / mb:.1f} MB/s{eta}"


ProgressFn = Callable[[FetchProgress], None]


def stderr_progress(p: FetchProgress) -> None:
    """Progress printer for terminals: one updating line per file."""
    end = "\n" if p.finished else ""
    print(f"\r  {p.line():<78}", end=end, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------

def models_dir(cfg: Config | None = None) -> Path:
    """The models directory — the one place that decides it, for ``models fetch`` and ``start``
    alike: the config's ``motion.models_dir`` (relative to the config file), else
    ``$AVATAR_AGENT_MODELS``, else ``~/.local/share/avatar-agent/models``; ``~`` is expanded."""
    if cfg is not None and cfg.motion.models_dir:
        return cfg.resolve(cfg.motion.models_dir)
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
        what = f"{path}: [[file]] #{i + 1} ({entry.get('name', '?')!r})"
        try:
            raw_sources = entry.pop("source", [])
            sources = tuple(Source(**s) for s in raw_sources)
            f = ModelFile(**{**entry, "sources": sources,
                             "alternatives": tuple(entry.get("alternatives", ()))})
        except TypeError as e:
            raise ModelsError(f"{what} has an unknown or missing field ({e})") from e
        if not f.sources:
            raise ModelsError(f"{what}: needs at least one [[file.source]]")
        for s in f.sources:
            if s.kind not in ("hf", "url") or (s.kind == "hf" and not (s.repo and s.path)) \
                    or (s.kind == "url" and not s.url):
                raise ModelsError(f"{what}: source kind must be 'hf' (repo + path) or 'url' (url)")
            if s.save_as and s.save_as not in f.names:
                raise ModelsError(f"{what}: save_as {s.save_as!r} is not one of {list(f.names)}")
            if s.sha256 and not _SHA256.match(s.sha256):
                raise ModelsError(f"{what}: sha256 must be 64 lowercase hex digits")
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


def _found(f: ModelFile, d: Path) -> Path | None:
    return next((d / n for n in f.names if (d / n).is_file()), None)


def _alternatives(f: ModelFile) -> str:
    return f"or {', '.join(Path(a).name for a in f.alternatives)}" if f.alternatives else ""


def list_models(dest: str | Path | None = None, manifest: str | Path = MANIFEST) -> list[FileStatus]:
    """All manifest entries with their presence (nothing is read: fast)."""
    d = Path(dest) if dest is not None else models_dir()
    out = []
    for f in load_manifest(manifest):
        p = _found(f, d)
        out.append(FileStatus(f, p or d / f.name, "present" if p else "missing",
                              detail="" if p else _alternatives(f)))
    return out


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (the project's one file-hash helper)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_pins(dest: Path) -> dict[str, dict[str, Any]]:
    """The user's pins: local name → {"sha256", "size"} (empty when there is no pin file)."""
    p = dest / PINS_FILE
    if not p.is_file():
        return {}
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ModelsError(f"cannot read the pin file {p}: {e}; fix or delete it") from e
    return {k: v for k, v in data.items() if isinstance(v, dict) and "sha256" in v}


def _write_pins(dest: Path, pins: dict[str, dict[str, Any]]) -> Path:
    lines = ["# sha256 pins recorded by `avatar-agent models verify --pin` after a trusted download.",
             "# `models verify` reports a file whose digest differs from its pin as a mismatch.", ""]
    for name in sorted(pins):
        lines += [f"[{json.dumps(name)}]", f'sha256 = "{pins[name]["sha256"]}"',
                  f'size = {int(pins[name]["size"])}', ""]
    p = dest / PINS_FILE
    tmp = p.with_name(p.name + ".part")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, p)
    return p


def check_file(f: ModelFile, dest: Path, pins: dict[str, dict[str, Any]] | None = None) -> FileStatus:
    """Verify one entry under ``dest``: manifest digest, then the user's pin, then the strict loader."""
    p = _found(f, dest)
    if p is None:
        return FileStatus(f, dest / f.name, "missing", detail=_alternatives(f))
    digest = sha256_file(p)
    known = f.pinned_digests()
    if digest in known:
        return FileStatus(f, p, "ok", digest, f"= {known[digest].where()}")
    local = str(p.relative_to(dest))
    pin = (pins or {}).get(local)
    if pin is not None:
        if digest == pin["sha256"]:
            return FileStatus(f, p, "pinned", digest)
        return FileStatus(f, p, "mismatch", digest, f"pinned {pin['sha256'][:12]}…, file {digest[:12]}…")
    # Can this local name come from a source without a published digest?  If not, the file is wrong.
    if all(s.sha256 for s in f.sources if (s.save_as or f.name) == local):
        want = ", ".join(sorted(k[:12] + "…" for k in known))
        return FileStatus(f, p, "mismatch", digest, f"expected {want}, file {digest[:12]}…")
    err = loader_check(f.check, p)
    if err:
        return FileStatus(f, p, "corrupt", digest, err)
    return FileStatus(f, p, "unpinned", digest, "the strict loader accepts it; pin it with "
                                                "`avatar-agent models verify --pin`")


def verify(dest: str | Path | None = None, name: str | None = "official",
           manifest: str | Path = MANIFEST) -> list[FileStatus]:
    """Status of every file of set ``name`` (all sets with None) under ``dest``."""
    d = Path(dest) if dest is not None else models_dir()
    pins = read_pins(d)
    return [check_file(f, d, pins) for f in _select(name, manifest)]


def pin(dest: str | Path | None = None, name: str | None = "official",
        manifest: str | Path = MANIFEST) -> tuple[list[FileStatus], Path | None]:
    """Verify, then record the digest of every present, loader-accepted file without a manifest
    digest in the user's pin file.  Returns (statuses after pinning, pin file or None).

    Mismatching or corrupt files are never pinned.
    """
    d = Path(dest) if dest is not None else models_dir()
    rows = verify(d, name, manifest)
    todo = [st for st in rows if st.state == "unpinned"]
    if not todo:
        return rows, None
    pins = read_pins(d)
    for st in todo:
        pins[str(st.path.relative_to(d))] = {"sha256": st.sha256, "size": st.path.stat().st_size}
    path = _write_pins(d, pins)
    return verify(d, name, manifest), path


# --- strict loader checks -------------------------------------------------------------------

def _tensor_dtypes(state: Any, allowed: tuple[Any, ...], what: str) -> str:
    bad = sorted({str(v.dtype).removeprefix("torch.") for v in _tensors(state)
                  if v.is_floating_point() and v.dtype not in allowed})
    if bad:
        return (f"{what} holds {', '.join(bad)} tensors, the release stores "
                f"{', '.join(str(a).removeprefix('torch.') for a in allowed)}: another project's "
                "converted copy? Delete it and fetch the official file")
    return ""


def _tensors(obj: Any) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


def _load_pth(path: Path) -> Any:
    import torch

    try:          # mmap: checking a 1.5 GB checkpoint should not read it all into memory
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:       # legacy (non-zip) format cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def loader_check(check: str, path: Path) -> str:
    """Run the strict structural check ``check`` on ``path``; "" when it passes, else the reason.

    Checks: ``liveportrait:<module>`` (keys and shapes of that network, float32),
    ``moda`` (the release DiT's keys and shapes), ``hubert`` (HuBERT-base keys and shapes,
    float32), ``mean-std`` (two 70-d statistics), ``json`` (parses), ``""`` (none).
    """
    import torch

    try:
        if check == "":
            return ""
        if check == "json":
            json.loads(path.read_text(encoding="utf-8"))
            return ""
        if check == "mean-std":
            from avatar_agent.nn.weights import load_mean_std

            load_mean_std(path)
            return ""
        if check.startswith("liveportrait:"):
            from avatar_agent.nn.liveportrait import weights as W

            module = check.split(":", 1)[1]
            if module not in W.MODULE_FILES:
                raise ModelsError(f"manifest check {check!r}: unknown module")
            obj = _load_pth(path)
            if not isinstance(obj, dict):
                return f"expected a state dict, found {type(obj).__name__}"
            if module == "stitching_retargeting_module":
                missing = [k for k in W.STITCHING_SUBDICTS if not isinstance(obj.get(k), dict)]
                if missing:
                    return f"missing sub-dicts {missing}"
                obj = {f"{s}.{k.replace('module.', '')}": v for s in W.STITCHING_SUBDICTS
                       for k, v in obj[s].items()}
            with torch.device("meta"):                 # shapes only, no memory
                net = _liveportrait_net(module)
            W.check_keys(obj, W.official_manifest(net), str(path))
            return _tensor_dtypes(obj, (torch.float32,), path.name)
        if check == "moda":
            from avatar_agent.nn.moda import PRESETS, RELEASE_PREFIX, build_dit
            from avatar_agent.nn.weights import MODA_WRAPPER_KEYS, check_state_dict, dit_release_manifest

            obj = _load_pth(path)
            if not isinstance(obj, dict) or not any(str(k).startswith(RELEASE_PREFIX) for k in obj):
                return f"no '{RELEASE_PREFIX}*' keys: not MoDA's net-200.pth"
            model = build_dit(PRESETS["release"], device="meta")
            check_state_dict(obj, dit_release_manifest(model), str(path), ignore=MODA_WRAPPER_KEYS)
            return _tensor_dtypes(obj, (torch.float32, torch.float16, torch.bfloat16), path.name)
        if check == "hubert":
            return _check_hubert(path)
    except ModelsError:
        raise
    except Exception as e:   # loaders raise several types for truncated / foreign files
        return " ".join(f"{type(e).__name__}: {e}".split())[:400]
    raise ModelsError(f"manifest check {check!r} is unknown")


def _liveportrait_net(module: str) -> Any:
    """The release-shaped network stored in LivePortrait's file ``module``."""
    from avatar_agent.nn.liveportrait import weights as W

    build = {"appearance_feature_extractor": lambda: W.AppearanceFeatureExtractor(W.APPEARANCE_PRESETS["release"]),
             "motion_extractor": lambda: W.MotionExtractor(W.MOTION_PRESETS["release"]),
             "warping_module": lambda: W.WarpingNetwork(W.WARPING_PRESETS["release"]),
             "spade_generator": lambda: W.SpadeGenerator(W.SPADE_PRESETS["release"]),
             "stitching_retargeting_module": W.StitchingRetargeting}
    return build[module]()


def _check_hubert(path: Path) -> str:
    import torch

    from avatar_agent.nn.hubert import build_hubert, hubert_config
    from avatar_agent.nn.weights import check_state_dict, rename_hubert_keys

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = _load_pth(path)
    with torch.device("meta"):
        model = build_hubert(hubert_config())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {k: v for k, v in rename_hubert_keys(state).items()
             if not k.startswith(("lm_head", "project_"))}
    if "masked_spec_embed" not in state:     # training-only, optional (load_hubert_state fills it)
        expected.pop("masked_spec_embed", None)
    check_state_dict(state, expected, str(path))
    return _tensor_dtypes(state, (torch.float32,), path.name)


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------

class _NotFound(Exception):
    """The source does not have the file (HTTP 404): try the next source."""


class _Bar:
    """A tqdm-compatible progress sink (what huggingface_hub's ``http_get`` drives) that reports
    :class:`FetchProgress` at most every :data:`PROGRESS_EVERY_S`."""

    def __init__(self, name: str, report: ProgressFn | None, now: Callable[[], float],
                 total: int | None = None, initial: int = 0, **_: Any) -> None:
        self.name, self.report, self.now = name, report, now
        self.total = total
        self.done = self.start = initial
        self.t0 = self.last = now()

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _emit(self, finished: bool = False) -> None:
        if self.report is None:
            return
        dt = max(self.now() - self.t0, 1e-6)
        rate = (self.done - self.start) / dt
        eta = (self.total - self.done) / rate if self.total and rate > 0 else None
        self.report(FetchProgress(self.name, self.done, self.total, rate, eta, finished))

    def update(self, n: int) -> None:
        self.done += n
        if self.now() - self.last >= PROGRESS_EVERY_S:
            self.last = self.now()
            self._emit()

    def close(self) -> None:
        self._emit(finished=True)
        self.report = None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _probe(url: str, timeout: float) -> None:
    """Fail fast (one TCP connect) when the host of ``url`` is unreachable."""
    u = urllib.parse.urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname or "", port), timeout=timeout).close()
    except OSError as e:
        raise ModelsError(f"cannot reach {u.hostname}:{port} ({e}). Fetch the models on a machine "
                          "with internet access and copy the models directory here") from e


@dataclass
class _Part:
    """A resumable partial download: ``<target>.part`` + ``<target>.part.json`` (remote version)."""

    target: Path
    part: Path = field(init=False)
    meta: Path = field(init=False)

    def __post_init__(self) -> None:
        self.part = self.target.with_name(self.target.name + ".part")
        self.meta = self.target.with_name(self.target.name + ".part.json")

    def resume_from(self, version: str, size: int | None) -> int:
        """Bytes to keep: the partial file's length when it belongs to ``version``, else 0."""
        try:
            same = json.loads(self.meta.read_text(encoding="utf-8")).get("version") == version
        except (OSError, ValueError):
            same = False
        have = self.part.stat().st_size if self.part.is_file() else 0
        if not same or (size is not None and have > size):
            have = 0
        if have == 0:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.part.write_bytes(b"")
            self.meta.write_text(json.dumps({"version": version}), encoding="utf-8")
        return have

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)

    def commit(self) -> None:
        os.replace(self.part, self.target)          # atomic: the real name appears complete
        self.meta.unlink(missing_ok=True)


def _fetch_hf(src: Source, part: _Part, timeout: float, bar: Callable[..., _Bar]) -> tuple[int | None, str]:
    """Download ``src`` into ``part``; returns (announced size, server sha256 or "")."""
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import (EntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
        from huggingface_hub.file_download import http_get
    except ImportError as e:
        raise ModelsError("fetching official models needs huggingface_hub: "
                          "pip install 'avatar-agent[official]'") from e
    ep = _endpoint()
    try:
        meta = get_hf_file_metadata(hf_hub_url(src.repo, src.path, revision=src.revision, endpoint=ep),
                                    timeout=timeout, endpoint=ep)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise _NotFound(f"{src.where()}: {type(e).__name__}") from e
    except Exception as e:  # network, auth and server errors all end the same way for the user
        raise ModelsError(f"{src.where()}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    size = meta.size
    if src.size and size is not None and size != src.size:
        raise ModelsError(f"{src.where()}: the server offers {size} bytes, the manifest pins "
                          f"{src.size}: the file changed upstream; nothing was downloaded")
    size = size or src.size or None
    etag = (meta.etag or "").strip('"').lower()
    have = part.resume_from(f"{meta.commit_hash}:{etag}", size)
    try:
        with open(part.part, "ab") as fh:
            http_get(meta.location, fh, resume_size=have, expected_size=size,
                     displayed_filename=src.path, tqdm_class=bar)  # type: ignore[arg-type]
    except OSError as e:   # the size check of http_get and disk errors
        raise ModelsError(f"{src.where()}: {e}".splitlines()[0]) from e
    except Exception as e:
        raise ModelsError(f"{src.where()}: download failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}); run the fetch again to resume") from e
    return size, etag if _SHA256.match(etag) else ""


def _fetch_url(src: Source, part: _Part, timeout: float, bar: Callable[..., _Bar]) -> tuple[int | None, str]:
    """Plain HTTP(S) download with range resume."""
    size = src.size or None
    have = part.resume_from(src.url, size)
    if size is not None and have == size:
        return size, ""
    req = urllib.request.Request(src.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if have and r.status != 206:      # the server ignored the range: start over
                have = 0
            mode = "ab" if have else "wb"
            length = r.headers.get("Content-Length")
            total = have + int(length) if length is not None else size
            with open(part.part, mode) as fh, bar(total=total, initial=have) as b:
                while block := r.read(1 << 16):
                    b.update(len(block))
                    fh.write(block)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise _NotFound(f"{src.url}: 404") from e
        raise ModelsError(f"download of {src.url} failed: {e}") from e
    except OSError as e:
        raise ModelsError(f"download of {src.url} failed: {e}; run the fetch again to resume") from e
    got = part.part.stat().st_size
    if size is not None and got != size:
        part.discard()
        raise ModelsError(f"{src.url}: got {got} bytes, expected {size}; the partial file was deleted")
    return size, ""


def candidate_sources(f: ModelFile, choice: dict[str, Origin] | None = None) -> list[Source]:
    """The sources to try for ``f``, in order, under the per-group origin ``choice``."""
    origin = (choice or {}).get(f.group, "auto")
    if origin == "auto":
        return sorted(f.sources, key=lambda s: s.origin != "moda")
    chosen = [s for s in f.sources if s.origin == origin]
    return chosen or list(f.sources)     # a group with one origin only ignores the choice


def fetch(name: str = "official", dest: str | Path | None = None, *, timeout: float = 30.0,
          force: bool = False, manifest: str | Path = MANIFEST,
          origins: dict[str, Origin] | None = None, progress: ProgressFn | None = None,
          now: Callable[[], float] = time.monotonic) -> list[FileStatus]:
    """Download the files of set ``name`` into ``dest`` (default :func:`models_dir`) and verify them.

    Args:
        origins: per manifest group ("liveportrait", "hubert"), which copy to fetch
            (:data:`Origin`; default "auto": MoDA's repo, falling back to upstream when a file is
            not there).
        progress: called with :class:`FetchProgress` per file (bytes, rate, ETA).
        now: clock for the progress rate.

    Files already present and verifying are kept (unless ``force``).  Offline (``HF_HUB_OFFLINE``
    set, or the host unreachable within a few seconds) → :class:`ModelsError` at once, naming the
    missing files.  A digest or size mismatch deletes the download and raises; an interrupted
    download resumes on the next call.
    """
    d = Path(dest) if dest is not None else models_dir()
    files = _select(name, manifest)
    pins = read_pins(d)
    todo = [f for f in files if force or not check_file(f, d, pins).good]
    if not todo:
        return verify(d, name, manifest)
    missing = ", ".join(f.name for f in todo)
    if _offline():
        raise ModelsError(f"HF_HUB_OFFLINE is set and these files are missing from {d}: {missing}. "
                          "Unset it to download, or copy the files there")
    hosts = {_endpoint() if s.kind == "hf" else s.url
             for f in todo for s in candidate_sources(f, origins)[:1]}
    for h in sorted(hosts):
        _probe(h, min(PROBE_TIMEOUT_S, timeout))
    d.mkdir(parents=True, exist_ok=True)
    for f in todo:
        _fetch_one(f, d, timeout, origins, progress, now)
    return verify(d, name, manifest)


def _fetch_one(f: ModelFile, d: Path, timeout: float, origins: dict[str, Origin] | None,
               progress: ProgressFn | None, now: Callable[[], float]) -> Path:
    tried = []
    for src in candidate_sources(f, origins):
        local = src.save_as or f.name
        part = _Part(d / local)
        bar = functools.partial(_Bar, local, progress, now)
        try:
            size, server_sha = (_fetch_hf if src.kind == "hf" else _fetch_url)(src, part, timeout, bar)
        except _NotFound as e:
            tried.append(str(e))
            continue
        got = part.part.stat().st_size
        if size is not None and got != size:
            part.discard()
            raise ModelsError(f"{local}: got {got} bytes from {src.where()}, expected {size}; the "
                              "partial file was deleted, fetch again")
        digest = sha256_file(part.part)
        want = src.sha256 or server_sha
        if want and digest != want:
            part.discard()
            whose = "the manifest's" if src.sha256 else "the server's"
            raise ModelsError(f"{local} from {src.where()}: sha256 {digest} does not match "
                              f"{whose} {want}; the download was deleted")
        for other in f.names:              # one weights file per entry: drop a stale alternative
            if other != local:
                (d / other).unlink(missing_ok=True)
        part.commit()
        return d / local
    raise ModelsError(f"{f.name}: not found at any source ({'; '.join(tried)})")
