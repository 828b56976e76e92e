"""ONNX export (opset 20, 5-D GridSample) of F, M and W+G, run in onnxruntime CPU.

F and M are exported at release size with recipe weights and compared with the release's
fixtures.  W+G is exported from the "tiny" presets (same code, small widths; recipe weights) and
compared with PyTorch: a release-size W+G export takes minutes on this CI's CPU share (its
parity was measured once with bench/bench_liveportrait.py --onnx, see the report).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from avatar_agent.nn.liveportrait import export as E  # noqa: E402
from avatar_agent.nn.liveportrait import keypoints as K  # noqa: E402
from avatar_agent.nn.liveportrait.motion_extractor import OUTPUT_NAMES  # noqa: E402
from tests.nn.liveportrait.helpers import (  # noqa: E402
    fixture, maxdiff, recipe_modules, tiny_recipe_modules)

torch.set_num_threads(1)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lp_onnx")
    m = recipe_modules()
    E.export_appearance(m.appearance, d / "appearance.onnx")
    E.export_motion(m.motion, d / "motion.onnx")
    t = tiny_recipe_modules()
    E.export_warp_decode(t.warping, t.spade, d / "warp_decode.onnx", feature_shape=(4, 4, 16, 16))
    return d


def test_appearance_onnx_matches_release(onnx_dir: Path) -> None:
    x = fixture("source")["x"]
    (f_s,) = E.onnx_session(onnx_dir / "appearance.onnx").run(None, {"image": x})
    assert f_s.shape == (1, 32, 16, 64, 64)
    assert maxdiff(f_s[0, :, 7, 16:48, 16:48], fixture("F_appearance")["f_s_slice"]) <= 1e-5


def test_motion_onnx_matches_release(onnx_dir: Path) -> None:
    x = fixture("source")["x"]
    xm = np.concatenate([x, x[..., ::-1]]).astype(np.float32)       # batch 2: dynamic batch axis
    sess = E.onnx_session(onnx_dir / "motion.onnx")
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    outs = dict(zip(OUTPUT_NAMES, sess.run(None, {"image": xm}), strict=False))
    ref = fixture("M_motion")
    for k in OUTPUT_NAMES:
        assert maxdiff(outs[k], ref[f"raw_{k}"]) <= 2e-5, k
    info = K.refine_motion_output({k: torch.from_numpy(v) for k, v in outs.items()})
    assert maxdiff(K.source_keypoints(info), ref["x_s"]) <= 2e-5


def test_warp_decode_onnx_matches_torch(onnx_dir: Path) -> None:
    import onnx

    graph = onnx.load(str(onnx_dir / "warp_decode.onnx"), load_external_data=False).graph
    grids = [n for n in graph.node if n.op_type == "GridSample"]
    assert len(grids) == 2                                           # dense-motion + final warp
    g = torch.Generator().manual_seed(0)
    t = tiny_recipe_modules()
    f = torch.randn(3, 4, 4, 16, 16, generator=g)                   # batch 3: dynamic batch axis
    kp_s = 0.5 * torch.randn(3, 21, 3, generator=g)
    kp_d = kp_s + 0.05 * torch.randn(3, 21, 3, generator=g)
    with torch.no_grad():
        ref = E.WarpDecode(t.warping, t.spade)(f, kp_d, kp_s)
    (img,) = E.onnx_session(onnx_dir / "warp_decode.onnx").run(
        None, {"feature_3d": f.numpy(), "kp_driving": kp_d.numpy(), "kp_source": kp_s.numpy()})
    assert img.shape == (3, 3, 128, 128)
    # float32 through two GridSamples and the decoder: ORT and torch differ by ~1e-5 (1.07e-5
    # measured with onnxruntime 1.32); a wrong op or layout differs by orders of magnitude more
    assert maxdiff(img, ref.numpy()) <= 3e-5
    assert np.abs(img[0] - img[1]).max() > 1e-3                     # inputs differ → outputs differ
    sess = E.onnx_session(onnx_dir / "warp_decode.onnx")
    assert [i.name for i in sess.get_inputs()] == ["feature_3d", "kp_driving", "kp_source"]


def test_warp_decode_needs_opset_20(tmp_path: Path) -> None:
    m = tiny_recipe_modules()
    with pytest.raises(ValueError, match="opset"):
        E.export_warp_decode(m.warping, m.spade, tmp_path / "x.onnx", opset=17)
