"""The renderer's GPU fast path, proven on a CPU with the "tiny" presets: precision settings,
the device-side frame path (uint8 conversion, paste-back, letterbox on the renderer's device),
several avatars' frames in one W + G call, and the fixed-shape batch buckets of ``compile``.
tests/test_cuda_conformance.py runs the same paths on CUDA."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from avatar_agent.nn.liveportrait.weights import build_modules
from avatar_agent.render.liveportrait import LivePortraitRenderer, resolve_precision
from tests.nn.liveportrait.helpers import fixture

torch.set_num_threads(1)


def tiny(**kw) -> LivePortraitRenderer:  # noqa: ANN003
    torch.manual_seed(0)                  # the same random weights for every renderer here
    return LivePortraitRenderer(build_modules("tiny"), device="cpu", **kw)


def motions(avatar, n: int, seed: int = 0) -> np.ndarray:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    m = np.repeat(avatar.rest_motion[None], n, 0)
    m[:, :63] += 0.02 * rng.standard_normal((n, 63)).astype(np.float32)
    m[:, 67:70] += rng.uniform(-15, 15, (n, 3)).astype(np.float32)
    return m


class WarpCalls:
    """Counts forward calls of the warping network and the batch size of each."""

    def __init__(self, r: LivePortraitRenderer) -> None:
        self.sizes: list[int] = []
        self.handle = r.nets.warping.register_forward_hook(
            lambda _m, args, _out: self.sizes.append(int(args[0].shape[0])))


def test_precision_names_and_cpu_rules() -> None:
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision 'fp16' needs CUDA; on a CPU use 'bf16' or 'fp32'"):
        tiny(precision="fp16")
    with pytest.raises(ValueError, match="precision 'half': use one of fp32, fp16, bf16"):
        tiny(precision="half")
    with pytest.raises(ValueError, match="compile='cudagraphs' needs CUDA"):
        tiny(compile="cudagraphs")
    with pytest.raises(ValueError, match="compile must be one of off, compile, cudagraphs"):
        tiny(compile="fast")  # type: ignore[arg-type]


def test_bf16_renders_close_to_fp32() -> None:
    ref, low = tiny(max_batch=4), tiny(max_batch=4, precision="bf16")
    src = fixture("source")["source_rgb_u8"]
    av_ref, av_low = ref.prepare_crop(src), low.prepare_crop(src)
    m = motions(av_ref, 2)
    a, b = ref.render(av_ref, m).astype(int), low.render(av_low, m).astype(int)
    diff = np.abs(a - b)
    print(f"bf16 vs fp32 (tiny, CPU): mean |diff| {diff.mean():.2f}, max {diff.max()} levels")
    assert 0 < diff.mean() < 3.0 and np.percentile(diff, 99) <= 16


def test_device_path_crop_output_equals_the_numpy_path() -> None:
    cpu, dev = tiny(max_batch=4), tiny(max_batch=4, device_paste=True)
    av = cpu.prepare_crop(fixture("source")["source_rgb_u8"])
    # At the generator's native 512²: the release's truncating uint8 conversion, bit for bit.
    img = torch.rand(2, 3, 512, 512) * 1.2 - 0.1
    assert np.array_equal(dev._frames(av, img), cpu._frames(av, img))
    # The tiny generator makes 128² crops, upscaled to 512²: OpenCV's fixed-point bilinear vs
    # float bilinear on the device differ by rounding only.
    m = motions(av, 3)
    diff = np.abs(dev.render(av, m).astype(int) - cpu.render(av, m))
    assert diff.max() <= 1 and diff.mean() < 0.2


def test_device_path_resized_crop_is_close() -> None:
    cpu, dev = tiny(max_batch=4, size=256), tiny(max_batch=4, size=256, device_paste=True)
    av = cpu.prepare_crop(fixture("source")["source_rgb_u8"])
    m = motions(av, 2)
    a, b = cpu.render(av, m).astype(int), dev.render(av, m).astype(int)
    assert a.shape == b.shape == (2, 256, 256, 3)
    diff = np.abs(a - b)
    assert diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 12, (diff.mean(), diff.max())


def test_device_paste_back_matches_the_opencv_path() -> None:
    """output="image": GpuPaste + letterbox on the device vs the release's OpenCV paste-back."""
    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.integers(0, 255, (600, 400, 3), dtype=np.uint8), (0, 0), 3)
    crop = cv2.resize(fixture("source")["source_rgb_u8"], (512, 512))
    c2o = np.array([[0.45, 0.05, 70], [-0.05, 0.45, 120], [0, 0, 1]], dtype=np.float64)

    def crop_fn(_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return crop, c2o

    kw = dict(crop=crop_fn, output="image", size=320, max_batch=4)
    cpu, dev = tiny(**kw), tiny(**kw, device_paste=True)
    av = cpu.prepare(img)
    m = motions(av, 2)
    a, b = cpu.render(av, m).astype(int), dev.render(av, m).astype(int)
    assert a.shape == b.shape == (2, 320, 320, 3)
    diff = np.abs(a - b)
    print(f"device vs OpenCV paste-back + letterbox: mean |diff| {diff.mean():.3f}, max {diff.max()}")
    assert diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 12
    # the face was pasted (frames differ from the bare letterboxed portrait)
    bare = cv2.resize(np.pad(img, ((0, 0), (100, 100), (0, 0))), (320, 320), interpolation=cv2.INTER_AREA)
    changed = (np.abs(b[0] - bare).max(axis=2) > 10).mean()
    assert 0.05 < changed < 0.5, changed
    # the device path builds its paste-back tables in prepare (beside the frame thread)
    assert "gpu_paste:cpu:512" in dev.prepare(img).extra and "gpu_paste:cpu:512" not in av.extra


def test_render_many_is_one_warp_call_for_several_avatars() -> None:
    r = tiny(max_batch=8)
    src = fixture("source")["source_rgb_u8"]
    a1 = r.prepare_crop(src)
    a2 = r.prepare_crop(np.ascontiguousarray(255 - src[:, ::-1]))   # another face
    m1, m2 = motions(a1, 3, seed=1), motions(a2, 2, seed=2)
    alone = [r.render(a1, m1), r.render(a2, m2)]
    calls = WarpCalls(r)
    both = r.render_many([(a1, m1), (a2, m2), (a1, m1[:0])])
    assert calls.sizes == [5]                                        # 3 + 2 frames, one W + G call
    assert [f.shape[0] for f in both] == [3, 2, 0]
    for got, ref in zip(both[:2], alone, strict=True):
        assert np.abs(got.astype(int) - ref).max() <= 1
    wrong = r.render(a1, m2)                                         # job 2's motion on face 1
    assert np.abs(wrong.astype(int) - both[1]).max() > 1             # each job kept its own face
    calls.sizes.clear()
    r.max_batch = 4
    split = r.render_many([(a1, m1), (a2, m2)])                      # 5 frames: calls of 4 and 1
    assert calls.sizes == [4, 1]
    for got, ref in zip(split, alone, strict=True):
        assert np.abs(got.astype(int) - ref).max() <= 1


def test_compiled_batches_are_padded_to_buckets() -> None:
    """With compile on (CUDA), W + G sees only bucket batch sizes; the padding frames are dropped.
    The bucket logic is device-independent, so it runs here with the eager W + G."""
    r = tiny(max_batch=6)
    av = r.prepare_crop(fixture("source")["source_rgb_u8"])
    m = motions(av, 6)
    ref = r.render(av, m)
    r.compile = "compile"                                            # buckets on, W + G eager
    assert [r._bucket(b) for b in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 4, 6, 6]
    assert r.buckets() == [1, 2, 4, 6]
    calls = WarpCalls(r)
    got = r.render(av, m[:3])
    assert calls.sizes == [1, 2, 4, 6, 4] and got.shape[0] == 3      # every bucket built first
    assert np.abs(got.astype(int) - ref[:3]).max() <= 1
    calls.sizes.clear()
    got = r.render(av, m[:5])
    assert calls.sizes == [6] and np.abs(got.astype(int) - ref[:5]).max() <= 1


def test_warp_decode_traces_as_one_graph_under_autocast() -> None:
    """What compile/cudagraphs need: W + G with its autocast is one graph (fullgraph=True fails on
    any break).  Traced here with the eager backends (no compiler on CI); CUDA runs the real ones
    (tests/test_cuda_conformance.py)."""
    from avatar_agent.render.liveportrait import WarpDecode

    r = tiny(max_batch=4)
    av = r.prepare_crop(fixture("source")["source_rgb_u8"])
    x_d = r.driving_keypoints(av, motions(av, 2))
    f_s, x_s = av.extra["f_s"].expand(2, -1, -1, -1, -1), av.extra["x_s"].expand(2, -1, -1)
    wd = WarpDecode(r.nets.warping, r.nets.spade, "bf16", channels_last=False)
    with torch.no_grad():
        ref = wd(f_s, x_s, x_d)
        got = torch.compile(wd, backend="aot_eager", dynamic=False, fullgraph=True)(f_s, x_s, x_d)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=2e-2, rtol=0)
    assert not torch.equal(ref[0], WarpDecode(r.nets.warping, r.nets.spade, "fp32", False)(f_s, x_s, x_d)[0])
