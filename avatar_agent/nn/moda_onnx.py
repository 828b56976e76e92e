"""The MoDA DiT through ONNX Runtime: export (offline) and a CPU runner (live).

Why: at the tiny preset's size (hidden 96, 4N = 64 tokens per window) a DiT forward is a few
hundred small ops.  PyTorch spends much of each forward dispatching them; ONNX Runtime runs the
same graph in ≈ 60 % of the time of the frozen TorchScript trace on one CPU thread
(bench/bench_moda.py), with equal numbers to ~1e-6.  Sampling several sessions' windows as one
batch would not help: both runtimes scale almost linearly with the batch at this size.

An export is ``NAME.onnx`` beside ``NAME.safetensors``; it records the sha256 of the weights file
it was made from, and :func:`load_onnx_dit` refuses one whose weights changed since (a retrained
model with a stale graph would otherwise run silently with the old weights).

Export needs ``onnxscript`` (the ``bench`` extra): ``python -m avatar_agent.nn.moda_onnx
models/embedded/moda-tiny.safetensors``.  The runner needs only ``onnxruntime``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatar_agent.nn.moda import MoDADiT, MoDAParams

ONNX_FORMAT = "avatar-agent-moda-onnx/1"
"""``format`` metadata of an export (bumped if the inputs or outputs change)."""
INPUTS = ("motion", "t", "audio", "emotion", "identity")
OPSET = 20
"""20: the first opset with a Gelu(tanh) operator; at 18 the exporter spells each GELU out in
eight element-wise ops.  With it (and the norms in the form ONNX Runtime fuses, see
:class:`~avatar_agent.nn.layers.RMSNorm`) the tiny DiT's graph has 30 % fewer nodes and a CFG
forward takes ≈ 15 % less time on one CPU thread (2.73 → 2.30 ms, batch 2)."""


class OnnxDiTError(RuntimeError):
    """An ONNX export that is missing, unreadable, or not made from these weights."""


def export_onnx(model: MoDADiT, path: str | Path, weights_sha256: str, window: int) -> Path:
    """Write ``model`` as an ONNX graph with a dynamic batch axis (CFG passes × sessions) for
    windows of ``window`` frames; returns the path.  ``weights_sha256``: the digest of the
    weights file the model was loaded from (checked again at load)."""
    import onnx  # noqa: F401 - (the exporter needs it; a clear ImportError here)

    p = model.params
    b = 2
    args = (torch.zeros(b, window, 2 * p.motion_dim), torch.full((b,), 500.0),
            torch.zeros(b, window, p.audio_unit_len, p.audio_blocks, p.audio_dim),
            torch.zeros(b, dtype=torch.int64), torch.zeros(b, p.id_dim))
    batch = torch.export.Dim("batch", min=1, max=256)
    out = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), args, input_names=list(INPUTS),
                                    output_names=["velocity"], opset_version=OPSET,
                                    dynamic_shapes=tuple({0: batch} for _ in INPUTS),
                                    dynamo=True, verbose=False)
    assert program is not None
    program.model.metadata_props.update({"format": ONNX_FORMAT, "weights_sha256": weights_sha256,
                                         "params": repr(p), "window": str(window)})
    program.save(str(out))
    return out


class OnnxDiT:
    """A :class:`~avatar_agent.nn.moda.MoDADiT` stand-in running an exported graph on ONNX
    Runtime (CPU, one thread per call: the inference workers are the parallelism).  Thread-safe:
    several sessions' workers may call it at once.

    Args:
        path: the ``.onnx`` export.
        params: the network's hyper-parameters (from the export's JSON).
        weights_sha256: the digest the export must record (None: not checked).
    """

    def __init__(self, path: str | Path, params: MoDAParams,
                 weights_sha256: str | None = None) -> None:
        import onnxruntime as ort

        self.params, self.path = params, Path(path)
        if not self.path.is_file():
            raise OnnxDiTError(f"ONNX export missing: {self.path}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3                      # errors only: no per-session chatter
        try:
            self.session = ort.InferenceSession(str(self.path), so,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's error types are not public API
            raise OnnxDiTError(f"{self.path} cannot be loaded by ONNX Runtime ({e}); "
                               "re-export it (python -m avatar_agent.nn.moda_onnx)") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != ONNX_FORMAT:
            raise OnnxDiTError(f"{self.path} is not an {ONNX_FORMAT} export")
        if weights_sha256 is not None and meta.get("weights_sha256") != weights_sha256:
            raise OnnxDiTError(f"{self.path} was exported from other weights than the ones "
                               "beside it; re-export it (python -m avatar_agent.nn.moda_onnx)")
        names = [i.name for i in self.session.get_inputs()]
        if tuple(names) != INPUTS:
            raise OnnxDiTError(f"{self.path} has inputs {names}, expected {list(INPUTS)}")

    def __call__(self, motion: torch.Tensor, t: torch.Tensor, audio: torch.Tensor,
                 emotion: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """Velocity [B, N, motion_dim], as :meth:`MoDADiT.forward`."""
        feed: dict[str, Any] = {
            name: np.ascontiguousarray(x.detach().cpu().numpy())
            for name, x in zip(INPUTS, (motion, t.float(), audio, emotion.long(), identity),
                               strict=True)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def main(argv: list[str] | None = None) -> int:
    """``python -m avatar_agent.nn.moda_onnx EXPORT.safetensors``: write EXPORT.onnx beside it and
    check it against the torch model on random inputs."""
    import argparse

    from avatar_agent.models import sha256_file
    from avatar_agent.motion.moda_load import export_paths, inference_settings, load_trained

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("export", type=Path, help="the model export (.safetensors beside .json)")
    args = ap.parse_args(argv)
    w_path, _ = export_paths(args.export)
    model, meta = load_trained(w_path)
    window = int(inference_settings(meta, {})["window"])
    digest = sha256_file(w_path)
    out = export_onnx(model, w_path.with_suffix(".onnx"), digest, window)
    err = max_difference(model, OnnxDiT(out, model.params, digest), window)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); max |onnx − torch| = {err:.2e}")
    return 0 if err < 1e-3 else 1


def max_difference(model: MoDADiT, runner: OnnxDiT, window: int, batch: int = 3,
                   seed: int = 0) -> float:
    """Largest absolute difference between the torch model and the ONNX runner on random
    inputs (``batch`` rows, every emotion label including the null one)."""
    p = model.params
    g = torch.Generator().manual_seed(seed)
    args = (torch.randn(batch, window, 2 * p.motion_dim, generator=g),
            torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, window, p.audio_unit_len, p.audio_blocks, p.audio_dim, generator=g),
            torch.randint(0, p.n_emotions + 1, (batch,), generator=g),
            torch.randn(batch, p.id_dim, generator=g))
    with torch.no_grad():
        ref = model(*args)
    return float((runner(*args) - ref).abs().max())


if __name__ == "__main__":
    raise SystemExit(main())
