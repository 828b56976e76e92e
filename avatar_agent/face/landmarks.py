"""Face landmarks: mediapipe 0.10.21 FaceDetection (full range) + FaceMesh (478 points).

One portrait → :class:`FaceLandmarks` in the image's own pixel coordinates.  The pipeline is

1. normalise the input to uint8 RGB (grayscale, RGBA, float and 16-bit images are accepted);
2. downscale huge images for detection only (landmarks are mapped back to full resolution);
3. FaceDetection (full-range model) on the whole image; the largest face wins;
4. FaceMesh(static_image_mode, refine_landmarks) on a square crop around that face, resampled to
   a fixed working size, so small faces in big images are upscaled and big faces downscaled.

mediapipe is imported lazily (it is installed with ``--no-deps`` by install.sh).  Its graphs take
~100 ms to build, so one :class:`FaceAnalyzer` keeps them; :func:`detect_landmarks` uses a cached
default analyzer.  mediapipe graphs are not thread-safe, hence the lock.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

N_LANDMARKS = 478
MIN_FACE_PX = 64
"""Smallest face we animate (image pixels; the larger side of the box around the FaceMesh face
outline, hairline to chin); smaller faces turn to mush when upscaled into the 512 px crop."""

FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
             377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67,
             109)

DETECT_MAX_SIDE = 1920
"""Images with a longer side are downscaled to this for face detection."""

MESH_INPUT = 512
"""Side of the square face crop FaceMesh sees."""

MESH_CONTEXT = 2.2
"""FaceMesh crop side = this × detection box side (FaceMesh runs its own short-range detector
on the crop, which wants the face to fill roughly half of it)."""

MAX_IMAGE_PIXELS = 150_000_000
"""load_image refuses files with more pixels than this (about 12000 × 12000)."""

MAX_PORTRAIT_PIXELS = 4096 * 4096
"""load_portrait downscales larger portraits to this while decoding (the face crop is 512 px, so
nothing visible is lost, and a swap never holds a 400 MB array)."""


class FaceError(ValueError):
    """The image cannot be analysed: no face, face too small, or unreadable/unsupported image."""


@dataclass(frozen=True)
class FaceLandmarks:
    """478 FaceMesh landmarks of the largest face of an image.

    Attributes:
        points: float32 [478, 3] in image pixels: x right, y down, z = FaceMesh depth scaled to
            pixels (same scale as x; positive = away from the viewer, ~0 at the face centre).
        bbox: (x0, y0, x1, y1) face detection box in image pixels.
        n_faces_found: how many faces the detector found (the largest is used).
        warnings: human-readable notes (several faces, image downscaled, alpha dropped, ...).
    """

    points: np.ndarray
    bbox: tuple[float, float, float, float]
    n_faces_found: int
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Image input
# --------------------------------------------------------------------------------------------


def to_rgb_uint8(image: np.ndarray, notes: list[str] | None = None) -> np.ndarray:
    """Normalise an image array to contiguous uint8 RGB [H, W, 3].

    Accepts [H, W] grayscale, [H, W, 1], [H, W, 3] RGB, [H, W, 4] RGBA (alpha dropped); dtypes
    uint8, uint16 (÷257), bool, and floats (in [0, 1] → ×255, otherwise clipped to [0, 255]).
    Conversions are recorded in ``notes`` when given.

    Raises:
        FaceError: wrong type/shape/dtype, empty image or non-finite values.
    """
    if not isinstance(image, np.ndarray):
        raise FaceError(f"image must be a numpy array (H×W×3 uint8 RGB), got {type(image).__name__}; "
                        "load files with avatar_agent.face.landmarks.load_image")
    notes = notes if notes is not None else []
    img = image
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise FaceError(f"image has shape {image.shape}; expected H×W (gray), H×W×3 (RGB) or "
                        "H×W×4 (RGBA)")
    if img.shape[0] < 16 or img.shape[1] < 16:
        raise FaceError(f"image of {img.shape[1]}×{img.shape[0]} px is too small to hold a face; "
                        f"use a portrait where the face is at least {MIN_FACE_PX} px")
    if img.dtype == np.uint8:
        pass
    elif img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    elif img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            raise FaceError("image contains NaN or infinite values")
        hi = float(img.max())
        scale = 255.0 if hi <= 1.0 + 1e-6 else 1.0
        img = np.clip(img.astype(np.float32) * scale + 0.5, 0, 255).astype(np.uint8)
        notes.append(f"float image converted to uint8 (×{scale:g})")
    else:
        raise FaceError(f"unsupported image dtype {img.dtype}; use uint8 RGB")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
        notes.append("grayscale image converted to RGB")
    elif img.shape[2] == 4:
        img = img[:, :, :3]
        notes.append("alpha channel dropped")
    return np.ascontiguousarray(img)


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3].

    Raises:
        FileNotFoundError: the file does not exist.
        FaceError: the file is not a readable image, or it has more than ``max_pixels`` pixels
            (checked from the header, before decoding).
    """
    p = Path(path)
    data = _read_checked(p, max_pixels)
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FaceError(f"portrait image {str(p)!r} is corrupt or in an unsupported format; "
                        "re-export it as PNG or JPEG")
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    elif img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return to_rgb_uint8(img)


