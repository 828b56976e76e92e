"""Loading the released LivePortrait checkpoints strictly (the release's ``pretrained_weights/liveportrait/``).

The official files are plain ``torch.save`` state dicts:

=====================================  ==================================================
file                                   content
=====================================  ==================================================
``appearance_feature_extractor.pth``   F state dict (keys as :class:`AppearanceFeatureExtractor`)
``motion_extractor.pth``               M state dict (keys start with ``detector.``)
``warping_module.pth``                 W state dict
``spade_generator.pth``                G state dict, convs spectrally normalised
                                       (``weight_orig``/``weight_u``/``weight_v``)
``stitching_retargeting_module.pth``   ``{"retarget_shoulder", "retarget_mouth", "retarget_eye"}``
                                       sub-dicts (keys may carry a ``module.`` prefix)
=====================================  ==================================================

Every key set is checked against the module: missing, unexpected and mis-shaped keys are all
named in one :class:`WeightsError`.  Spectral norm is folded into plain conv weights here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from avatar_agent.nn.liveportrait.appearance import APPEARANCE_PRESETS, AppearanceFeatureExtractor
from avatar_agent.nn.liveportrait.motion_extractor import MOTION_PRESETS, MotionExtractor
from avatar_agent.nn.liveportrait.spade import SPADE_PRESETS, SPECTRAL_NORM_CONVS, SpadeGenerator
from avatar_agent.nn.liveportrait.stitching import StitchingRetargeting
from avatar_agent.nn.liveportrait.warping import WARPING_PRESETS, WarpingNetwork

FETCH_HINT = "avatar-agent models fetch official"

MODULE_FILES: dict[str, str] = {
    "appearance_feature_extractor": "appearance_feature_extractor.pth",
    "motion_extractor": "motion_extractor.pth",
    "warping_module": "warping_module.pth",
    "spade_generator": "spade_generator.pth",
    "stitching_retargeting_module": "stitching_retargeting_module.pth",
}
"""Module name → checkpoint file name (the release's names)."""

SUBDIRS: dict[str, str] = {
    "appearance_feature_extractor": "base_models",
    "motion_extractor": "base_models",
    "warping_module": "base_models",
    "spade_generator": "base_models",
    "stitching_retargeting_module": "retargeting_models",
}
"""Where the release puts each file below ``pretrained_weights/liveportrait/``."""

STITCHING_SUBDICTS: tuple[str, ...] = ("retarget_shoulder", "retarget_mouth", "retarget_eye")


class WeightsError(ValueError):
    """A checkpoint is missing, unreadable or does not match the network."""


@dataclass
class LivePortraitModules:
    """The five networks, in eval mode, on one device."""

    appearance: AppearanceFeatureExtractor
    motion: MotionExtractor
    warping: WarpingNetwork
    spade: SpadeGenerator
    stitching: StitchingRetargeting

    def to(self, device: torch.device | str) -> "LivePortraitModules":
        """Move all five networks to ``device`` (in place); returns self."""
        for m in self.all():
            m.to(device)
        return self

    def all(self) -> tuple[nn.Module, ...]:
        """The five networks in a fixed order (appearance, motion, warping, spade, stitching)."""
        return (self.appearance, self.motion, self.warping, self.spade, self.stitching)


def build_modules(preset: str = "release") -> LivePortraitModules:
    """The five networks of a preset ("release" or "tiny" for tests), untrained, eval mode."""
    if preset not in APPEARANCE_PRESETS:
        raise ValueError(f"unknown LivePortrait preset {preset!r}; choose from {sorted(APPEARANCE_PRESETS)}")
    mods = LivePortraitModules(AppearanceFeatureExtractor(APPEARANCE_PRESETS[preset]),
                               MotionExtractor(MOTION_PRESETS[preset]),
                               WarpingNetwork(WARPING_PRESETS[preset]),
                               SpadeGenerator(SPADE_PRESETS[preset]), StitchingRetargeting())
    for m in mods.all():
        m.eval().requires_grad_(False)
    return mods


# --------------------------------------------------------------------------------------------
# Key sets
# --------------------------------------------------------------------------------------------

def _spectral_prefixes(model: nn.Module) -> set[str]:
    """Dotted names of convs that the release stores spectrally normalised."""
    if not isinstance(model, SpadeGenerator):
        return set()
    return {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in SPECTRAL_NORM_CONVS}


def official_manifest(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key → shape of the release's checkpoint for ``model`` (spectral-norm keys expanded)."""
    sn = _spectral_prefixes(model)
    out: dict[str, tuple[int, ...]] = {}
    for key, val in model.state_dict().items():
        prefix, leaf = key.rsplit(".", 1)
        if prefix in sn and leaf == "weight":
            out[prefix + ".weight_orig"] = tuple(val.shape)
            out[prefix + ".weight_u"] = (val.shape[0],)
            out[prefix + ".weight_v"] = (val[0].numel(),)
        else:
            out[key] = tuple(val.shape)
    return out


def check_keys(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise :class:`WeightsError` naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    bad = sorted(k for k in set(sd) & set(expected)
                 if not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != expected[k])
    if not (missing or extra or bad):
        return
    lines = [f"{what}: checkpoint does not match the network"]
    if missing:
        lines.append(f"  missing {len(missing)} keys: {', '.join(missing)}")
    if extra:
        lines.append(f"  unexpected {len(extra)} keys: {', '.join(extra)}")
    for k in bad:
        got = tuple(sd[k].shape) if isinstance(sd[k], torch.Tensor) else type(sd[k]).__name__
        lines.append(f"  {k}: shape {got} in file, network expects {expected[k]}")
    lines.append(f"  (wrong or corrupt file? re-fetch with `{FETCH_HINT}`)")
    raise WeightsError("\n".join(lines))


def fold_spectral_norm(sd: dict[str, torch.Tensor], prefixes: set[str]) -> dict[str, torch.Tensor]:
    """Replace ``P.weight_orig/_u/_v`` by ``P.weight = weight_orig / (u · (W v))``.

    That is what old-API spectral norm computes in eval with the stored u, v (no power iteration).
    """
    out = dict(sd)
    for p in prefixes:
        w = out.pop(p + ".weight_orig")
        u = out.pop(p + ".weight_u")
        v = out.pop(p + ".weight_v")
        sigma = torch.dot(u, torch.mv(w.reshape(w.shape[0], -1), v))
        out[p + ".weight"] = w / sigma
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def read_checkpoint(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True`` on CPU; unreadable files → :class:`WeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found; fetch it with `{FETCH_HINT}`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/garbage files
        raise WeightsError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); the file "
                           f"is corrupt or not a LivePortrait .pth — re-fetch with `{FETCH_HINT}`") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


_Net = TypeVar("_Net", bound=nn.Module)


def load_state(model: _Net, sd: dict, what: str) -> _Net:
    """Check ``sd`` against the release's key set for ``model``, fold, and load strictly."""
    check_keys(sd, official_manifest(model), what)
    sd = fold_spectral_norm(sd, _spectral_prefixes(model))
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


def load_stitching(model: StitchingRetargeting, obj: dict, what: str) -> StitchingRetargeting:
    """Load the three sub-dicts of the S file (``module.`` prefixes stripped, as the release)."""
    missing = [k for k in STITCHING_SUBDICTS if k not in obj or not isinstance(obj[k], dict)]
    if missing:
        raise WeightsError(f"{what}: missing sub-dicts {missing} (found keys {sorted(map(str, obj))[:8]}); "
                           f"re-fetch with `{FETCH_HINT}`")
    flat = {f"{name}.{k.replace('module.', '')}": v
            for name in STITCHING_SUBDICTS for k, v in obj[name].items()}
    return load_state(model, flat, what)


def find_weight_files(root: str | Path) -> dict[str, Path]:
    """Locate the five files below ``root``; raise one error listing every missing file.

    Accepted layouts: the release's ``base_models/`` + ``retargeting_models/`` directly in
    ``root``, below ``root/liveportrait/`` or ``root/pretrained_weights/liveportrait/``; or all
    five files flat in ``root`` or ``root/liveportrait/``.
    """
    root = Path(root)
    found: dict[str, Path] = {}
    missing: list[str] = []
    # Name the paths of the layout `avatar-agent models fetch` writes (models/manifest.toml:
    # <models dir>/liveportrait/...) unless root already is a liveportrait directory.
    is_lp_dir = root.name == "liveportrait" or (root / "base_models").is_dir()
    base = root if is_lp_dir else root / "liveportrait"
    for name, fname in MODULE_FILES.items():
        candidates = [root / SUBDIRS[name] / fname, root / fname,
                      root / "liveportrait" / SUBDIRS[name] / fname, root / "liveportrait" / fname,
                      root / "pretrained_weights" / "liveportrait" / SUBDIRS[name] / fname]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(str(base / SUBDIRS[name] / fname))
        else:
            found[name] = hit
    if missing:
        raise WeightsError("LivePortrait weights not found:\n  " + "\n  ".join(missing)
                           + f"\nFetch them with `{FETCH_HINT}`.")
    return found


def load_modules(root: str | Path, device: torch.device | str = "cpu") -> LivePortraitModules:
    """Build the five networks and load the release's checkpoints from ``root`` (strict)."""
    files = find_weight_files(root)
    mods = build_modules()
    load_state(mods.appearance, read_checkpoint(files["appearance_feature_extractor"]),
               str(files["appearance_feature_extractor"]))
    load_state(mods.motion, read_checkpoint(files["motion_extractor"]), str(files["motion_extractor"]))
    load_state(mods.warping, read_checkpoint(files["warping_module"]), str(files["warping_module"]))
    load_state(mods.spade, read_checkpoint(files["spade_generator"]), str(files["spade_generator"]))
    load_stitching(mods.stitching, read_checkpoint(files["stitching_retargeting_module"]),
                   str(files["stitching_retargeting_module"]))
    return mods.to(device)


def save_official_layout(state_dicts: dict[str, dict[str, torch.Tensor]], root: str | Path) -> Path:
    """Write official-format state dicts (keys as the release) into ``root`` in the release layout.

    ``state_dicts['stitching_retargeting_module']`` uses ``<subdict>.<key>`` names (as the
    manifest) and is split into the three sub-dicts.  Used by tests with synthetic weights.
    """
    root = Path(root)
    for name, sd in state_dicts.items():
        path = root / SUBDIRS[name] / MODULE_FILES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "stitching_retargeting_module":
            obj: dict = {s: {k[len(s) + 1:]: v for k, v in sd.items() if k.startswith(s + ".")}
                         for s in STITCHING_SUBDICTS}
        else:
            obj = sd
        torch.save(obj, path)
    return root
