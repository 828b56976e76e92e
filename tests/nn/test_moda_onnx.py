"""The tiny MoDA's DiT on ONNX Runtime: the shipped export is the shipped weights', it computes
what torch computes, a stale export is refused, and the runtime setting picks the runner."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_agent.motion.moda_load import ModelFileError, build_motion, load_trained, onnx_problem
from avatar_agent.motion.template import template_avatar
from avatar_agent.nn.layers import RMSNorm
from avatar_agent.nn.moda import MoDADiT, MoDAParams, TracedDiT
from avatar_agent.models import sha256_file
from avatar_agent.nn.moda_onnx import OnnxDiT, OnnxDiTError, export_onnx, max_difference
from avatar_agent.types import SpeechChunk
from avatar_agent.wiring import EMBEDDED_MODA


def test_the_shipped_export_is_made_from_the_shipped_weights_and_equals_torch() -> None:
    model, meta = load_trained(EMBEDDED_MODA)
    runner = OnnxDiT(EMBEDDED_MODA.with_suffix(".onnx"), model.params, sha256_file(EMBEDDED_MODA))
    window = int(meta["params"]["seq_len"])
    # batch 3 (not the exported 2: the batch axis is dynamic), random inputs, every emotion label
    assert max_difference(model, runner, window, batch=3) < 1e-4
    assert max_difference(model, runner, window, batch=1, seed=1) < 1e-4


def test_the_default_runtime_is_onnx_and_generates_the_motion_torch_does() -> None:
    av = template_avatar()
    audio = np.random.default_rng(3).normal(0, 0.08, 16000).astype(np.float32)
    chunk = SpeechChunk(audio, 0, audio.size, 0, 0, True)
    outs = {}
    for runtime in ("auto", "torch"):
        gen = build_motion(EMBEDDED_MODA, runtime=runtime, seed=5)
        gen.prepare(av)
        outs[runtime] = (type(gen.model), gen.generate(chunk, av.rest_motion))
    assert outs["auto"][0] is OnnxDiT and outs["torch"][0] is TracedDiT
    a, t = outs["auto"][1], outs["torch"][1]
    assert a.shape == t.shape == (25, 70)
    np.testing.assert_allclose(a, t, atol=2e-3)          # same noise, same network: ~1e-5 apart


def _retrained_copy(tmp_path: Path) -> Path:
    """The shipped export copied, with its weights changed (as a retrain would) but not its
    ONNX graph."""
    from safetensors.torch import load_file, save_file

    for suffix in (".json", ".onnx"):
        shutil.copy(EMBEDDED_MODA.with_suffix(suffix), tmp_path / f"m{suffix}")
    state = load_file(str(EMBEDDED_MODA))
    key = next(iter(state))
    state[key] = state[key] + 0.01
    save_file(state, str(tmp_path / "m.safetensors"))
    return tmp_path / "m.safetensors"


def test_a_stale_export_is_refused_or_skipped_with_the_reason(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    path = _retrained_copy(tmp_path)
    with pytest.raises(ModelFileError, match=r"motion.runtime = \"onnx\".*other weights.*"
                                             r"re-export"):
        build_motion(path, runtime="onnx")
    with caplog.at_level(logging.INFO, logger="avatar_agent.motion.moda_load"):
        gen = build_motion(path)                                       # auto: torch, saying why
    assert isinstance(gen.model, TracedDiT)
    assert "other weights" in caplog.text
    assert "other weights" in str(onnx_problem(path))              # what `check` reports
    assert onnx_problem(EMBEDDED_MODA) is None
    (tmp_path / "m.onnx").unlink()
    with pytest.raises(ModelFileError, match="no m.onnx beside the weights"):
        build_motion(path, runtime="onnx")
    assert isinstance(build_motion(path).model, TracedDiT)
    (tmp_path / "m.onnx").write_bytes(b"not a graph")
    with pytest.raises(OnnxDiTError, match="m.onnx cannot be loaded"):
        OnnxDiT(tmp_path / "m.onnx", MoDAParams())


def test_export_round_trip_of_a_fresh_model(tmp_path: Path) -> None:
    """What bench/train_tiny.sh runs after training: export, reload, same numbers."""
    torch.manual_seed(0)
    p = MoDAParams(hidden=32, heads=2, audio_dim=8, audio_blocks=1, n_four=1, n_two=1,
                   n_single=1, seq_len=8)
    model = MoDADiT(p).eval()
    for q in model.parameters():        # (zero-initialised output layers would hide a mismatch)
        torch.nn.init.normal_(q, std=0.05)
    out = export_onnx(model, tmp_path / "x.onnx", "abc123", window=8)
    runner = OnnxDiT(out, p, "abc123")
    assert max_difference(model, runner, 8, batch=5) < 1e-4
    with pytest.raises(OnnxDiTError, match="other weights"):
        OnnxDiT(out, p, "def456")


def test_the_shipped_export_runs_with_fused_norms_and_gelus(tmp_path: Path) -> None:
    """The graph ONNX Runtime runs has one kernel per RMSNorm and per GELU: an export that spells
    them out (the rsqrt form, opset < 20) costs ≈ 15 % more per forward (moda_onnx.OPSET)."""
    import onnx
    import onnxruntime as ort

    model, meta = load_trained(EMBEDDED_MODA)
    calls = [0]                                     # RMSNorm evaluations in one forward
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    max_difference(model, OnnxDiT(EMBEDDED_MODA.with_suffix(".onnx"), model.params),
                   int(meta["params"]["seq_len"]), batch=1)
    n_norms = calls[0]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(EMBEDDED_MODA.with_suffix(".onnx")), so,
                         providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == n_norms > 0
    assert "Reciprocal" not in ops and "Tanh" not in ops and "Pow" not in ops
