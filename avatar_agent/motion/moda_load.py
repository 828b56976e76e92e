"""Loading this project's own trained MoDA models (the shipped tiny MoDA and any ``train`` export).

One export = ``NAME.safetensors`` (the DiT's weights) beside ``NAME.json`` (its ``MoDAParams``,
motion/audio statistics, feature config, CFG null audio, optional fixed identity and the
``inference`` block of settings it is meant to run with).  The trainer writes it
(:func:`avatar_agent.train.loop.export_checkpoint`); the live agent reads it here, so the runtime
never imports the training package.

Inference settings, lowest precedence first: :data:`INFERENCE_DEFAULTS` → the file's
``inference`` block → explicit overrides (the ``[motion]`` config section via
:mod:`avatar_agent.wiring`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import numpy as np

from avatar_agent.types import MOTION_FPS

if TYPE_CHECKING:
    import torch

    from avatar_agent.motion.moda import MoDAMotion
    from avatar_agent.nn.moda import DiTRunner, MoDADiT
    from avatar_agent.nn.moda_onnx import OnnxDiT

log = logging.getLogger(__name__)

EXPORT_FORMAT = "avatar-agent-moda"
"""The ``format`` value of an export's JSON."""
EXPORT_VERSION = 1

FEATURE_FPS = MOTION_FPS
"""Video frames per second the features (and the models) are made for."""

DEFAULT_FEATURE: dict[str, Any] = {"kind": "mel", "n_mels": 80, "fps": FEATURE_FPS}
"""Feature config of the embedded profile (log-mel, 1 block × 80 bins per video frame)."""


