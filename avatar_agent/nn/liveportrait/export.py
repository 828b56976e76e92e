"""ONNX export of F, M and the fused W + G ("warp_decode"), runnable in onnxruntime CPU.

W samples 5-D volumes (trilinear ``grid_sample``); ONNX GridSample accepts 5-D inputs from
opset 20 (mode "linear"), which torch's TorchScript-based exporter (``dynamo=False``) emits.
That exporter is used because the dynamo exporter needs ``onnxscript``, which this project does
not install.  Graph inputs/outputs:

* appearance: ``image`` [B, 3, 256, 256] → ``f_s`` [B, 32, 16, 64, 64]
* motion: ``image`` → ``pitch, yaw, roll, t, exp, scale, kp`` (raw, :data:`OUTPUT_NAMES` order)
* warp_decode: ``feature_3d``, ``kp_driving``, ``kp_source`` → ``image`` [B, 3, 512, 512]
  (driving before source, as the release's W and the community ``warping_spade.onnx``)

The batch axis is dynamic in every graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from avatar_agent.nn.liveportrait.appearance import AppearanceFeatureExtractor
from avatar_agent.nn.liveportrait.motion_extractor import OUTPUT_NAMES, MotionExtractor
from avatar_agent.nn.liveportrait.spade import SpadeGenerator
from avatar_agent.nn.liveportrait.warping import WarpingNetwork

OPSET = 20
"""First opset whose GridSample takes 5-D inputs."""


class WarpDecode(nn.Module):
    """W followed by G as one graph: (f_s, kp_driving, kp_source) → image in [0, 1]."""

    def __init__(self, warping: WarpingNetwork, spade: SpadeGenerator) -> None:
        super().__init__()
        self.warping = warping
        self.spade = spade

    def forward(self, feature_3d: torch.Tensor, kp_driving: torch.Tensor,
                kp_source: torch.Tensor) -> torch.Tensor:
        """Warp the source feature volume to the driving keypoints and decode it: image [B, 3, 512, 512]."""
        out = self.warping(feature_3d, kp_driving=kp_driving, kp_source=kp_source)["out"]
        return self.spade(out)                                       # B×3×512×512


class _MotionTuple(nn.Module):
    """M with a tuple output in :data:`OUTPUT_NAMES` order (ONNX graphs have ordered outputs)."""

    def __init__(self, motion: MotionExtractor) -> None:
        super().__init__()
        self.motion = motion

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.motion(image)
        return tuple(out[k] for k in OUTPUT_NAMES)


def _export(model: nn.Module, args: tuple[torch.Tensor, ...], path: str | Path,
            inputs: list[str], outputs: list[str], opset: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {n: {0: "batch"} for n in inputs + outputs}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python ints taken from shapes (grid sizes); they are constants.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # SPADE's InstanceNorm always uses per-sample statistics; "train=True" is the intent.
        warnings.filterwarnings("ignore", message=".*instance_norm.*train=True")
        torch.onnx.export(model.eval(), args, str(path), dynamo=False, opset_version=opset,
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          do_constant_folding=True)
    return path


def export_appearance(module: AppearanceFeatureExtractor, path: str | Path, opset: int = OPSET,
                      image_size: int = 256) -> Path:
    """Write F as ONNX; returns the path."""
    x = torch.zeros(1, 3, image_size, image_size)
    return _export(module, (x,), path, ["image"], ["f_s"], opset)


def export_motion(module: MotionExtractor, path: str | Path, opset: int = OPSET,
                  image_size: int = 256) -> Path:
    """Write M as ONNX (outputs in :data:`OUTPUT_NAMES` order); returns the path."""
    x = torch.zeros(1, 3, image_size, image_size)
    return _export(_MotionTuple(module), (x,), path, ["image"], list(OUTPUT_NAMES), opset)


def export_warp_decode(warping: WarpingNetwork, spade: SpadeGenerator, path: str | Path,
                       feature_shape: tuple[int, int, int, int] | None = None,
                       opset: int = OPSET) -> Path:
    """Write W + G as one ONNX graph; ``feature_shape`` = (C, D, H, W) of f_s (release: 32, 16, 64, 64)."""
    if opset < 20:
        raise ValueError(f"warp_decode needs opset ≥ 20 for 5-D GridSample, got {opset}")
    if feature_shape is None:
        p = warping.params
        feature_shape = (p.reshape_channel, p.max_features // p.reshape_channel, 64, 64)
    f = torch.zeros(1, *feature_shape)
    kp = torch.zeros(1, warping.params.num_kp, 3)
    return _export(WarpDecode(warping, spade), (f, kp, kp), path,
                   ["feature_3d", "kp_driving", "kp_source"], ["image"], opset)


def onnx_session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session for an exported graph (``pip install onnxruntime`` if missing)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("onnxruntime is needed to run exported graphs: "
                          "pip install 'avatar-agent[bench]'") from e
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