def load_portrait(path: str | os.PathLike, max_pixels: int = MAX_PORTRAIT_PIXELS) -> np.ndarray:
    """Read a portrait for the avatar: :func:`load_image`, but at most ``max_pixels`` pixels.

    A larger image is downscaled while it is decoded (JPEG decodes at 1/2, 1/4 or 1/8 scale
    directly, which is also what keeps a 12000 × 12000 photo from costing seconds), then resized
    to fit.  Files over :data:`MAX_IMAGE_PIXELS` are refused from their header, before decoding.
    CPU-bound: call it from a worker thread, never on the event loop.

    Raises:
        FileNotFoundError / FaceError: as :func:`load_image`.
    """
    p = Path(path)
    size = _header_size(p) if p.is_file() else None
    if size is None or size[0] * size[1] <= max_pixels:
        return load_image(p)
    data = _read_checked(p, MAX_IMAGE_PIXELS)
    w, h = size
    factor = 1
    for k in (2, 4, 8):                          # the smallest reduction that fits, if one does
        factor = k
        if (w // k) * (h // k) <= max_pixels:
            break
    flag = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if img is None:
        raise FaceError(f"portrait image {str(p)!r} is corrupt or in an unsupported format; "
                        "re-export it as PNG or JPEG")
    ih, iw = img.shape[:2]
    if iw * ih > max_pixels:
        f = (max_pixels / (iw * ih)) ** 0.5
        img = cv2.resize(img, (max(16, int(iw * f)), max(16, int(ih * f))),
                         interpolation=cv2.INTER_AREA)
    log.info("portrait %s is %d×%d (%.0f MP): downscaled to %d×%d", p.name, w, h, w * h / 1e6,
             img.shape[1], img.shape[0])
    return to_rgb_uint8(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


def _header_size(p: Path) -> tuple[int, int] | None:
    """(width, height) from the file header (Pillow); None when unknown (no Pillow, bad file)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                return im.size
    except Exception:  # corrupt, or a bomb: load_image reports it in its own words
        return None


def _read_checked(p: Path, max_pixels: int) -> bytes:
    """The file's bytes, after refusing a missing/empty file or one over ``max_pixels``."""
    if not p.is_file():
        raise FileNotFoundError(f"portrait image {str(p)!r} not found; pass the path of a "
                                "JPEG/PNG/WebP file")
    data = p.read_bytes()
    if not data:
        raise FaceError(f"portrait image {str(p)!r} is empty (0 bytes)")
    w = h = None
    try:  # header-only size check; Pillow ships with matplotlib (a mediapipe dependency)
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            with Image.open(p) as im:
                w, h = im.size
    except ImportError:
        pass
    except Image.DecompressionBombError:  # > ~179 MP: beyond any limit we would accept
        raise FaceError(f"portrait image {str(p)!r} has more than {max_pixels / 1e6:.0f} MP "
                        f"(the MP limit); downscale it first") from None
    except Exception as e:  # Pillow could not even parse the header
        raise FaceError(f"portrait image {str(p)!r} is corrupt or not an image ({e}); "
                        "re-export it as PNG or JPEG") from None
    if w is not None and h is not None and w * h > max_pixels:
        raise FaceError(f"portrait image {str(p)!r} is {w}×{h} = {w * h / 1e6:.0f} MP, more than "
                        f"the {max_pixels / 1e6:.0f} MP limit; downscale it first")
    return data


# --------------------------------------------------------------------------------------------
# mediapipe graphs
# --------------------------------------------------------------------------------------------


def _import_mediapipe():
    os.environ.setdefault("GLOG_minloglevel", "2")  # silence TFLite/absl chatter
    _protobuf6_compat()
    try:
        import mediapipe as mp
        _ = mp.solutions.face_mesh
    except (ImportError, AttributeError) as e:
        raise ImportError(
            "face analysis needs mediapipe 0.10.21 (the last release whose wheel ships the face "
            "models and the legacy mp.solutions API): pip install --no-deps mediapipe==0.10.21 "
            f"absl-py attrs flatbuffers matplotlib protobuf==6.33.6 ({e})") from e
    return mp


def _protobuf6_compat() -> None:
    """mediapipe 0.10.21 calls MessageFactory.GetPrototype, which protobuf 6 removed (livekit and
    pipecat need protobuf ≥ 5): without it every graph prints an AttributeError line on stderr
    (the landmarks are identical either way).  GetMessageClass is its documented replacement."""
    from google.protobuf import message_factory

    if getattr(message_factory.MessageFactory, "GetPrototype", None) is None:
        message_factory.MessageFactory.GetPrototype = (   # type: ignore[attr-defined]
            lambda self, descriptor: message_factory.GetMessageClass(descriptor))


class FaceAnalyzer:
    """Holds built mediapipe graphs (FaceDetection full range + static FaceMesh with iris).

    Building the graphs costs ~100 ms; keep one analyzer per process.  Thread-safe (a lock
    serialises calls, mediapipe graphs are not re-entrant).
    """

    def __init__(self, min_detection_confidence: float = 0.5) -> None:
        mp = _import_mediapipe()
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_detection_confidence)
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, refine_landmarks=True, max_num_faces=1,
            min_detection_confidence=0.3)
        self._lock = threading.Lock()

    def detect_faces(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        """Face boxes (x0, y0, x1, y1, score) in pixels of ``rgb`` (uint8 RGB), largest first."""
        h, w = rgb.shape[:2]
        with self._lock:
            res = self._detector.process(rgb)
        boxes = []
        for det in res.detections or []:
            bb = det.location_data.relative_bounding_box
            x0, y0 = bb.xmin * w, bb.ymin * h
            boxes.append((x0, y0, x0 + bb.width * w, y0 + bb.height * h, float(det.score[0])))
        boxes.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
        return boxes

    def mesh(self, rgb: np.ndarray) -> np.ndarray | None:
        """[478, 3] landmarks in pixels of ``rgb`` (z scaled by the width), or None."""
        h, w = rgb.shape[:2]
        with self._lock:
            res = self._mesh.process(rgb)
        if not res.multi_face_landmarks:
            return None
        lm = res.multi_face_landmarks[0].landmark
        pts = np.array([(p.x, p.y, p.z) for p in lm], dtype=np.float64)
        if pts.shape[0] != N_LANDMARKS:
            return None
        pts[:, 0] *= w
        pts[:, 1] *= h
        pts[:, 2] *= w
        return pts

    def close(self) -> None:
        """Release the graphs."""
        self._detector.close()
        self._mesh.close()

    # ----------------------------------------------------------------------------------------

    def analyse(self, image: np.ndarray) -> FaceLandmarks:
        """See :func:`detect_landmarks`."""
        notes: list[str] = []
        rgb = to_rgb_uint8(image, notes)
        h, w = rgb.shape[:2]

        # 1. detection on a bounded-size copy (a 10000² image would take seconds and GBs)
        f = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = rgb if f == 1.0 else cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))),
                                               interpolation=cv2.INTER_AREA)
        if f < 1.0:
            notes.append(f"image {w}×{h} downscaled ×{f:.3f} for face detection")
        boxes = self.detect_faces(small) or self._detect_tiled(small)
        if not boxes:
            hint = (f" (the image was downscaled from {w}×{h} for detection; crop it around "
                    "the face)" if f < 1.0 else "")
            raise FaceError(
                f"no face found in the {w}×{h} image{hint}; use a portrait with one clearly "
                f"visible, roughly frontal face at least {MIN_FACE_PX} px tall")
        if len(boxes) > 1:
            notes.append(f"{len(boxes)} faces found; using the largest")
            # Said out loud: a group photo animating the "wrong" face must not be a mystery.
            log.warning("%d faces found in the %d×%d portrait; animating the largest, at "
                        "(%.0f, %.0f)–(%.0f, %.0f); crop the image to choose another",
                        len(boxes), w, h, *(v / f for v in boxes[0][:4]))
        x0, y0, x1, y1 = (v / f for v in boxes[0][:4])
        side = max(x1 - x0, y1 - y0)
        # the detection box is a little tighter than the face outline: pre-filter with slack,
        # the real check is on the mesh below
        if side < 0.75 * MIN_FACE_PX:
            raise _too_small(side)

        # 2. FaceMesh on a square crop around the face, at a fixed working resolution
        pts = None
        for context in (MESH_CONTEXT, 1.6, 3.0):
            pts = self._mesh_around(rgb, (x0 + x1) / 2, (y0 + y1) / 2, side * context)
            if pts is not None:
                break
        if pts is None:
            raise FaceError(
                f"a face was detected at ({x0:.0f},{y0:.0f})–({x1:.0f},{y1:.0f}) but its landmarks "
                "could not be located; use a sharper, roughly frontal, unoccluded portrait")
        oval = pts[list(FACE_OVAL), :2]
        extent = float(np.ptp(oval, axis=0).max())
        if extent < MIN_FACE_PX:
            raise _too_small(extent)
        return FaceLandmarks(points=pts.astype(np.float32), bbox=(x0, y0, x1, y1),
                             n_faces_found=len(boxes), warnings=notes)

    def _detect_tiled(self, rgb: np.ndarray,
                      max_tiles: int = 25) -> list[tuple[float, float, float, float, float]]:
        """Second chance for small faces: the detector sees its input at 192 px, so a 50 px face
        in a 1000 px image shrinks to ~10 px.  Run it on overlapping tiles instead (failure path
        only), so the caller can say "too small" rather than "no face"."""
        h, w = rgb.shape[:2]
        tile = max(256, min(h, w) // 2)
        if tile >= max(h, w):
            return []
        stride = tile // 2
        ys = list(range(0, max(1, h - tile) + 1, stride))
        xs = list(range(0, max(1, w - tile) + 1, stride))
        if ys[-1] + tile < h:
            ys.append(h - tile)
        if xs[-1] + tile < w:
            xs.append(w - tile)
        if len(xs) * len(ys) > max_tiles:
            return []
        boxes = []
        for y in ys:
            for x in xs:
                for b in self.detect_faces(np.ascontiguousarray(rgb[y:y + tile, x:x + tile])):
                    boxes.append((b[0] + x, b[1] + y, b[2] + x, b[3] + y, b[4]))
        # overlapping tiles see the same face: keep the best-scoring box of each cluster
        boxes.sort(key=lambda b: -b[4])
        kept: list[tuple[float, float, float, float, float]] = []
        for b in boxes:
            if all(_iou(b, k) < 0.3 for k in kept):
                kept.append(b)
        kept.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
        return kept

    def _mesh_around(self, rgb: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray | None:
        s = MESH_INPUT / side
        # crop pixel = s·(img − (c − side/2)); warpAffine reads only the ROI (no full-image copy)
        m = np.array([[s, 0.0, -s * (cx - side / 2)], [0.0, s, -s * (cy - side / 2)]])
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        crop = cv2.warpAffine(rgb, m, (MESH_INPUT, MESH_INPUT), flags=interp,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        pts = self.mesh(crop)
        if pts is None:
            return None
        pts[:, :2] = pts[:, :2] / s + np.array([cx - side / 2, cy - side / 2])
        pts[:, 2] /= s
        return pts


def _too_small(px: float) -> FaceError:
    return FaceError(
        f"the face is only {px:.0f} px tall; at least {MIN_FACE_PX} px is needed. "
        "Use a closer/higher-resolution portrait or crop the image around the face")


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@functools.cache
def default_analyzer() -> FaceAnalyzer:
    """The process-wide analyzer (built on first use; mediapipe graphs are slow to build)."""
    return FaceAnalyzer()


def detect_landmarks(image: np.ndarray, analyzer: FaceAnalyzer | None = None) -> FaceLandmarks:
    """478 FaceMesh landmarks of the largest face in ``image``.

    Args:
        image: uint8 RGB [H, W, 3]; grayscale, RGBA, uint16 and float images are converted.
        analyzer: graphs to use (default: the cached process-wide :func:`default_analyzer`).

    Returns:
        FaceLandmarks with points in the input's pixel coordinates.

    Raises:
        FaceError: no face, face smaller than 64 px, or an unsupported image array.
    """
    return (analyzer or default_analyzer()).analyse(image)
