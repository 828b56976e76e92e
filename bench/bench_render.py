"""Embedded warp renderer speed: landmarks, prepare, and render fps at 256 and 512.

Single-threaded (cv2.setNumThreads(1), torch 1 thread, OMP_NUM_THREADS=1) on this CPU, with
a realistic motion: head sway + speech-like jaw + occasional blink, so the mouth-cavity and lid
overlays run on part of the frames as in a live stream.

    OMP_NUM_THREADS=1 python bench/bench_render.py [--frames 200] [--image avatars/default.png]

On a shared machine the figures drift by ±10 % with the load; to compare with an earlier
revision, unpack it and run the two alternately:

    git archive REV avatar_agent bench avatars | tar -x -C /tmp/base
    (cd /tmp/base && PYTHONPATH=/tmp/base OMP_NUM_THREADS=1 python bench/bench_render.py)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402


def _motions(avatar, n: int) -> np.ndarray:
    from avatar_agent.motion import space

    t = np.arange(n) / 25.0
    m = np.repeat(avatar.rest_motion.astype(np.float64)[None], n, 0)
    m[:, space.YAW] += 8 * np.sin(2 * np.pi * 0.3 * t)
    m[:, space.PITCH] += 4 * np.sin(2 * np.pi * 0.21 * t)
    m[:, space.ROLL] += 3 * np.sin(2 * np.pi * 0.17 * t)
    jaw = 0.04 * (1 + np.sin(2 * np.pi * 3.1 * t))                   # 0 … 0.08: talking
    m[:, space.EXP] = 0.0
    for name, f in (("lower_lip_inner", 1.0), ("lower_lip_outer", 1.0), ("lower_lip_outer_l", 1.0),
                    ("lower_lip_outer_r", 1.0), ("chin", 0.9), ("jaw_l", 0.5), ("jaw_r", 0.5)):
        m[:, space.exp_index(space.KP[name], 1)] += f * jaw
    blink = (t % 3.0) < 0.2
    kc = avatar.kp_canonical
    for up, lo in (("upper_lid_l", "lower_lid_l"), ("upper_lid_r", "lower_lid_r")):
        gap = kc[space.KP[lo], 1] - kc[space.KP[up], 1]
        m[blink, space.exp_index(space.KP[up], 1)] += 0.9 * gap
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "avatars" / "default.png"))
    args = ap.parse_args()

    cv2.setNumThreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    from avatar_agent.face.landmarks import FaceAnalyzer, detect_landmarks, load_image
    from avatar_agent.render.warp import WarpRenderer

    img = load_image(args.image)
    t0 = time.perf_counter()
    analyzer = FaceAnalyzer()
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    detect_landmarks(img, analyzer)
    t_first = time.perf_counter() - t0
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        detect_landmarks(img, analyzer)
    t_lm = (time.perf_counter() - t0) / reps
    print(f"image {img.shape[1]}x{img.shape[0]}  mediapipe graph build {t_build * 1e3:.0f} ms, "
          f"first landmarks {t_first * 1e3:.0f} ms, then {t_lm * 1e3:.1f} ms/image")

    for size in (256, 512):
        r = WarpRenderer(size=size, analyzer=analyzer)
        t0 = time.perf_counter()
        av = r.prepare(img)
        t_prep = time.perf_counter() - t0
        motions = _motions(av, args.frames)
        r.render(av, motions[:5])                                      # warm-up
        times, cpu = [], []
        for m in motions:
            t0, c0 = time.perf_counter(), time.process_time()
            r.render(av, m[None])
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        times_ms = np.array(times) * 1e3
        cpu_ms = np.array(cpu) * 1e3
        t0 = time.perf_counter()
        nb = min(50, len(motions))                     # (--frames below 50: a shorter batch)
        r.render(av, motions[:nb])
        t_batch = (time.perf_counter() - t0) / nb
        ri = WarpRenderer(size=size, output="image", analyzer=analyzer)
        t0 = time.perf_counter()
        ri.render(av, motions[:nb])
        t_img = (time.perf_counter() - t0) / nb
        print(f"size {size}: prepare {t_prep * 1e3:.0f} ms | render crop {1e3 / times_ms.mean():.0f} fps "
              f"(wall mean {times_ms.mean():.2f} ms, p50 {np.median(times_ms):.2f}, p95 "
              f"{np.percentile(times_ms, 95):.2f}, max {times_ms.max():.2f}; CPU mean "
              f"{cpu_ms.mean():.2f} ms = {1e3 / cpu_ms.mean():.0f} fps) | batch-{nb} "
              f"{1 / t_batch:.0f} fps | output=image {1 / t_img:.0f} fps")
    print("(wall figures include time the process waited for a core; on a shared machine the "
          "CPU-time figure is the better estimate of an idle core)")


if __name__ == "__main__":
    from avatar_agent.quiet import native_log_filter

    with native_log_filter():            # mediapipe/TFLite info lines off the terminal
        main()