class ModelFileError(ValueError):
    """A trained model file is missing or invalid; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def check_feature(feature: Mapping[str, Any]) -> Mapping[str, Any]:
    """Validate a feature config; returns it."""
    if feature.get("kind") != "mel":
        raise ModelFileError(f"feature kind {feature.get('kind')!r} is not supported; use "
                             "{'kind': 'mel', 'n_mels': 80, 'fps': 25}")
    if int(feature.get("fps", FEATURE_FPS)) != FEATURE_FPS:
        raise ModelFileError(f"feature fps must be {FEATURE_FPS}, got {feature.get('fps')}")
    return feature


def extract_features(audio: np.ndarray, feature: Mapping[str, Any]) -> np.ndarray:
    """Raw (not standardised) features [T = len // 640, blocks, dim] for the feature config."""
    from avatar_agent.audio.features import mel_frames

    check_feature(feature)
    return mel_frames(audio, FEATURE_FPS, int(feature.get("n_mels", 80)))[:, None, :]


def feature_fn(feature: Mapping[str, Any], mean: np.ndarray | None = None,
               std: np.ndarray | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``audio (16 kHz float32) -> [T, blocks, dim]``, standardised with ``mean``/``std`` ([L, D],
    the training corpus' audio statistics) when given — the features callable for
    :class:`avatar_agent.motion.moda.MoDAMotion` with a model trained on that corpus."""
    check_feature(feature)
    m = None if mean is None else np.asarray(mean, np.float32)
    s = None if std is None else np.asarray(std, np.float32)

    def features(audio: np.ndarray) -> np.ndarray:
        f = extract_features(audio, feature)
        return f if m is None or s is None else ((f - m) / s).astype(np.float32)

    return features


# --------------------------------------------------------------------------------------------
# Inference settings
# --------------------------------------------------------------------------------------------

INFERENCE_DEFAULTS: dict[str, Any] = {
    "steps": 3, "final_step": False, "cfg_audio": 0.0, "hop": 12, "crossfade": 4,
    "min_hop_ms": 160, "feature_context": 1, "context": 8,
}
"""How an exported tiny model is run unless its JSON's ``inference`` block says otherwise: Euler
steps of the release grid and whether to take its last 0.1 % step (3 steps without it = 2 network
evaluations, σ 1 → 0.5 → 0.001), audio CFG λ (eq. 8; 0 = no null-audio pass: the embedded
profile replaces the DiT's mouth with the procedural articulation, and for the head and the rest of
the face λ 0 is as close to the teacher as λ 1 (closer on expression error and pose jerk) at 60 %
of the network cost; λ 1 makes the DiT's own mouth open wider and close in pauses), frames emitted
per window, frames blended at window seams, the shortest
chunk hop (one DiT window per hop keeps the cost per second of audio low: bench/bench_moda.py) and
the left context the (frame-local mel) features need.  Chosen with bench/eval_moda_tiny.py (see the
model card); ``context``: frames already shown that each window re-uses as pinned context
(:class:`avatar_agent.motion.moda.MoDAMotion`).  The window length is the model's ``seq_len``
unless overridden with ``window``."""

_OVERRIDABLE = frozenset(INFERENCE_DEFAULTS) | {"window"}


def inference_settings(meta: Mapping[str, Any],
                       overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The export's ``inference`` block over :data:`INFERENCE_DEFAULTS`, then ``overrides``
    (None values keep the file's).  ``window`` (frames per DiT window) is added: the model's
    ``seq_len`` unless overridden."""
    out = dict(INFERENCE_DEFAULTS)
    extra = meta.get("inference") or {}
    unknown = set(extra) - set(out)
    if unknown:
        raise ModelFileError(f"unknown keys {sorted(unknown)} in the model's inference settings")
    out.update(extra)
    out["window"] = int((meta.get("params") or {}).get("seq_len", 80))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = set(given) - _OVERRIDABLE
    if bad:
        raise ModelFileError(f"unknown inference settings {sorted(bad)}; known: "
                             f"{sorted(_OVERRIDABLE)}")
    out.update(given)
    return out


def export_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, JSON) of an export given either file or the common stem."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def read_meta(path: str | Path) -> dict[str, Any]:
    """An export's JSON (no weights, no torch): cheap enough for ``check`` and the chunker."""
    _, j_path = export_paths(path)
    if not j_path.is_file():
        raise ModelFileError(f"trained model file missing: {j_path}")
    try:
        meta = json.loads(j_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{j_path} is not valid JSON ({e}); re-export the model") from e
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ModelFileError(f"{j_path} is not an {EXPORT_FORMAT} export")
    return meta


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_trained(path: str | Path, device: "torch.device | str" = "cpu"
                 ) -> tuple["MoDADiT", dict[str, Any]]:
    """Load an export: (DiT in eval mode, meta).

    ``meta`` is the JSON plus ready-to-use objects: ``mean``/``std`` (float32 [70], motion
    statistics), ``null_audio`` (tensor [1, 1, 1, L, D]) and ``features`` (``audio -> [T, L, D]``
    standardised features) — exactly what :class:`avatar_agent.motion.moda.MoDAMotion` takes.
    """
    import torch
    from safetensors.torch import load_file

    from avatar_agent.nn.moda import MoDADiT, MoDAParams
    from avatar_agent.nn.weights import WeightsError, check_state_dict

    w_path, j_path = export_paths(path)
    if not w_path.is_file():
        raise ModelFileError(f"trained model file missing: {w_path}")
    meta = read_meta(j_path)
    try:
        params = MoDAParams(**meta["params"])
        mean, std = (np.asarray(meta[k], np.float32) for k in ("motion_mean", "motion_std"))
        a_mean, a_std = (np.asarray(meta[k], np.float32) for k in ("audio_mean", "audio_std"))
        features = feature_fn(meta["feature"], a_mean, a_std)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{j_path} is not a valid export config ({e}); re-export the model"
                             ) from e
    try:
        state = load_file(str(w_path))
    except Exception as e:  # safetensors' own error type is not public API
        raise ModelFileError(f"{w_path} is corrupt ({e}); re-export the model") from e
    model = MoDADiT(params)
    try:
        check_state_dict(state, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                         f"{w_path} (against {j_path.name})")
    except WeightsError as e:
        raise ModelFileError(f"{e}; re-export the model") from e
    model.load_state_dict(state, strict=True)
    null = torch.tensor(meta["null_audio"], dtype=torch.float32).reshape(
        1, 1, 1, params.audio_blocks, params.audio_dim)
    meta.update(mean=mean, std=std, null_audio=null, features=features)
    return model.to(device).eval(), meta


def build_motion(path: str | Path, *, steps: int | None = None, cfg_audio: float | None = None,
                 cfg_emotion: float = 0.0, trace: bool = True, window: int | None = None,
                 hop: int | None = None, crossfade: int | None = None, context: int | None = None,
                 min_hop_ms: int | None = None, final_step: bool | None = None,
                 feature_context: int | None = None,
                 runtime: Literal["auto", "onnx", "torch"] = "auto", **kwargs: Any
                 ) -> "MoDAMotion":
    """A streaming :class:`~avatar_agent.motion.moda.MoDAMotion` (profile "embedded") for an
    exported model.

    Args:
        path: the export (``.safetensors`` beside its ``.json``).
        steps, cfg_audio, window, hop, crossfade, context, min_hop_ms, final_step,
            feature_context: override the model's inference settings (None = its own; see
            :data:`INFERENCE_DEFAULTS`).
        cfg_emotion: emotion CFG λ.
        trace: with the torch runtime, run the DiT as a frozen TorchScript trace (CPU speed;
            same numbers).
        runtime: "onnx" runs the DiT on ONNX Runtime from the ``.onnx`` export beside the
            weights (:mod:`avatar_agent.nn.moda_onnx`; faster on CPU, equal to ~1e-5), "torch"
            on torch; "auto" = ONNX when that export is there, made from these weights, the
            device is the CPU and onnxruntime is installed, else torch (saying why in the log).
        kwargs: more :class:`MoDAMotion` arguments (idle, seed, device, ...).
    """
    from avatar_agent.motion.moda import MoDAMotion
    from avatar_agent.nn.moda import TracedDiT
    from avatar_agent.nn.sampling import Guidance

    model, meta = load_trained(path, kwargs.get("device", "cpu"))
    inf = inference_settings(meta, {
        "steps": steps, "cfg_audio": cfg_audio, "window": window, "hop": hop,
        "crossfade": crossfade, "context": context, "min_hop_ms": min_hop_ms,
        "final_step": final_step, "feature_context": feature_context})
    kwargs.setdefault("profile", meta.get("profile", "embedded"))
    kwargs.setdefault("null_audio", meta["null_audio"])
    kwargs.setdefault("relative", bool(meta.get("relative", False)))
    if meta.get("identity") is not None:
        kwargs.setdefault("identity", np.asarray(meta["identity"], np.float32))
    net: DiTRunner = TracedDiT(model) if trace else model
    if runtime != "torch":
        net = _onnx_runner(path, model, str(kwargs.get("device", "cpu")), runtime == "onnx") or net
    return MoDAMotion(net, meta["features"], meta["mean"], meta["std"],
                      guidance=Guidance(audio=inf["cfg_audio"], emotion=cfg_emotion),
                      steps=inf["steps"], window=inf["window"], hop=min(inf["hop"], inf["window"]),
                      crossfade=inf["crossfade"], min_hop_ms=inf["min_hop_ms"],
                      final_step=inf["final_step"], context=inf["context"],
                      feature_context=inf["feature_context"], **kwargs)


def _onnx_runner(path: str | Path, model: "MoDADiT", device: str, required: bool
                 ) -> "OnnxDiT | None":
    """The ONNX Runtime runner of the export at ``path``, or None (with the reason logged) when
    it cannot be used and ``required`` is False."""
    from avatar_agent.models import sha256_file
    from avatar_agent.nn.moda_onnx import OnnxDiT, OnnxDiTError

    w_path, _ = export_paths(path)
    why = _onnx_precondition(w_path, device)
    if why is None:
        try:
            return OnnxDiT(w_path.with_suffix(".onnx"), model.params, sha256_file(w_path))
        except OnnxDiTError as e:
            why = str(e)
    if required:
        raise ModelFileError(f"motion.runtime = \"onnx\" cannot be used: {why}")
    log.info("tiny MoDA runs on torch: %s", why)
    return None


def _onnx_precondition(w_path: Path, device: str) -> str | None:
    """Why the ONNX export beside ``w_path`` cannot be tried (None: it can)."""
    if not device.startswith("cpu"):
        return f"the DiT runs on {device}"
    if not w_path.with_suffix(".onnx").is_file():
        return f"no {w_path.with_suffix('.onnx').name} beside the weights"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    return None


def onnx_problem(path: str | Path) -> str | None:
    """Why ``motion.runtime = "onnx"`` would fail for this export (None: it works): what
    ``avatar-agent check`` reports.  Loads the graph, not the torch model."""
    from avatar_agent.models import sha256_file
    from avatar_agent.nn.moda import MoDAParams
    from avatar_agent.nn.moda_onnx import OnnxDiT, OnnxDiTError

    w_path, _ = export_paths(path)
    why = _onnx_precondition(w_path, "cpu")
    if why is None:
        try:
            OnnxDiT(w_path.with_suffix(".onnx"), MoDAParams(**read_meta(w_path)["params"]),
                    sha256_file(w_path))
        except (OnnxDiTError, TypeError) as e:
            why = str(e)
    return why


__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "FEATURE_FPS", "DEFAULT_FEATURE", "ModelFileError",
           "check_feature", "extract_features", "feature_fn", "INFERENCE_DEFAULTS",
           "inference_settings", "export_paths", "read_meta", "load_trained", "build_motion",
           "onnx_problem"]
