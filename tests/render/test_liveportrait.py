"""The official-profile renderer end to end, on recipe weights written in the release's file layout.

One module-scoped full-size render (≈15 s on one CPU thread) covers: the strict loader reading
.pth files from disk, F/M preparation, and the chain fixture (driving keypoints, stitching, W, G,
truncating uint8 conversion).  The batching / output paths run on the "tiny" presets.
"""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from avatar_agent.nn.liveportrait.weights import MODULE_FILES, WeightsError, build_modules
from avatar_agent.render.liveportrait import (
    LivePortraitRenderer, RenderInputError, feather_mask, letterbox, paste_back)
from avatar_agent.types import Renderer
from tests.nn.liveportrait.helpers import fixture, maxdiff, recipe

torch.set_num_threads(1)

SUBDIR = {"stitching_retargeting_module": "retargeting_models"}


def write_official_layout(root: Path) -> Path:
    """Recipe weights saved exactly as the release ships them (plain state dicts; S as 3 sub-dicts)."""
    for name, fname in MODULE_FILES.items():
        sd = recipe(name)
        path = root / SUBDIR.get(name, "base_models") / fname
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "stitching_retargeting_module":
            sd = {s: {k[len(s) + 1:]: v for k, v in sd.items() if k.startswith(s + ".")}
                  for s in ("retarget_shoulder", "retarget_mouth", "retarget_eye")}
        torch.save(sd, path)
    return root


def chain_motion() -> np.ndarray:
    """The chain fixture's driving parameters as one raw 70-d frame (plain drive)."""
    m, c = fixture("M_motion"), fixture("chain")
    motion = np.zeros(70, np.float32)
    motion[:63] = c["exp_d"][0].reshape(-1)
    motion[63] = m["scale"][0, 0]
    motion[64:67] = c["t_d"][0]
    motion[67:70] = [m["pitch_deg"][0, 0] + 10, m["yaw_deg"][0, 0] - 15, m["roll_deg"][0, 0] + 5]
    return motion


@pytest.fixture(scope="module")
def renderer(tmp_path_factory: pytest.TempPathFactory) -> LivePortraitRenderer:
    root = write_official_layout(tmp_path_factory.mktemp("lp_weights"))
    return LivePortraitRenderer(root, device="cpu", drive="plain", stitching=True)


@pytest.fixture(scope="module")
def avatar(renderer: LivePortraitRenderer):
    return renderer.prepare_crop(fixture("source")["source_rgb_u8"])


@pytest.fixture(scope="module")
def chain_run(renderer: LivePortraitRenderer, avatar) -> dict:
    """The chain fixture's frame through the renderer (the one full-size W+G run, ≈15 s)."""
    return renderer.render_detailed(avatar, chain_motion()[None])


def test_renderer_protocol(renderer: LivePortraitRenderer) -> None:
    assert isinstance(renderer, Renderer)
    assert renderer.profile == "official" and renderer.size == 512


def test_prepare_matches_release_source_motion(avatar) -> None:
    m = fixture("M_motion")
    assert maxdiff(avatar.extra["x_s"], m["x_s"][:1]) <= 2e-5
    assert maxdiff(avatar.kp_canonical, m["kp"][0]) <= 2e-5
    assert maxdiff(avatar.extra["f_s"][0, :, 7, 16:48, 16:48], fixture("F_appearance")["f_s_slice"]) <= 1e-5
    r = avatar.rest_motion
    assert r.shape == (70,) and r.dtype == np.float32
    assert maxdiff(r[:63], m["exp"][0].reshape(-1)) <= 2e-5
    assert abs(r[63] - m["scale"][0, 0]) <= 2e-5
    assert maxdiff(r[64:66], m["t"][0, :2]) <= 2e-5 and r[66] == 0.0
    assert maxdiff(r[67:70], np.array([m[f"{k}_deg"][0, 0] for k in ("pitch", "yaw", "roll")])) <= 2e-4
    assert avatar.crop.shape == (512, 512, 3) and np.array_equal(avatar.crop_to_image, np.eye(3))


@pytest.mark.slow
def test_chain_keypoints(chain_run: dict) -> None:
    c = fixture("chain")
    assert maxdiff(chain_run["x_d"][:1], c["x_d_stitched"]) <= 2e-5


