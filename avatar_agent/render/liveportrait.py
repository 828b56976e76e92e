"""The official-profile renderer: LivePortrait driven by MoDA's 70-d motion.

Per avatar (:meth:`LivePortraitRenderer.prepare`, once): face crop (512², LivePortrait geometry)
→ 256² network input → appearance features f_s (F) and source motion (M) → source keypoints x_s.

Per batch of motion frames (:meth:`LivePortraitRenderer.render`): MoDA's absolute drive (the
70-d motion of :mod:`avatar_agent.types`) → driving keypoints x_d → stitching → W + G → uint8
512² crops, optionally pasted back into the portrait with LivePortrait's feathered mask.  Frames of several avatars
(sessions) go through one W + G call with :meth:`LivePortraitRenderer.render_many`.

Precision (``precision``): "auto" = fp16 autocast on CUDA as the release does, float32 on CPU
(the path proven equal to the release by tests/fixtures/liveportrait); "bf16"/"fp16" = that
autocast dtype (fp16 needs CUDA).  On CUDA the whole per-frame path stays on the device (uint8
conversion, paste-back with :class:`~avatar_agent.render.gpu_paste.GpuPaste`, resizing): only the
finished uint8 frames cross to the CPU.  ``compile`` puts the fixed-shape W + G under
``torch.compile`` or CUDA graphs (CUDA only; batches are padded to a few bucket sizes so each
shape is built once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avatar_agent.nn.liveportrait import keypoints as K
from avatar_agent.nn.liveportrait.weights import LivePortraitModules, WeightsError, load_modules
from avatar_agent.nn.precision import autocast, autocast_dtype
from avatar_agent.types import DIM, EXP, N_KP, PITCH, ROLL, SCALE, T, YAW, Avatar, Profile

CROP_SIZE = 512
"""Side of the aligned face crop and of the generator's output."""
NET_SIZE = 256
"""Side of the F / M network input."""

CropFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""image uint8 [H, W, 3] → (crop uint8 [512, 512, 3], crop_to_image float64 [3, 3])."""


# --------------------------------------------------------------------------------------------
# The 70-d motion layout ↔ LivePortrait keypoints
# --------------------------------------------------------------------------------------------

def info_to_motion(info: dict[str, torch.Tensor]) -> np.ndarray:
    """Refined kp-info → raw 70-d motion [B, 70] (the types.DIM layout; tz set to 0)."""
    b = info["kp"].shape[0]
    m = np.zeros((b, DIM), dtype=np.float32)
    m[:, EXP] = info["exp"].reshape(b, -1).cpu().numpy()
    m[:, SCALE] = info["scale"].reshape(b).cpu().numpy()
    m[:, 64:66] = info["t"].reshape(b, 3)[:, :2].cpu().numpy()
    m[:, PITCH] = info["pitch"].reshape(b).cpu().numpy()
    m[:, YAW] = info["yaw"].reshape(b).cpu().numpy()
    m[:, ROLL] = info["roll"].reshape(b).cpu().numpy()
    return m


def _moda_copy_mask() -> np.ndarray:
    mask = np.zeros((N_KP, 3), dtype=bool)
    mask[[1, 2, 6, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], :] = True
    mask[3:5, 1] = True                                              # kp3.y, kp4.y
    mask[5, 2] = True                                                # kp5.z
    mask[8, 2] = True                                                # kp8.z
    mask[9, 1:3] = True                                              # kp9.y, kp9.z
    return mask


MODA_EXP_COPY_MASK: np.ndarray = _moda_copy_mask()
"""[21, 3] bool: the exp entries MoDA takes from the generated motion; the rest stay the source's."""

