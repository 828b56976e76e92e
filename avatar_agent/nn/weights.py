"""Loading and saving weights: the one place that knows upstream checkpoint layouts.

* MoDA ``net-200.pth``: a flat state dict of the release's ``MotionDiffusion``; the DiT keys carry
  the prefix ``talking_head_dit.``.  Loaded strictly: every missing key, unexpected key and shape
  mismatch is named in the error.  Only the wrapper's own non-DiT entries (``scheduler.sigmas``,
  ``null_audio_feat``, ``null_motion_feat``) are tolerated; ``null_audio_feat`` is returned when
  present (the release draws it at random otherwise, in ``flow_matching.py``).
* ``mean.pt``: ``{"mean": [1, 70], "std": [1, 70]}`` motion statistics.
* chinese-hubert-base directory: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``.
  Old checkpoints name the positional-conv weight norm ``weight_g``/``weight_v``; transformers ≥ 4.3x
  (4.57 and 5.24 alike) name them ``parametrizations.weight.original0/1``; a ``hubert.`` prefix
  (from a ``HubertFor*`` head model) is stripped.

Our own trained models are exports of :mod:`avatar_agent.train.loop` (``.safetensors`` of the DiT +
``.json`` with params, feature config, statistics and inference settings); their key check uses
:func:`check_state_dict` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from avatar_agent.nn.moda import PRESETS, RELEASE_PREFIX, MoDADiT, MoDAParams, build_dit

MODA_WRAPPER_KEYS = ("scheduler.sigmas", "null_audio_feat", "null_motion_feat")
"""Entries of the release's MotionDiffusion state dict that are not part of the DiT."""


class WeightsError(ValueError):
    """A weights file is missing, corrupt, or not the expected checkpoint."""


def _torch_load(path: Path, what: str) -> Any:
    if not path.is_file():
        raise WeightsError(f"{what} not found: {path}. Fetch the official files with "
                           "`avatar-agent models fetch` (or pass the right path).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/garbled pickles and zips
        raise WeightsError(f"{what} at {path} could not be read ({type(e).__name__}: {e}); the file "
                           "is corrupt or not a PyTorch checkpoint — delete it and fetch it again") from e


def _describe(n: int, items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return f"{n} ({shown}{', ...' if n > limit else ''})"


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                     what: str, ignore: tuple[str, ...] = ()) -> None:
    """Raise :class:`WeightsError` naming every missing/unexpected key and shape mismatch."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected and k not in ignore]
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
           for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append("missing keys " + _describe(len(missing), missing))
        if extra:
            parts.append("unexpected keys " + _describe(len(extra), extra))
        if bad:
            parts.append("shape mismatches " + _describe(len(bad), bad))
        raise WeightsError(f"{what} does not match the model: " + "; ".join(parts))


# --------------------------------------------------------------------------------------------
# MoDA release
# --------------------------------------------------------------------------------------------


def dit_release_manifest(model: MoDADiT) -> dict[str, tuple[int, ...]]:
    """Release key → shape for a DiT (``talking_head_dit.`` prefixed)."""
    return {RELEASE_PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_moda_state(state: Mapping[str, torch.Tensor], model: MoDADiT,
                    what: str = "MoDA checkpoint") -> torch.Tensor | None:
    """Copy a release-layout state dict into ``model`` (strict); returns ``null_audio_feat`` or None."""
    if not isinstance(state, Mapping):
        raise WeightsError(f"{what} is a {type(state).__name__}, expected a flat state dict "
                           "(key → tensor) as net-200.pth")
    if not any(k.startswith(RELEASE_PREFIX) for k in state):
        nested = [k for k in ("state_dict", "model", "ema", "module") if k in state]
        hint = f" (it has top-level entries {nested}; not the release layout)" if nested else ""
        raise WeightsError(f"{what} has no '{RELEASE_PREFIX}*' keys{hint}: this is not MoDA's "
                           "net-200.pth")
    check_state_dict(state, dit_release_manifest(model), what, ignore=MODA_WRAPPER_KEYS)
    ours = {k[len(RELEASE_PREFIX):]: v for k, v in state.items() if k.startswith(RELEASE_PREFIX)}
    model.load_state_dict(ours, strict=True)
    null = state.get("null_audio_feat")
    return None if null is None else null.detach().float().reshape(1, 1, 1, 1, -1)


def load_moda_release(path: str | Path, device: torch.device | str = "cpu",
                      params: MoDAParams | None = None) -> tuple[MoDADiT, torch.Tensor | None]:
    """Build the release DiT and load ``net-200.pth``; returns (model in eval mode, null_audio_feat|None)."""
    path = Path(path)
    state = _torch_load(path, "MoDA checkpoint (net-200.pth)")
    model = build_dit(params or PRESETS["release"], device="meta")
    model = model.to_empty(device="cpu")
    null = load_moda_state(state, model, f"MoDA checkpoint {path}")
    return model.to(device).eval(), null


def load_mean_std(path: str | Path, dim: int = 70) -> tuple[np.ndarray, np.ndarray]:
    """Motion statistics from ``mean.pt``: (mean [dim], std [dim]) float32."""
    path = Path(path)
    data = _torch_load(path, "motion statistics (mean.pt)")
    if not isinstance(data, Mapping) or "mean" not in data or "std" not in data:
        raise WeightsError(f"{path} must hold a dict with 'mean' and 'std' tensors "
                           f"(got {type(data).__name__} {list(data)[:5] if isinstance(data, Mapping) else ''})")
    out = []
    for name in ("mean", "std"):
        t = torch.as_tensor(data[name])
        if tuple(t.shape) not in ((1, dim), (dim,)):
            raise WeightsError(f"{path}: '{name}' has shape {tuple(t.shape)}, expected [1, {dim}] "
                               "(MoDA's 70-d motion statistics)")
        out.append(t.reshape(dim).float().numpy())
    if np.any(out[1] < 0) or not all(np.all(np.isfinite(a)) for a in out):
        raise WeightsError(f"{path}: std must be finite and >= 0 and mean finite")
    return out[0], out[1]


def save_mean_std(path: str | Path, mean: np.ndarray, std: np.ndarray) -> None:
    """Write motion statistics in the release's ``mean.pt`` layout."""
    torch.save({"mean": torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1),
                "std": torch.as_tensor(std, dtype=torch.float32).reshape(1, -1)}, path)


