#!/usr/bin/env python
"""Lip motion against real speakers: drive a portrait with each video's own audio and correlate
the avatar's mouth opening with the real speaker's.

Usage (from the repo root)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/lipsync_real.py VIDEO... \\
        [--portrait avatars/default.png] [--modes offline,live] [--set motion.generator=procedural]

For each video (anything PyAV decodes, with an audio and a video stream):

1. **Real mouth.**  mediapipe FaceMesh (refine_landmarks, video mode) on every video frame; mouth
   opening = distance between landmarks 13 and 14 (inner lips) / distance between 33 and 263
   (outer eye corners, the inter-ocular distance).  The series is resampled to 25 fps by
   timestamp: output frame k (audio [k, k+1)·40 ms, timestamps relative to the *audio* stream's
   start) takes the video frame on screen at (k + ½)·40 ms.
2. **Avatar.**  The video's audio (16 kHz mono) drives the portrait through the real pipeline on a
   fake clock: ``offline`` = :func:`avatar_agent.offline.render_to_file` (what ``avatar-agent
   render`` does: long chunks, phones recognised over the whole file), ``live`` = the live agent
   (VAD, live hops with their context and lookahead, phones recognised as the audio arrives as
   ``audio.recognizer`` decides: what ``avatar-agent start`` does).  Every rendered frame is measured with the same
   FaceMesh definition.
3. **Envelope baseline.**  The log RMS of each 40 ms audio frame (floored 60 dB under the clip's
   loudest frame) used directly as "mouth opening".

Figures: Pearson r with the real opening at lag 0 and the best r within ±4 frames (±160 ms) with
its lag (positive = the avatar's mouth *after* the person's), per clip and the mean over clips
weighted by their number of measured frames.  Frames where FaceMesh finds no face are left out.

``--quick`` replaces step 2's render + FaceMesh by the motion's own inner-lip gap (no pixels) —
a fast proxy for development, not the figure.  Real-mouth series are cached under
``~/.cache/avatar-agent/lipsync`` (keyed by file content); nothing is written into the repo.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FPS = 25
SR = 16_000
SPF = SR // FPS
MAX_LAG = 4
"""±4 frames = ±160 ms."""
UPPER_INNER, LOWER_INNER, EYE_OUTER_L, EYE_OUTER_R = 13, 14, 33, 263
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "avatar-agent" / "lipsync"


# --------------------------------------------------------------------------------------------
# Measurements (pure functions)
# --------------------------------------------------------------------------------------------


def mouth_ratio(points: np.ndarray) -> float:
    """Inner-lip gap / inter-ocular distance from FaceMesh landmarks [478, ≥2] (pixels)."""
    p = np.asarray(points, np.float64)[:, :2]
    iod = float(np.linalg.norm(p[EYE_OUTER_R] - p[EYE_OUTER_L]))
    return float(np.linalg.norm(p[LOWER_INNER] - p[UPPER_INNER])) / iod if iod > 0 else float("nan")


def resample_to_grid(times: np.ndarray, values: np.ndarray, n: int, fps: int = FPS) -> np.ndarray:
    """Value of the frame on screen at the middle of each output frame ((k + ½)/fps): the last
    frame with timestamp ≤ that time (NaN before the first frame)."""
    t = np.asarray(times, np.float64)
    v = np.asarray(values, np.float64)
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    mid = (np.arange(n) + 0.5) / fps
    idx = np.searchsorted(t, mid, side="right") - 1
    out = np.full(n, np.nan)
    ok = idx >= 0
    out[ok] = v[idx[ok]]
    return out


def envelope(audio: np.ndarray, n: int | None = None, floor_db: float = 60.0) -> np.ndarray:
    """Log RMS (dB) per 40 ms frame, floored ``floor_db`` under the loudest frame."""
    a = np.asarray(audio, np.float64)
    n = a.shape[0] // SPF if n is None else n
    x = np.zeros(n * SPF)
    m = min(a.shape[0], n * SPF)
    x[:m] = a[:m]
    db = 10.0 * np.log10((x.reshape(n, SPF) ** 2).mean(1) + 1e-12)
    return np.maximum(db, db.max() - floor_db)


def lag_corr(avatar: np.ndarray, real: np.ndarray, max_lag: int = MAX_LAG
             ) -> tuple[float, float, int, int]:
    """(r at lag 0, best r within ±max_lag, its lag in frames, frames used at lag 0).

    Lag L correlates avatar[t + L] with real[t]: L > 0 means the avatar moves after the person.
    Pairs where either series is NaN are left out.
    """
    a, b = np.asarray(avatar, np.float64), np.asarray(real, np.float64)
    n = min(a.shape[0], b.shape[0])
    a, b = a[:n], b[:n]

    def r_at(lag: int) -> tuple[float, int]:
        x = a[max(lag, 0): n + min(lag, 0)]
        y = b[max(-lag, 0): n - max(lag, 0)]
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or x[ok].std() < 1e-12 or y[ok].std() < 1e-12:
            return float("nan"), int(ok.sum())
        return float(np.corrcoef(x[ok], y[ok])[0, 1]), int(ok.sum())

    r0, used = r_at(0)
    best, best_lag = -2.0, 0
    for lag in range(-max_lag, max_lag + 1):
        r, _ = r_at(lag)
        if np.isfinite(r) and r > best:
            best, best_lag = r, lag
    return r0, (best if best > -2 else float("nan")), best_lag, used


# --------------------------------------------------------------------------------------------
# FaceMesh
# --------------------------------------------------------------------------------------------


class MouthTracker:
    """FaceMesh (refine_landmarks, video mode) → mouth ratio per frame (NaN without a face)."""

    def __init__(self) -> None:
        from avatar_agent.face.landmarks import _import_mediapipe

        mp = _import_mediapipe()
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False, refine_landmarks=True, max_num_faces=1,
            min_detection_confidence=0.5, min_tracking_confidence=0.5)

    def __call__(self, rgb: np.ndarray) -> float:
        h, w = rgb.shape[:2]
        res = self._mesh.process(np.ascontiguousarray(rgb))
        if not res.multi_face_landmarks:
            return float("nan")
        lm = res.multi_face_landmarks[0].landmark
        pts = np.array([(p.x * w, p.y * h) for p in lm])
        return mouth_ratio(pts)

    def close(self) -> None:
        self._mesh.close()


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Clip:
    """One video: its 16 kHz mono audio and the real mouth opening on the 25 fps grid."""

    name: str
    audio: np.ndarray
    real: np.ndarray


def decode_audio(path: Path) -> tuple[np.ndarray, float]:
    """(16 kHz mono float32 audio, start time in seconds of the audio stream)."""
    import av

    with av.open(str(path)) as c:
        if not c.streams.audio:
            raise SystemExit(f"{path}: no audio stream; give a video with its own speech")
        stream = c.streams.audio[0]
        res = av.AudioResampler(format="flt", layout="mono", rate=SR)
        parts, start = [], None
        for frame in c.decode(stream):
            if start is None and frame.time is not None:
                start = float(frame.time)
            for f in res.resample(frame):
                parts.append(f.to_ndarray().reshape(-1))
        for f in res.resample(None):
            parts.append(f.to_ndarray().reshape(-1))
    audio = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    return audio, start or 0.0


def real_mouth(path: Path, audio_start: float) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps relative to the audio start, mouth ratio) of every video frame."""
    import av

    tracker = MouthTracker()
    times, values = [], []
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise SystemExit(f"{path}: no video stream")
            for frame in c.decode(c.streams.video[0]):
                times.append(float(frame.time) - audio_start)
                values.append(tracker(frame.to_ndarray(format="rgb24")))
    finally:
        tracker.close()
    return np.array(times), np.array(values)