MODA_EYEBALL_BIAS: np.ndarray = np.zeros((N_KP, 3), dtype=np.float32)
"""Fixed gaze/blink offset MoDA adds to every driving exp (``update_delta_new_eyeball_direction(0, −5)``)."""
MODA_EYEBALL_BIAS[11, 1] = MODA_EYEBALL_BIAS[15, 1] = 0.0025
MODA_EYEBALL_BIAS[13, 1] = MODA_EYEBALL_BIAS[16, 1] = 0.00075


def moda_driving_keypoints(kp_canonical: torch.Tensor, exp_source: torch.Tensor,
                           scale_source: torch.Tensor, motion: torch.Tensor,
                           eyeball_bias: bool = True) -> torch.Tensor:
    """Driving keypoints for raw motion frames, MoDA's absolute drive (before stitching).

    ``δ = exp_s`` with the :data:`MODA_EXP_COPY_MASK` entries taken from the frame's exp (after
    the fixed eyeball bias); ``R`` from the frame's pose; **scale = the source's** (the generated
    scale is unused); ``t`` = the frame's (tx, ty), tz dropped.

    Args:
        kp_canonical: [21, 3] or [1, 21, 3] source canonical keypoints x_c.
        exp_source: [21, 3] or [1, 21, 3] source expression.
        scale_source: scalar / [1] / [1, 1] source scale.
        motion: [B, 70] raw motion.
    Returns: [B, 21, 3].
    """
    if motion.ndim != 2 or motion.shape[1] != DIM:
        raise ValueError(f"motion must be [B, {DIM}], got {tuple(motion.shape)}")
    b = motion.shape[0]
    exp_d = motion[:, EXP].reshape(b, N_KP, 3)          # B×21×3
    if eyeball_bias:
        exp_d = exp_d + torch.as_tensor(MODA_EYEBALL_BIAS, dtype=motion.dtype, device=motion.device)
    mask = torch.as_tensor(MODA_EXP_COPY_MASK, device=motion.device)
    delta = torch.where(mask, exp_d, exp_source.reshape(1, N_KP, 3).to(motion.dtype))
    rot = K.rotation_matrix(motion[:, PITCH], motion[:, YAW], motion[:, ROLL])
    kc = kp_canonical.reshape(1, N_KP, 3).to(motion.dtype).expand(b, -1, -1)
    scale = scale_source.reshape(1, 1).to(motion.dtype).expand(b, 1)
    return K.transform_keypoints(kc, rot, delta, scale, motion[:, T])