@pytest.mark.slow
def test_chain_warp_decode(chain_run: dict) -> None:
    c = fixture("chain")
    assert maxdiff(chain_run["occlusion_map"][:1], c["occlusion_map"]) <= 1e-5
    assert maxdiff(chain_run["deformation"][0, 8], c["deformation_slice"]) <= 1e-5
    assert maxdiff(chain_run["image"][0, :, 200:264, 200:264], c["out_slice"]) <= 5e-4
    assert maxdiff(chain_run["image"][:1], c["out_f16"].astype(np.float32)) <= 5e-4 + 5e-4


@pytest.mark.slow
def test_chain_uint8_image(chain_run: dict) -> None:
    ref = fixture("chain")["out_u8"].astype(np.int16)
    assert chain_run["frames"].shape == (1, 512, 512, 3) and chain_run["frames"].dtype == np.uint8
    diff = np.abs(chain_run["frames"][0].astype(np.int16) - ref)
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01


def test_render_validates_input(renderer: LivePortraitRenderer, avatar) -> None:
    with pytest.raises(RenderInputError, match="70"):
        renderer.render(avatar, np.zeros((2, 69), np.float32))
    bad = np.zeros((1, 70), np.float32)
    bad[0, 5] = np.nan
    with pytest.raises(RenderInputError, match="NaN"):
        renderer.render(avatar, bad)
    assert renderer.render(avatar, np.zeros((0, 70), np.float32)).shape == (0, 512, 512, 3)


def test_missing_weights_name_files_and_fetch_command(tmp_path: Path) -> None:
    (tmp_path / "base_models").mkdir()
    with pytest.raises(WeightsError) as e:
        LivePortraitRenderer(tmp_path, device="cpu")
    msg = str(e.value)
    assert "warping_module.pth" in msg and "stitching_retargeting_module.pth" in msg
    assert "avatar-agent models fetch official" in msg
    with pytest.raises(WeightsError, match="fetch official"):
        LivePortraitRenderer(tmp_path / "nope", device="cpu")


def test_feather_mask_geometry() -> None:
    m = feather_mask(512)
    assert m.shape == (512, 512) and m.dtype == np.uint8
    assert (m[16:496, 16:496] == 255).all()
    assert m[0, 256] < 16 and m[256, 0] < 16 and m[511, 256] < 16
    assert (np.diff(m[256, :17].astype(int)) >= 0).all() and m[256, 15] < 255
    assert np.array_equal(m, m[::-1]) and np.array_equal(m, m.T)


def test_paste_back_blends_inside_and_keeps_outside() -> None:
    img = np.full((400, 300, 3), 40, np.uint8)
    frame = np.full((512, 512, 3), 200, np.uint8)
    # crop pixel (u, v) → image (50 + u/4, 80 + v/4): the crop covers image [50,178)×[80,208)
    c2o = np.array([[0.25, 0, 50], [0, 0.25, 80], [0, 0, 1]], dtype=np.float64)
    out = paste_back(frame, img, c2o)
    assert out.shape == img.shape
    assert (out[150, 110] == 200).all()                             # well inside the crop
    assert (out[10, 10] == 40).all() and (out[300, 250] == 40).all()  # outside
    assert 40 < out[80, 110, 0] < 200                               # on the feathered edge


def test_letterbox() -> None:
    img = np.full((100, 50, 3), 255, np.uint8)
    out = letterbox(img, 64)
    assert out.shape == (64, 64, 3)
    assert (out[32, 32] == 255).all() and (out[32, 2] == 0).all()


# ---------------------------------------------------------------------------------------------
# Full render() path on the "tiny" presets (random weights, 128² crops, milliseconds)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> LivePortraitRenderer:
    torch.manual_seed(0)
    return LivePortraitRenderer(build_modules("tiny"), device="cpu", max_batch=3)