def load_clip(path: Path, use_cache: bool = True) -> Clip:
    """Decode a video; the FaceMesh pass over its frames is cached by file content."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    audio, start = decode_audio(path)
    n = audio.shape[0] // SPF
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:24]
    cached = CACHE / f"{digest}.npz"
    if use_cache and cached.is_file():
        z = np.load(cached)
        times, values = z["times"], z["values"]
    else:
        times, values = real_mouth(path, start)
        if use_cache:
            CACHE.mkdir(parents=True, exist_ok=True)
            np.savez(cached, times=times, values=values)
    return Clip(path.name, audio, resample_to_grid(times, values, n))


# --------------------------------------------------------------------------------------------
# Driving the avatar
# --------------------------------------------------------------------------------------------


class _Collect:
    """A sink that measures each delivered frame's mouth (FaceMesh) by frame index."""

    name = "lipsync"

    def __init__(self, measure: Callable[[np.ndarray], float] | None) -> None:
        self.measure = measure
        self.values: dict[int, float] = {}

    async def start(self, width: int, height: int, fps: int) -> None:
        pass

    async def send(self, frame: Any) -> None:
        if self.measure is not None:
            self.values[frame.index] = self.measure(frame.image)

    async def close(self) -> None:
        pass


class _Tap:
    """Wraps a motion generator, keeping each frame's motion (for ``--quick``)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.profile, self.fps = inner, inner.profile, inner.fps
        self.frames: dict[int, np.ndarray] = {}

    def __getattr__(self, name: str) -> Any:      # rest_pose, set_emotion, min_hop_ms, ...
        return getattr(self.inner, name)

    def prepare(self, avatar: Any) -> None:
        self.inner.prepare(avatar)

    def generate(self, chunk: Any, prev: np.ndarray, emotion: int = 8,
                 intensity: float = 1.0) -> np.ndarray:
        m = self.inner.generate(chunk, prev, emotion, intensity)
        self.frames.update({chunk.start // SPF + i: row for i, row in enumerate(m)})
        return m

    def idle(self, n: int, prev: np.ndarray, t0: float) -> np.ndarray:
        m = self.inner.idle(n, prev, t0)
        self.frames.update({int(round(t0 * FPS)) + i: row for i, row in enumerate(m)})
        return m


def drive(audio: np.ndarray, portrait: Path, mode: str, overrides: list[str],
          quick: bool = False, motion_gap: np.ndarray | None = None,
          no_recognizer: bool = False) -> np.ndarray:
    """The avatar's mouth opening per 25 fps frame when ``audio`` drives ``portrait``.

    mode "offline": the ``render`` path (long chunks; recognised phones attached, as
    ``render`` does when pocketsphinx is installed, unless ``no_recognizer``); "live": the live
    agent's chunking.  Both on
    a fake clock with the real VAD, motion generator and renderer.  ``quick``: the motion's
    inner-lip gap instead of FaceMesh on rendered frames.  ``motion_gap`` (length ≥ frames),
    if given, receives that inner-lip gap in any case.
    """
    import soundfile as sf

    from avatar_agent import wiring
    from avatar_agent.agent import Agent
    from avatar_agent.audio.frames import FramesSource
    from avatar_agent.bench import _FlatRenderer
    from avatar_agent.clock import FakeClock
    from avatar_agent.config import load_config
    from avatar_agent.face.landmarks import load_image
    from avatar_agent.motion.space import lip_opening

    n = audio.shape[0] // SPF
    cfg = load_config(None, ["service.drain_s=0", *overrides], use_default_path=False)
    tracker = None if quick else MouthTracker()
    sink = _Collect(tracker)
    motion = _Tap(wiring.make_motion(cfg))
    renderer = wiring.make_renderer(cfg)
    if quick:
        renderer = _FlatRenderer(renderer.prepare)
    clock = FakeClock()
    try:
        if mode == "offline":
            # What render_to_file builds for an audio file, with our generator tap and sink.
            from avatar_agent.audio.file import FileSource

            from avatar_agent.audio.recognizer import phoneme_source

            with tempfile.TemporaryDirectory() as tmp:
                wav = Path(tmp) / "speech.wav"
                sf.write(wav, audio, SR, subtype="FLOAT")
                source = None if no_recognizer else asyncio.run(phoneme_source(wav, clock))
                source = source or FileSource(wav, realtime=True, clock=clock)
                agent = Agent(cfg, source=source,
                              vad=wiring.make_vad(cfg), motion=motion, renderer=renderer,
                              sinks=[sink], clock=clock, image=load_image(portrait), offline=True)
                asyncio.run(agent.run())
        elif mode == "live":
            agent = Agent(cfg, source=FramesSource.from_audio(audio, clock), vad=wiring.make_vad(cfg),
                          motion=motion, renderer=renderer, sinks=[sink], clock=clock,
                          image=load_image(portrait), phones=wiring.make_phones(cfg, shared=False))
            asyncio.run(agent.run())
        else:
            raise SystemExit(f"mode {mode!r}: use offline or live")
    finally:
        if tracker is not None:
            tracker.close()
    out = np.full(n, np.nan)
    gap = np.full(n, np.nan)
    assert agent.animator.avatar is not None
    kp = agent.animator.avatar.kp_canonical
    for i, m in motion.frames.items():
        if 0 <= i < n:
            gap[i] = float(lip_opening(np.asarray(m, np.float64), kp))
    if motion_gap is not None:
        motion_gap[:n] = gap
    if quick:
        out = gap
    else:
        for i, v in sink.values.items():
            if 0 <= i < n:
                out[i] = v
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def evaluate(paths: list[Path], portrait: Path, modes: list[str], overrides: list[str],
             quick: bool = False, use_cache: bool = True,
             no_recognizer: bool = False) -> dict[str, Any]:
    """Per-clip and frame-weighted mean figures for the envelope baseline and each mode."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        t0 = time.monotonic()
        clip = load_clip(path, use_cache)
        n = clip.real.shape[0]
        series = {"envelope": envelope(clip.audio, n)}
        for mode in modes:
            series[mode] = drive(clip.audio, portrait, mode, overrides, quick,
                                 no_recognizer=no_recognizer)
        row: dict[str, Any] = {"clip": clip.name, "seconds": n / FPS,
                               "real_frames": int(np.isfinite(clip.real).sum())}
        for name, s in series.items():
            r0, best, lag, used = lag_corr(s, clip.real)
            row[name] = {"r0": r0, "r_best": best, "lag_ms": lag * 1000 // FPS, "frames": used}
        row["wall_s"] = time.monotonic() - t0
        rows.append(row)
        print_row(row, ["envelope", *modes], flush=True)
    mean: dict[str, Any] = {}
    for name in ["envelope", *modes]:
        w = np.array([r[name]["frames"] for r in rows], np.float64)
        r0 = np.array([r[name]["r0"] for r in rows])
        rb = np.array([r[name]["r_best"] for r in rows])
        ok = np.isfinite(r0) & (w > 0)
        mean[name] = {"r0": float((r0[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else float("nan"),
                      "r_best": float((rb[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else float("nan"),
                      "frames": int(w.sum())}
    return {"clips": rows, "mean": mean, "modes": modes, "overrides": overrides, "quick": quick}


def print_row(row: dict[str, Any], names: list[str], flush: bool = False) -> None:
    cells = "  ".join(f"{n} r0 {row[n]['r0']:+.3f} best {row[n]['r_best']:+.3f} @{row[n]['lag_ms']:+d}ms"
                      for n in names)
    print(f"{row['clip']:24s} {row['seconds']:6.1f}s  {cells}  ({row['wall_s']:.0f} s)", flush=flush)


def print_table(res: dict[str, Any]) -> None:
    names = ["envelope", *res["modes"]]
    print(f"\n{'clip':24s} {'frames':>6s}" + "".join(f"{n + ' r0':>14s}{n + ' best(lag)':>22s}"
                                                   for n in names))
    for row in res["clips"]:
        print(f"{row['clip']:24s} {row['real_frames']:6d}" + "".join(
            f"{row[n]['r0']:14.3f}{row[n]['r_best']:14.3f} ({row[n]['lag_ms']:+4d} ms)" for n in names))
    m = res["mean"]
    print(f"{'mean (frame-weighted)':24s} {'':6s}" + "".join(
        f"{m[n]['r0']:14.3f}{m[n]['r_best']:14.3f}{'':9s}" for n in names))
    if res["quick"]:
        print("(--quick: avatar = the motion's inner-lip gap, not FaceMesh on rendered frames)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("videos", nargs="+", type=Path, help="talking-head videos with their speech")
    ap.add_argument("--portrait", type=Path, default=ROOT / "avatars" / "default.png")
    ap.add_argument("--modes", default="offline,live", help="comma list of offline, live")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. motion.generator=procedural (repeatable)")
    ap.add_argument("--quick", action="store_true",
                    help="development proxy: motion-space lip gap instead of rendered FaceMesh")
    ap.add_argument("--no-cache", action="store_true", help="re-run FaceMesh on the real videos")
    ap.add_argument("--no-recognizer", action="store_true",
                    help="offline: audio-only lip-sync (no pocketsphinx phones)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("GLOG_minloglevel", "2")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("offline", "live"):
            ap.error(f"--modes: {m!r} is not offline or live")
    if not args.portrait.is_file():
        ap.error(f"--portrait {args.portrait}: no such file")
    t0 = time.monotonic()
    res = evaluate(args.videos, args.portrait, modes, args.set, args.quick, not args.no_cache,
                   args.no_recognizer)
    print_table(res)
    print(f"({time.monotonic() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from avatar_agent.quiet import native_log_filter

    with native_log_filter():            # mediapipe/TFLite info lines off the terminal
        raise SystemExit(main())