# --------------------------------------------------------------------------------------------
# HuBERT
# --------------------------------------------------------------------------------------------


def rename_hubert_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map upstream HuBERT key names to transformers' current names (see module docstring)."""
    out = {}
    for k, v in state.items():
        if k.startswith("hubert."):
            k = k[len("hubert."):]
        k = k.replace("pos_conv_embed.conv.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0")
        k = k.replace("pos_conv_embed.conv.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1")
        out[k] = v
    return out


def load_hubert_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Strictly load (renamed) HuBERT weights; ``masked_spec_embed`` (training only) is optional."""
    state = rename_hubert_keys(state)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = [k for k in state if k not in expected and (k.startswith("lm_head") or k.startswith("project_"))]
    state = {k: v for k, v in state.items() if k not in head}
    if "masked_spec_embed" in expected and "masked_spec_embed" not in state:
        state["masked_spec_embed"] = model.state_dict()["masked_spec_embed"]
    check_state_dict(state, expected, what)
    model.load_state_dict(state, strict=True)


def load_hubert(directory: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """chinese-hubert-base from a local directory (never downloads): HubertModel in eval mode."""
    from avatar_agent.nn.hubert import _transformers, build_hubert, hubert_config

    d = Path(directory)
    if not d.is_dir():
        raise WeightsError(f"HuBERT directory not found: {d}. Fetch it with `avatar-agent models fetch`.")
    if (d / "config.json").is_file():
        tf = _transformers()
        cfg = tf.HubertConfig.from_pretrained(str(d), local_files_only=True)
        cfg._attn_implementation = "eager"
    else:
        cfg = hubert_config()
    model = build_hubert(cfg)
    if (d / "model.safetensors").is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(d / "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{d / 'model.safetensors'} is corrupt ({e}); fetch it again") from e
        what = str(d / "model.safetensors")
    elif (d / "pytorch_model.bin").is_file():
        state = _torch_load(d / "pytorch_model.bin", "HuBERT weights")
        what = str(d / "pytorch_model.bin")
    else:
        raise WeightsError(f"{d} has no model.safetensors or pytorch_model.bin")
    load_hubert_state(model, state, f"HuBERT weights {what}")
    return model.to(device).eval()
