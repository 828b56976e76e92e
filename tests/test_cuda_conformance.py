"""The conformance fixtures on CUDA: float32 within the fixture READMEs' tolerances, float16 and
bfloat16 autocast within the tolerances stated here.

Runs where CUDA exists and ``AVATAR_AGENT_TEST_DEVICE`` is ``cuda`` (its default); skips
elsewhere, so CI (no GPU) skips it.  ``bench/gpu_check.sh`` runs it on a GPU host.  float32 runs
with TF32 off (tests/fixtures/moda/README.md: cuDNN's TF32 default would round the HuBERT
convolutions to a 10-bit mantissa).

Half-precision tolerances, relative to the largest magnitude of the float32 reference:
float16 1e-2, bfloat16 4e-2 (bfloat16 keeps 8 mantissa bits: 2⁻⁸ ≈ 4e-3 per rounding, and the
deepest network here chains ~40 of them).  They are stated, not yet measured: the first GPU run
prints the measured errors (``-s``) to tighten them.

The renderer's GPU fast path on CUDA: the chain fixture through the whole renderer in fp32
(within tests/render/test_liveportrait.py's CPU tolerances) and fp16/bf16 (image slice within the
half-precision tolerances above; uint8 frames within a mean of 2 (fp16) / 4 (bf16) levels); the
device frame path (uint8 conversion on the device, bit-equal to the CPU's at 512²), GpuPaste
equal to its CPU run within 1 level, several avatars in one W + G call, and CUDA-graph W + G
equal to eager within 1 level.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

DEVICE = os.environ.get("AVATAR_AGENT_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.skipif(not (DEVICE.startswith("cuda") and torch.cuda.is_available()),
                       reason="CUDA conformance: needs a CUDA device (bench/gpu_check.sh runs it)"),
    pytest.mark.timeout(600),
]
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
MODA_FIX = Path(__file__).resolve().parent / "fixtures" / "moda"


@pytest.fixture(scope="module", autouse=True)
def no_tf32() -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def close(y: torch.Tensor, ref: np.ndarray, atol: float, rtol: float = 0.0) -> None:
    a = y.detach().float().cpu().numpy().astype(np.float64)
    r = np.asarray(ref, np.float64)
    assert a.shape == r.shape, (a.shape, r.shape)
    excess = np.abs(a - r) - (atol + rtol * np.abs(r))
    assert excess.max() <= 0, f"max |diff| {np.abs(a - r).max():.3g} > atol {atol:g}"


def half_close(y: torch.Tensor, ref: np.ndarray | torch.Tensor, dtype: torch.dtype, what: str) -> None:
    a = y.detach().float().cpu().numpy().astype(np.float64)
    r = ref.detach().float().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    rel = float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-12))
    print(f"{what} {str(dtype).removeprefix('torch.')}: max |diff| / max |ref| = {rel:.2e}")
    assert np.isfinite(a).all() and rel <= HALF_TOL[dtype], f"{what}: {rel:.3g} > {HALF_TOL[dtype]}"


def autocast(dtype: torch.dtype) -> torch.autocast:
    return torch.autocast("cuda", dtype=dtype)


# --------------------------------------------------------------------------------------------
# LivePortrait networks (tests/fixtures/liveportrait)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lp():  # noqa: ANN201 (the lazy recipe modules of tests/nn/liveportrait/helpers.py)
    from tests.nn.liveportrait.helpers import recipe_modules

    return recipe_modules()


def _lp_inputs() -> dict[str, torch.Tensor]:
    from tests.nn.liveportrait.helpers import fixture

    w = fixture("W_warping")
    return {"x": torch.from_numpy(fixture("source")["x"]),
            "f_s": torch.from_numpy(fixture("F_appearance")["f_s_f16"].astype(np.float32)),
            "kp_s": torch.from_numpy(w["kp_source"]), "kp_d": torch.from_numpy(w["kp_driving"]),
            "w_out": torch.from_numpy(w["out_f16"].astype(np.float32))}


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_liveportrait_networks(lp, dtype: torch.dtype | None) -> None:  # noqa: ANN001
    from tests.nn.liveportrait.helpers import fixture

    dev = torch.device(DEVICE)
    inp = {k: v.to(dev) for k, v in _lp_inputs().items()}
    with torch.no_grad(), (autocast(dtype) if dtype else torch.autocast("cuda", enabled=False)):
        f_s = lp.appearance.to(dev)(inp["x"])
        raw = lp.motion.to(dev)(torch.cat([inp["x"], inp["x"].flip(-1)]))
        w = lp.warping.to(dev)(inp["f_s"], kp_driving=inp["kp_d"], kp_source=inp["kp_s"])
        img = lp.spade.to(dev)(inp["w_out"])
    ref_f, ref_m = fixture("F_appearance"), fixture("M_motion")
    ref_w, ref_g = fixture("W_warping"), fixture("G_spade")
    if dtype is None:                                   # README acceptance (≈10× CPU variation)
        close(f_s[0, :, 7, 16:48, 16:48], ref_f["f_s_slice"], 1e-5)
        for k in ("exp", "kp", "t", "scale"):
            close(raw[k], ref_m[f"raw_{k}"], 2e-5)
        close(w["out"][0, :, 24:40, 24:40], ref_w["out_slice"], 5e-6)
        close(w["deformation"], ref_w["deformation"], 5e-6)
        close(w["occlusion_map"], ref_w["occlusion_map"], 5e-6)
        close(img[0, :, 200:264, 200:264], ref_g["out_slice"], 5e-5)
    else:
        half_close(f_s[0, :, 7, 16:48, 16:48], ref_f["f_s_slice"], dtype, "F")
        half_close(raw["exp"], ref_m["raw_exp"], dtype, "M exp")
        half_close(w["out"][0, :, 24:40, 24:40], ref_w["out_slice"], dtype, "W")
        half_close(img[0, :, 200:264, 200:264], ref_g["out_slice"], dtype, "G")


# --------------------------------------------------------------------------------------------
# MoDA DiT and HuBERT (tests/fixtures/moda)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit():  # noqa: ANN201
    from avatar_agent.nn.moda import RELEASE_PREFIX, build_dit
    from tests.reference.recipe import load_manifest, recipe_state_dict

    model = build_dit("release", device="meta").to_empty(device="cpu")
    sd = recipe_state_dict(load_manifest(MODA_FIX / "dit_state_dict_manifest.json"))
    model.load_state_dict({k[len(RELEASE_PREFIX):]: v for k, v in sd.items()}, strict=True)
    return model.eval().to(DEVICE)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_dit_forward(dit, dtype: torch.dtype | None) -> None:  # noqa: ANN001
    inp, ref = np.load(MODA_FIX / "inputs.npz"), np.load(MODA_FIX / "dit_forward.npz")
    t = lambda k: torch.from_numpy(inp[k]).to(DEVICE)  # noqa: E731
    motion = torch.cat([t("prev_motion").expand(2, 80, 70), t("x_t")], -1)
    audio = torch.cat([t("audio"), t("null_audio_feat").expand(2, 80, 1, 12, 768)])
    emo = torch.cat([t("emo_cond"), t("emo_uncond")])
    ident = t("ref_kp")[:, None].repeat(2, 80, 1)
    for step in (1000, 445):
        with torch.no_grad(), (autocast(dtype) if dtype else torch.autocast("cuda", enabled=False)):
            v = dit(motion.repeat(2, 1, 1), torch.full((4,), float(step), device=DEVICE), audio, emo, ident)
        if dtype is None:
            close(v[:2], ref[f"v_cond_t{step}"], 2e-4, 1e-4)
            close(v[2:], ref[f"v_uncond_t{step}"], 2e-4, 1e-4)
        else:
            half_close(v[:2], ref[f"v_cond_t{step}"], dtype, f"DiT t={step}")


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_hubert_features(dtype: torch.dtype | None) -> None:
    from avatar_agent.nn.hubert import HubertFeatures, build_hubert
    from tests.reference.recipe import load_manifest, recipe_state_dict

    model = build_hubert()
    model.load_state_dict(recipe_state_dict(load_manifest(MODA_FIX / "hubert_state_dict_manifest.json")),
                          strict=True)
    ext = HubertFeatures(model, DEVICE)
    ref = np.load(MODA_FIX / "hubert_audio.npz")
    with (autocast(dtype) if dtype else torch.autocast("cuda", enabled=False)):
        feats = ext(ref["waveform"])
    if dtype is None:
        close(feats, ref["audio_emb"], 2e-4, 1e-4)
    else:
        half_close(feats, ref["audio_emb"], dtype, "HuBERT")


# --------------------------------------------------------------------------------------------
# The renderer's GPU fast path (render/liveportrait.py, render/gpu_paste.py)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.render.test_liveportrait import write_official_layout

    return write_official_layout(tmp_path_factory.mktemp("lp_weights"))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_renderer_chain(lp_dir: Path, precision: str) -> None:
    from avatar_agent.render.liveportrait import LivePortraitRenderer
    from tests.nn.liveportrait.helpers import fixture
    from tests.render.test_liveportrait import chain_motion

    r = LivePortraitRenderer(lp_dir, device=DEVICE, drive="plain", precision=precision)
    assert r.device_paste                                   # CUDA: frames finished on the device
    av = r.prepare_crop(fixture("source")["source_rgb_u8"])
    run = r.render_detailed(av, chain_motion()[None])       # frames through the NumPy path
    c = fixture("chain")
    diff = np.abs(run["frames"][0].astype(int) - c["out_u8"].astype(int))
    print(f"renderer chain {precision}: uint8 mean |diff| {diff.mean():.3f}, max {diff.max()}")
    if precision == "fp32":
        close(run["x_d"][:1], c["x_d_stitched"], 2e-5)
        close(run["occlusion_map"][:1], c["occlusion_map"], 1e-5)
        close(run["image"][0, :, 200:264, 200:264], c["out_slice"], 5e-4)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    else:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        half_close(run["image"][0, :, 200:264, 200:264], c["out_slice"], dtype, f"renderer {precision}")
        assert diff.mean() <= {"fp16": 2.0, "bf16": 4.0}[precision]
    # the device path (render) gives the NumPy path's frames
    frames = r.render(av, chain_motion()[None])
    assert np.abs(frames.astype(int) - run["frames"]).max() <= 1


def test_gpu_paste_equals_its_cpu_run() -> None:
    from avatar_agent.render.gpu_paste import GpuPaste
    from avatar_agent.render.liveportrait import feather_mask
    from tests.render.test_gpu_paste import affine

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (600, 500, 3), dtype=np.uint8)
    crops = torch.rand(4, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    c2o, mask = affine(0.7, 9.0, 60.0, 40.0), feather_mask(512)
    cpu = GpuPaste(image, c2o, mask, "cpu")(crops).numpy().astype(int)
    gpu = GpuPaste(image, c2o, mask, DEVICE)(crops.to(DEVICE)).cpu().numpy().astype(int)
    diff = np.abs(gpu - cpu)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


@pytest.fixture(scope="module")
def tiny_pair():  # noqa: ANN201
    """The same tiny random-weight renderer on the CPU (NumPy/OpenCV path) and on CUDA."""
    from avatar_agent.nn.liveportrait.weights import build_modules
    from avatar_agent.render.liveportrait import LivePortraitRenderer

    torch.manual_seed(0)
    mods = build_modules("tiny")
    cpu = LivePortraitRenderer(mods, device="cpu", max_batch=8, output="image", size=384,
                               crop=_fixed_crop)
    gpu = LivePortraitRenderer(copy_modules(mods), device=DEVICE, max_batch=8, precision="fp32",
                               output="image", size=384, crop=_fixed_crop)
    return cpu, gpu


def copy_modules(mods):  # noqa: ANN001, ANN201
    import copy

    return copy.deepcopy(mods)


def _fixed_crop(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    from tests.nn.liveportrait.helpers import fixture

    c2o = np.array([[0.5, 0.04, 80], [-0.04, 0.5, 120], [0, 0, 1]], dtype=np.float64)
    return cv2.resize(fixture("source")["source_rgb_u8"], (512, 512)), c2o


def _portrait(seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 255, (640, 480, 3), dtype=np.uint8), (0, 0), 3)


def test_device_frames_and_batched_sessions(tiny_pair) -> None:  # noqa: ANN001
    from tests.render.test_liveportrait_gpu_path import WarpCalls, motions

    cpu, gpu = tiny_pair
    avs_c = [cpu.prepare(_portrait(k)) for k in range(3)]
    avs_g = [gpu.prepare(_portrait(k)) for k in range(3)]
    ms = [motions(avs_c[k], k + 1, seed=k) for k in range(3)]
    ref = [cpu.render(a, m).astype(int) for a, m in zip(avs_c, ms, strict=True)]
    calls = WarpCalls(gpu)
    got = gpu.render_many(list(zip(avs_g, ms, strict=True)))
    assert calls.sizes == [6]                               # 1 + 2 + 3 frames of 3 sessions: one call
    for g, r in zip(got, ref, strict=True):
        diff = np.abs(g.astype(int) - r)
        print(f"CUDA device path vs CPU OpenCV path: mean |diff| {diff.mean():.3f}, max {diff.max()}")
        assert diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 12


def test_cudagraphs_warp_decode_equals_eager(tiny_pair) -> None:  # noqa: ANN001
    from avatar_agent.render.liveportrait import LivePortraitRenderer
    from tests.render.test_liveportrait_gpu_path import motions

    _, gpu = tiny_pair
    graphs = LivePortraitRenderer(gpu.nets, device=DEVICE, max_batch=8, precision="fp32",
                                  output="image", size=384, crop=_fixed_crop, compile="cudagraphs")
    av = gpu.prepare(_portrait(0))
    m = motions(av, 5)
    ref = gpu.render(av, m).astype(int)
    assert graphs._bucket(5) == 8                            # 5 frames run padded to 8
    outs = [graphs.render(av, m) for _ in range(3)]          # build, then replays
    outs.append(graphs.render(av, m[:1]))                    # another bucket
    for out in outs[:3]:
        assert np.abs(out.astype(int) - ref).max() <= 1
    assert np.abs(outs[3].astype(int) - ref[:1]).max() <= 1