def _motions(avatar, n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    m = np.repeat(avatar.rest_motion[None], n, 0)
    m[:, :63] += 0.02 * rng.standard_normal((n, 63)).astype(np.float32)
    m[:, 67:70] += rng.uniform(-15, 15, (n, 3)).astype(np.float32)
    return m


def test_tiny_render_batch_equals_frame_by_frame(tiny: LivePortraitRenderer) -> None:
    av = tiny.prepare_crop(fixture("source")["source_rgb_u8"])
    m = _motions(av, 7)
    frames = tiny.render(av, m)                                      # chunks of 3, 3, 1
    assert frames.shape == (7, 512, 512, 3) and frames.dtype == np.uint8
    one = np.stack([tiny.render(av, m[i:i + 1])[0] for i in (0, 4, 6)])
    assert np.abs(frames[[0, 4, 6]].astype(int) - one).max() <= 1
    assert np.abs(frames[0].astype(int) - frames[1]).mean() > 0.1   # different motion, different frame


def test_tiny_moda_drive_uses_source_scale(tiny: LivePortraitRenderer) -> None:
    av = tiny.prepare_crop(fixture("source")["source_rgb_u8"])
    m = np.repeat(av.rest_motion[None], 2, 0)
    m[1, 63] *= 3.0                                                  # generated scale: unused by MoDA
    m[1, 66] = 7.0                                                   # tz: never used
    x = tiny.driving_keypoints(av, m)
    # equal up to float rounding (rows of one batch may take different SIMD paths)
    assert torch.allclose(x[0], x[1], atol=1e-6, rtol=0)


def test_tiny_prepare_with_injected_crop_and_paste_back_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    img = np.zeros((600, 400, 3), np.uint8)
    img[:, :, 1] = 90
    crop_src = fixture("source")["source_rgb_u8"]
    c2o = np.array([[0.5, 0, 72], [0, 0.5, 100], [0, 0, 1]], dtype=np.float64)  # 512² crop → 256 px box

    def crop_fn(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert image.shape == img.shape
        return cv2.resize(crop_src, (512, 512)), c2o

    r = LivePortraitRenderer(build_modules("tiny"), device="cpu", crop=crop_fn, output="image", size=256)
    av = r.prepare(img)
    assert av.image.shape == (600, 400, 3) and np.array_equal(av.crop_to_image, c2o)
    out = r.render(av, av.rest_motion[None])
    assert out.shape == (1, 256, 256, 3)
    # Letterboxed 600×400 → 256²: the portrait spans x ∈ [~43, ~213); outside is black padding.
    assert (out[0, :, :30] == 0).all()
    assert abs(int(out[0, 10, 128, 1]) - 90) <= 1 and out[0, 10, 128, 0] == 0  # untouched top
    face = out[0, 60:150, 80:160].astype(int)
    assert np.abs(face - np.array([0, 90, 0])).mean() > 5            # the rendered face was pasted


def test_prepare_rejects_bad_images(tiny: LivePortraitRenderer) -> None:
    with pytest.raises(RenderInputError, match="uint8 RGB"):
        tiny.prepare(np.zeros((100, 100), np.uint8))
    with pytest.raises(RenderInputError, match="square"):
        tiny.prepare_crop(np.zeros((100, 80, 3), np.uint8))
    from avatar_agent.types import Avatar
    other = Avatar("embedded", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8),
                   np.eye(3), np.zeros((21, 3), np.float32), np.zeros(70, np.float32))
    with pytest.raises(RenderInputError, match="prepared"):
        tiny.render(other, np.zeros((1, 70), np.float32))


def test_prepare_real_portrait_with_default_crop(tiny: LivePortraitRenderer) -> None:
    """The default crop (FaceMesh + LivePortrait geometry) on the shipped portrait."""
    from avatar_agent.face.landmarks import load_image

    img = load_image(Path(__file__).resolve().parents[2] / "avatars" / "default.png")
    av = tiny.prepare(img)
    assert av.crop.shape == (512, 512, 3)
    # crop centre maps inside the portrait, and the crop is not the whole image unchanged
    cx, cy, _ = av.crop_to_image @ np.array([256.0, 256.0, 1.0])
    assert 0 < cx < img.shape[1] and 0 < cy < img.shape[0]
    assert av.crop.std() > 10


def test_channels_last_option_renders_the_same_frames(tiny: LivePortraitRenderer) -> None:
    torch.manual_seed(0)
    cl = LivePortraitRenderer(build_modules("tiny"), device="cpu", max_batch=3, channels_last=True)
    for a, b in zip(cl.nets.all(), tiny.nets.all(), strict=False):
        a.load_state_dict(b.state_dict())
    av = tiny.prepare_crop(fixture("source")["source_rgb_u8"])
    m = _motions(av, 3)
    ref = tiny.render(av, m)
    got = cl.render(cl.prepare_crop(fixture("source")["source_rgb_u8"]), m)
    assert np.abs(got.astype(int) - ref).max() <= 1
    conv4 = [p for p in cl.nets.spade.parameters() if p.dim() == 4]
    assert conv4 and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv4)