def plain_driving_keypoints(kp_canonical: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """Driving keypoints using every field of the motion as is (x = s·(x_c·R + exp) + t)."""
    b = motion.shape[0]
    rot = K.rotation_matrix(motion[:, PITCH], motion[:, YAW], motion[:, ROLL])
    kc = kp_canonical.reshape(1, N_KP, 3).to(motion.dtype).expand(b, -1, -1)
    return K.transform_keypoints(kc, rot, motion[:, EXP], motion[:, SCALE],
                                 motion[:, T])


class RenderInputError(ValueError):
    """Bad image, avatar or motion given to the renderer."""


def feather_mask(size: int = CROP_SIZE, feather: int | None = None) -> np.ndarray:
    """uint8 [size, size] paste-back template: 255 inside, linear ramp to 0 over the outer edge.

    The release ships this as ``mask_template.png`` (255 inside [16, 496]², 16 px feather at
    512); it is generated here with the ramp measured from pixel centres, ``feather`` defaulting
    to size / 32 (16 at 512).
    """
    f = max(1, size // 32) if feather is None else feather
    c = np.arange(size, dtype=np.float64) + 0.5
    ramp = np.clip(np.minimum(c, size - c) / f, 0.0, 1.0)            # [size]
    return np.round(255 * np.minimum(ramp[:, None], ramp[None, :])).astype(np.uint8)


def paste_back(frame: np.ndarray, image: np.ndarray, crop_to_image: np.ndarray,
               mask: np.ndarray | None = None) -> np.ndarray:
    """The release's paste-back: warp crop and mask into the image, blend, truncate to uint8.

    Args:
        frame: uint8 [S, S, 3] rendered crop.
        image: uint8 [H, W, 3] original portrait.
        crop_to_image: [3, 3] affine crop pixel → image pixel.
        mask: uint8 [S, S] template (default :func:`feather_mask` of size S).
    Returns: uint8 [H, W, 3].
    """
    s = frame.shape[0]
    if frame.shape != (s, s, 3) or frame.dtype != np.uint8:
        raise RenderInputError(f"frame must be uint8 [S, S, 3], got {frame.dtype} {frame.shape}")
    mask = feather_mask(s) if mask is None else mask
    h, w = image.shape[:2]
    m = np.asarray(crop_to_image, dtype=np.float64)[:2]
    alpha = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=0).astype(np.float32)[..., None] / 255
    warped = cv2.warpAffine(frame, m, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32)
    out = alpha * warped + (1 - alpha) * image.astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def default_crop(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FaceMesh landmarks → LivePortrait crop (avatar_agent.face), black border as the release."""
    from avatar_agent.face.crop import crop_transform, warp_crop
    from avatar_agent.face.landmarks import detect_landmarks

    tf = crop_transform(detect_landmarks(image).points, size=CROP_SIZE)
    return warp_crop(image, tf, border="constant"), tf.c2o


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Pad to a centred square (black) and resize to size × size (INTER_AREA when shrinking)."""
    h, w = image.shape[:2]
    side = max(h, w)
    sq = np.zeros((side, side, 3), dtype=np.uint8)
    y0, x0 = (side - h) // 2, (side - w) // 2
    sq[y0:y0 + h, x0:x0 + w] = image
    if side == size:
        return sq
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(sq, (size, size), interpolation=interp)


CompileMode = Literal["off", "compile", "cudagraphs"]
COMPILE_MODES: tuple[str, ...] = ("off", "compile", "cudagraphs")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The renderer's precision on ``device``: "auto" → fp16 on CUDA (the release), fp32 elsewhere.

    Raises ValueError (one line) for an unknown name and for fp16 without CUDA.
    """
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    autocast(device, precision)                        # validates (fp16 on a CPU is refused)
    return precision


class WarpDecode(nn.Module):
    """W + G as one module (what ``compile`` wraps): driving keypoints → crops, under the
    renderer's autocast; outputs float32.

    Args:
        warping, spade: the LivePortrait networks.
        precision: "fp32", "bf16" or "fp16" (autocast inside the forward, so a compiled graph
            holds it).
        channels_last: feed G channels-last features.
    """

    def __init__(self, warping: nn.Module, spade: nn.Module, precision: str,
                 channels_last: bool) -> None:
        super().__init__()
        self.warping, self.spade = warping, spade
        self.precision, self.channels_last = precision, channels_last
        self._dtype = autocast_dtype(precision)

    def forward(self, f_s: torch.Tensor, x_s: torch.Tensor,
                x_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f_s [B, 32, 16, 64, 64], x_s / x_d [B, 21, 3] → (image [B, 3, 512, 512] in [0, 1],
        occlusion map, deformation)."""
        # A plain torch.autocast (disabled for fp32): what torch.compile traces best.
        with torch.autocast(f_s.device.type, dtype=self._dtype, enabled=self._dtype != torch.float32):
            w = self.warping(f_s, kp_driving=x_d, kp_source=x_s)
            feat = w["out"]
            if self.channels_last:
                feat = feat.contiguous(memory_format=torch.channels_last)
            img = self.spade(feat)
        return img.float(), w["occlusion_map"].float(), w["deformation"].float()


class LivePortraitRenderer:
    """Renderer protocol implementation for the ``official`` profile.

    Args:
        weights: directory with the release's checkpoints (see
            :func:`avatar_agent.nn.liveportrait.weights.find_weight_files`) or already-built
            :class:`LivePortraitModules` (e.g. tests with synthetic weights).
        device: torch device; default CUDA when available, else CPU.
        precision: autocast dtype of F/M/W/G: "auto" (fp16 on CUDA as the release, fp32 on a
            CPU), "fp32", "bf16" or "fp16" (CUDA only).
        crop: image → (512² crop, crop→image matrix); default FaceMesh + LivePortrait geometry.
        drive: "moda" = MoDA's absolute drive (source scale, masked exp copy, eyeball bias);
            "plain" = x = s·(x_c·R + exp) + t with every motion field as given.
        stitching: apply the stitching MLP (MoDA: on).
        eyeball_bias: MoDA's fixed gaze offset (only with drive="moda").
        output: "crop" = the 512² face crop (resized to ``size``); "image" = pasted back into
            the portrait, letterboxed to ``size`` × ``size``.
        size: output frame side in pixels.
        max_batch: frames per W+G forward (bounds memory; MoDA renders 25 at a time).
        channels_last: run G (the SPADE decoder) in channels-last layout (faster convolutions
            with cuDNN / oneDNN; numerically equivalent).
        compile: "off"; "compile" = W + G under ``torch.compile``; "cudagraphs" = W + G
            captured as CUDA graphs (``torch.compile``'s cudagraphs backend).  CUDA only; batches
            are padded to bucket sizes (1, 2, 4, … , max_batch), all built at the first W + G
            call (the engine's warm-up), so no live frame pays a build.
        device_paste: uint8 conversion, paste-back and resizing on the renderer's device (only
            finished frames cross to the CPU); default on for CUDA.  Off: the release's NumPy /
            OpenCV path on the CPU.
    """

    profile: Profile = "official"

    def __init__(self, weights: str | Path | LivePortraitModules, *,
                 device: str | torch.device | None = None, precision: str = "auto",
                 crop: CropFn | None = None, drive: Literal["moda", "plain"] = "moda",
                 stitching: bool = True, eyeball_bias: bool = True,
                 output: Literal["crop", "image"] = "crop", size: int = CROP_SIZE,
                 max_batch: int = 25, channels_last: bool = False,
                 compile: CompileMode = "off", device_paste: bool | None = None) -> None:
        if drive not in ("moda", "plain"):
            raise ValueError(f"drive must be 'moda' or 'plain', got {drive!r}")
        if output not in ("crop", "image"):
            raise ValueError(f"output must be 'crop' or 'image', got {output!r}")
        if size < 16 or max_batch < 1:
            raise ValueError(f"size must be ≥ 16 and max_batch ≥ 1 (got {size}, {max_batch})")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if compile != "off" and self.device.type != "cuda":
            raise ValueError(f"compile={compile!r} needs CUDA (device is {self.device}); use 'off'")
        self.precision = resolve_precision(precision, self.device)
        if isinstance(weights, LivePortraitModules):
            self.nets = weights.to(self.device)
        else:
            path = Path(weights)
            if not path.is_dir():
                raise WeightsError(f"LivePortrait weights directory {path} does not exist; fetch "
                                   f"the weights with `avatar-agent models fetch official`")
            self.nets = load_modules(path, self.device)
        self.crop_fn: CropFn = crop or default_crop
        self.drive = drive
        self.stitching = stitching
        self.eyeball_bias = eyeball_bias
        self.output = output
        self.size = int(size)
        self.max_batch = int(max_batch)
        self._mask = feather_mask(CROP_SIZE)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            # G only: its 2-D convolutions are the largest cost; W reshapes its features with
            # view(), which needs the default layout.
            # (Module.to takes memory_format at run time; torch's typed overloads omit it.)
            self.nets.spade.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.device_paste = (self.device.type == "cuda") if device_paste is None else bool(device_paste)
        self.compile: CompileMode = compile
        self._built = False
        self._wd = WarpDecode(self.nets.warping, self.nets.spade, self.precision, self.channels_last)
        self._wd_call: Any = self._wd
        if compile == "compile":
            self._wd_call = torch.compile(self._wd, dynamic=False)
        elif compile == "cudagraphs":
            self._wd_call = torch.compile(self._wd, backend="cudagraphs", dynamic=False)

    @classmethod
    def from_dir(cls, models_dir: str | Path, **kwargs) -> "LivePortraitRenderer":
        """Renderer with the official weights found below ``models_dir``."""
        return cls(Path(models_dir), **kwargs)

    # ----------------------------------------------------------------------------------------
    # Avatar preparation
    # ----------------------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> Avatar:
        """Crop the portrait's face and run F and M on it once."""
        image = _check_rgb(image, "image")
        crop, c2o = self.crop_fn(image)
        return self.prepare_crop(crop, image=image, crop_to_image=c2o)

    def prepare_crop(self, crop: np.ndarray, image: np.ndarray | None = None,
                     crop_to_image: np.ndarray | None = None) -> Avatar:
        """Prepare from an already aligned square crop (any size; 256² is used as is).

        Without ``image``, the crop itself (resized to 512²) is the portrait.
        """
        crop = _check_rgb(crop, "crop")
        if crop.shape[0] != crop.shape[1]:
            raise RenderInputError(f"crop must be square, got {crop.shape[:2]}")
        net_in = crop if crop.shape[0] == NET_SIZE else cv2.resize(
            crop, (NET_SIZE, NET_SIZE), interpolation=cv2.INTER_AREA)
        crop512 = crop if crop.shape[0] == CROP_SIZE else cv2.resize(
            crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR)
        if image is None:
            image, crop_to_image = crop512, np.eye(3)
        elif crop_to_image is None:
            raise RenderInputError("prepare_crop: crop_to_image is required when image is given")
        elif crop.shape[0] != CROP_SIZE:
            # crop_to_image refers to the given crop's pixels; rescale it to the 512² crop's.
            k = crop.shape[0] / CROP_SIZE
            crop_to_image = np.asarray(crop_to_image, dtype=np.float64) @ np.diag([k, k, 1.0])

        x = torch.from_numpy(np.ascontiguousarray(net_in)).permute(2, 0, 1)[None]
        x = (x.float() / 255).clamp(0, 1).to(self.device)            # 1×3×256×256
        with torch.no_grad(), self._autocast():
            f_s = self.nets.appearance(x).float()                    # 1×32×16×64×64
            raw = self.nets.motion(x)
        info = K.refine_motion_output(raw)
        x_s = K.source_keypoints(info)                               # 1×21×3
        extra = {"f_s": f_s, "x_s": x_s, "kp": info["kp"], "exp": info["exp"],
                 "scale": info["scale"], "info": info}
        avatar = Avatar(profile="official", image=np.ascontiguousarray(image), crop=crop512,
                        crop_to_image=np.asarray(crop_to_image, dtype=np.float64),
                        kp_canonical=info["kp"][0].cpu().numpy().astype(np.float32),
                        rest_motion=info_to_motion(info)[0], extra=extra)
        if self.device_paste and self.output == "image":
            # the paste-back tables now (prepare runs beside the frame thread), not in a frame job
            self._gpu_paste(avatar, CROP_SIZE)
        return avatar

    # ----------------------------------------------------------------------------------------
    # Rendering
    # ----------------------------------------------------------------------------------------

    def driving_keypoints(self, avatar: Avatar, motion: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stitched driving keypoints [B, 21, 3] for raw motion [B, 70]."""
        ex = self._extra(avatar)
        m = torch.as_tensor(np.asarray(motion, dtype=np.float32) if not isinstance(motion, torch.Tensor)
                            else motion, dtype=torch.float32, device=self.device)
        if self.drive == "moda":
            x_d = moda_driving_keypoints(ex["kp"], ex["exp"], ex["scale"], m, self.eyeball_bias)
        else:
            x_d = plain_driving_keypoints(ex["kp"], m)
        if self.stitching:
            with torch.no_grad():
                x_d = self.nets.stitching.stitch(ex["x_s"].expand(m.shape[0], -1, -1), x_d)
        return x_d

    def warp_decode(self, avatar: Avatar, x_d: torch.Tensor) -> dict[str, torch.Tensor]:
        """W + G for driving keypoints [B, 21, 3]: ``{"image" B×3×512×512 in [0,1], "occlusion_map",
        "deformation"}`` (float32)."""
        ex = self._extra(avatar)
        b = x_d.shape[0]
        return self._run_wd(ex["f_s"].expand(b, -1, -1, -1, -1), ex["x_s"].expand(b, -1, -1), x_d)

    def _bucket(self, b: int) -> int:
        """Batch size a compiled W + G runs ``b`` frames at: the next power of two, ≤ max_batch."""
        if self.compile == "off":
            return b
        k = 1
        while k < b:
            k *= 2
        return min(k, max(self.max_batch, b))

    def buckets(self) -> list[int]:
        """Every batch size a compiled W + G runs at (1, 2, 4, …, max_batch)."""
        out, k = [], 1
        while k < self.max_batch:
            out.append(k)
            k *= 2
        return [*out, self.max_batch]

    def _build(self, f_s: torch.Tensor, x_s: torch.Tensor, x_d: torch.Tensor) -> None:
        """Compile (and capture) W + G at every bucket now, from the first call's inputs, so no
        later frame pays a build.  The first call is the engine's warm-up or an avatar's first
        frame, on the thread every later call runs on (CUDA graphs are per thread)."""
        self._built = True
        for k in self.buckets():
            i = torch.zeros(k, dtype=torch.long, device=x_d.device)
            for _ in range(2 if self.compile == "cudagraphs" else 1):  # warm-up run, then capture
                if self.compile == "cudagraphs":
                    torch.compiler.cudagraph_mark_step_begin()
                self._wd_call(f_s[i], x_s[i], x_d[i])

    @torch.no_grad()
    def _run_wd(self, f_s: torch.Tensor, x_s: torch.Tensor,
                x_d: torch.Tensor) -> dict[str, torch.Tensor]:
        """One W + G call (padded to the compile bucket by repeating the last frame)."""
        b = x_d.shape[0]
        if self.compile != "off" and not self._built:
            self._build(f_s, x_s, x_d)
        pad = self._bucket(b) - b
        if pad:
            f_s, x_s, x_d = (torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in (f_s, x_s, x_d))
        elif self.compile != "off":
            # one memory layout per bucket (a broadcast view would be another compiled variant)
            f_s, x_s, x_d = f_s.contiguous(), x_s.contiguous(), x_d.contiguous()
        if self.compile == "cudagraphs":
            # A CUDA graph's outputs live in memory its next replay overwrites: mark the new
            # step, and copy the outputs out (below) before anything else runs the graph.
            torch.compiler.cudagraph_mark_step_begin()
        img, occ, deform = self._wd_call(f_s, x_s, x_d)
        out = {"image": img[:b], "occlusion_map": occ[:b], "deformation": deform[:b]}
        if self.compile == "cudagraphs":
            out = {k: v.clone() for k, v in out.items()}
        return out

    def render_detailed(self, avatar: Avatar, motion: np.ndarray) -> dict:
        """One forward for raw motion [B, 70] (no chunking): the uint8 crops and the internals.

        Returns ``{"frames" uint8 [B, 512, 512, 3], "x_d" [B, 21, 3], "image" [B, 3, 512, 512],
        "occlusion_map", "deformation"}`` (tensors float32 on the renderer's device).
        """
        motion = _check_motion(motion)
        x_d = self.driving_keypoints(avatar, motion)
        out = self.warp_decode(avatar, x_d)
        # The release's parse_output: clip, ×255, truncating cast (no rounding).
        u8 = (np.clip(out["image"].permute(0, 2, 3, 1).cpu().numpy(), 0, 1) * 255).astype(np.uint8)
        return {"frames": u8, "x_d": x_d, **out}

    def render(self, avatar: Avatar, motion: np.ndarray) -> np.ndarray:
        """uint8 [B, size, size, 3] frames for raw motion [B, 70] (one W + G call per
        ``max_batch`` frames)."""
        return self.render_many([(avatar, motion)])[0]

    def render_many(self, jobs: Sequence[tuple[Avatar, np.ndarray]]) -> list[np.ndarray]:
        """Frames of several avatars (e.g. sessions) at once: all their motion frames go through
        W + G together, ``max_batch`` frames per call.

        Args:
            jobs: (avatar, raw motion [B_i, 70]) pairs; avatars may repeat.
        Returns: uint8 [B_i, size, size, 3] per job, in order.
        """
        checked = [(a, _check_motion(m)) for a, m in jobs]
        extras = [self._extra(a) for a, _ in checked]
        counts = [m.shape[0] for _, m in checked]
        outs: list[list[np.ndarray]] = [[] for _ in checked]
        if sum(counts):
            x_d = torch.cat([self.driving_keypoints(a, m) for a, m in checked if m.shape[0]])
            owner = np.repeat(np.arange(len(checked)), counts)       # job of each frame
            for s in range(0, owner.size, self.max_batch):
                seg = owner[s:s + self.max_batch]
                # runs of consecutive frames of one job: (job, first, end) within the segment
                cuts = [0, *(np.flatnonzero(np.diff(seg)) + 1).tolist(), seg.size]
                runs = [(int(seg[a]), a, e) for a, e in zip(cuts[:-1], cuts[1:], strict=True)]
                # one avatar: a broadcast view; several: their features gathered into one batch
                f_s = _gather([extras[j]["f_s"].expand(e - a, -1, -1, -1, -1) for j, a, e in runs])
                x_s = _gather([extras[j]["x_s"].expand(e - a, -1, -1) for j, a, e in runs])
                img = self._run_wd(f_s, x_s, x_d[s:s + seg.size])["image"]
                for j, a, e in runs:
                    outs[j].append(self._frames(checked[j][0], img[a:e]))
        empty = np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        return [np.concatenate(o) if o else empty for o in outs]

    def _frames(self, avatar: Avatar, img: torch.Tensor) -> np.ndarray:
        """Generator output [n, 3, S, S] in [0, 1] → finished uint8 frames [n, size, size, 3]."""
        if self.device_paste:
            return self.device_frames(avatar, img).cpu().numpy()
        # The release's parse_output: clip, ×255, truncating cast (no rounding).
        crops = (np.clip(img.permute(0, 2, 3, 1).cpu().numpy(), 0, 1) * 255).astype(np.uint8)
        return np.stack([self._finish(avatar, f) for f in crops])

    @torch.no_grad()
    def device_frames(self, avatar: Avatar, img: torch.Tensor) -> torch.Tensor:
        """The device path of :meth:`_frames`: uint8 [n, size, size, 3] on the renderer's device.

        Crops: the release's truncating uint8 conversion (bit-equal to the CPU path), resized
        with antialiased bilinear filtering when ``size`` differs.  Image output: paste-back by
        :class:`~avatar_agent.render.gpu_paste.GpuPaste`, then the letterbox, both on the device.
        """
        crops = (img.float().clamp(0, 1) * 255).to(torch.uint8)          # [n, 3, S, S], truncates
        if self.output == "image":
            full = self._gpu_paste(avatar, crops.shape[-1])(crops.float() / 255)  # [n, H, W, 3]
            return _device_letterbox(full, self.size)
        if crops.shape[-1] != self.size:
            crops = _device_resize(crops, self.size)
        return crops.permute(0, 2, 3, 1).contiguous()

    def _gpu_paste(self, avatar: Avatar, side: int) -> Any:
        """The avatar's :class:`GpuPaste` for crops of ``side`` px on this device (built once)."""
        from avatar_agent.render.gpu_paste import GpuPaste

        key = f"gpu_paste:{self.device}:{side}"
        paste = avatar.extra.get(key)
        if paste is None:
            k = CROP_SIZE / side                     # crop_to_image refers to 512² crop pixels
            c2o = np.asarray(avatar.crop_to_image, dtype=np.float64) @ np.diag([k, k, 1.0])
            mask = self._mask if side == CROP_SIZE else feather_mask(side)
            paste = avatar.extra[key] = GpuPaste(avatar.image, c2o, mask, self.device)
        return paste

    def paste_back(self, avatar: Avatar, frame: np.ndarray) -> np.ndarray:
        """One crop frame pasted into the avatar's portrait (uint8 [H, W, 3]).

        ``avatar.crop_to_image`` refers to 512² crop pixels; smaller frames are scaled to it.
        """
        s = frame.shape[0]
        mask = self._mask if s == CROP_SIZE else feather_mask(s)
        k = CROP_SIZE / s
        c2o = np.asarray(avatar.crop_to_image, dtype=np.float64) @ np.diag([k, k, 1.0])
        return paste_back(frame, avatar.image, c2o, mask)

    def _finish(self, avatar: Avatar, frame: np.ndarray) -> np.ndarray:
        if self.output == "image":
            return letterbox(self.paste_back(avatar, frame), self.size)
        if frame.shape[0] != self.size:
            interp = cv2.INTER_AREA if self.size < frame.shape[0] else cv2.INTER_LINEAR
            return cv2.resize(frame, (self.size, self.size), interpolation=interp)
        return frame

    def _extra(self, avatar: Avatar) -> dict:
        if avatar.profile != "official" or "f_s" not in avatar.extra:
            raise RenderInputError("avatar was not prepared by LivePortraitRenderer.prepare "
                                   f"(profile {avatar.profile!r})")
        return avatar.extra

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)


def _gather(parts: list[torch.Tensor]) -> torch.Tensor:
    """One tensor of ``parts`` along the batch axis (no copy for a single part)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _device_resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [n, 3, h, w] → uint8 [n, 3, size, size]: bilinear, antialiased when shrinking
    (the device counterpart of OpenCV's INTER_AREA / INTER_LINEAR), rounded."""
    shrink = size < img.shape[-1]
    out = F.interpolate(img.float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=shrink)
    return out.round().clamp(0, 255).to(torch.uint8)


def _device_letterbox(frames: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`letterbox` on the device: uint8 [n, H, W, 3] → uint8 [n, size, size, 3]."""
    n, h, w, _ = frames.shape
    side = max(h, w)
    sq = frames.new_zeros((n, 3, side, side))
    y0, x0 = (side - h) // 2, (side - w) // 2
    sq[:, :, y0:y0 + h, x0:x0 + w] = frames.permute(0, 3, 1, 2)
    if side != size:
        sq = _device_resize(sq, size)
    return sq.permute(0, 2, 3, 1).contiguous()


def _check_motion(motion: np.ndarray) -> np.ndarray:
    m = np.asarray(motion, dtype=np.float32)
    if m.ndim != 2 or m.shape[1] != DIM:
        raise RenderInputError(f"motion must be [B, {DIM}], got {m.shape}")
    if not np.isfinite(m).all():
        raise RenderInputError("motion contains NaN or inf")
    return m


def _check_rgb(image: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise RenderInputError(f"{name} must be uint8 RGB [H, W, 3], got {a.dtype} {a.shape}")
    if min(a.shape[:2]) < 16:
        raise RenderInputError(f"{name} is too small: {a.shape[:2]}")
    return a
