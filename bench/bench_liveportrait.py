"""Speed of the official-profile LivePortrait renderer on this machine (prints figures, no asserts).

Usage:
    python bench/bench_liveportrait.py [--weights DIR] [--batches 1 8 25] [--threads 2]
                                       [--repeat 1] [--onnx]

Without ``--weights`` the networks get synthetic recipe weights (same shapes and FLOPs as the
release; speed does not depend on the values).  Reports ms per frame for each module (F and M
run once per avatar, W/G/S per frame) and end to end (``render()`` = drive + stitching + W + G +
uint8), for each batch size.  ``--onnx`` also exports F, M and W+G (opset 20) and times them in
onnxruntime CPU, printing the max |ONNX − PyTorch| difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avatar_agent.nn.liveportrait.weights import build_modules, load_modules, load_state  # noqa: E402
from avatar_agent.nn.liveportrait.weights import official_manifest  # noqa: E402
from avatar_agent.render.liveportrait import LivePortraitRenderer  # noqa: E402


def recipe_filled() -> object:
    from tests.nn.liveportrait.recipe import recipe_state_dict

    mods = build_modules()
    for m in mods.all():
        load_state(m, recipe_state_dict([[k, list(s)] for k, s in official_manifest(m).items()]), "recipe")
    return mods


def timed(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--onnx", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    mods = load_modules(args.weights) if args.weights else recipe_filled()
    r = LivePortraitRenderer(mods, device="cpu")
    src = np.load(ROOT / "tests/fixtures/liveportrait/source.npz")["source_rgb_u8"]
    print(f"torch {torch.__version__}, threads {args.threads}, CPU float32, "
          f"weights {'recipe' if args.weights is None else args.weights}")

    x = torch.from_numpy(src).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        mods.appearance(x), mods.motion(x)                           # warm-up
        f_ms = timed(lambda: mods.appearance(x), args.repeat)
        m_ms = timed(lambda: mods.motion(x), args.repeat)
    print(f"per avatar: F {f_ms:.0f} ms, M {m_ms:.0f} ms, prepare() "
          f"{timed(lambda: r.prepare_crop(src), args.repeat):.0f} ms")
    av = r.prepare_crop(src)
    with torch.no_grad():                                            # warm-up W+G at batch 1
        r.render(av, av.rest_motion[None])

    rng = np.random.default_rng(0)
    print(f"{'batch':>5} {'S':>8} {'W':>8} {'G':>8} {'render':>8}   (ms per frame)")
    for b in args.batches:
        motion = np.repeat(av.rest_motion[None], b, 0)
        motion[:, 67:70] += rng.uniform(-10, 10, (b, 3)).astype(np.float32)
        x_d = r.driving_keypoints(av, motion)
        f_s = av.extra["f_s"].expand(b, -1, -1, -1, -1)
        x_s = av.extra["x_s"].expand(b, -1, -1)
        with torch.no_grad():
            s_ms = timed(lambda: mods.stitching.stitch(x_s, x_d), args.repeat)
            w_out = mods.warping(f_s, kp_driving=x_d, kp_source=x_s)["out"]
            w_ms = timed(lambda: mods.warping(f_s, kp_driving=x_d, kp_source=x_s), args.repeat)
            g_ms = timed(lambda: mods.spade(w_out), args.repeat)
        r.max_batch = b
        e_ms = timed(lambda: r.render(av, motion), args.repeat)
        print(f"{b:>5} {s_ms / b:>8.2f} {w_ms / b:>8.0f} {g_ms / b:>8.0f} {e_ms / b:>8.0f}", flush=True)

    if args.onnx:
        from avatar_agent.nn.liveportrait import export as E

        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            E.export_appearance(mods.appearance, Path(d) / "f.onnx")
            E.export_motion(mods.motion, Path(d) / "m.onnx")
            E.export_warp_decode(mods.warping, mods.spade, Path(d) / "wg.onnx")
            print(f"onnx export (F, M, W+G): {time.perf_counter() - t:.0f} s")
            sf, sm, sw = (E.onnx_session(Path(d) / n, threads=args.threads)
                          for n in ("f.onnx", "m.onnx", "wg.onnx"))
            x_d = r.driving_keypoints(av, av.rest_motion[None])
            feeds = {"feature_3d": av.extra["f_s"].numpy(), "kp_driving": x_d.numpy(),
                     "kp_source": av.extra["x_s"].numpy()}
            with torch.no_grad():
                ref_img = E.WarpDecode(mods.warping, mods.spade)(av.extra["f_s"], x_d, av.extra["x_s"])
                ref_f = mods.appearance(x)
            sw.run(None, feeds)
            ort_f = timed(lambda: sf.run(None, {"image": x.numpy()}), args.repeat)
            ort_m = timed(lambda: sm.run(None, {"image": x.numpy()}), args.repeat)
            ort_wg = timed(lambda: sw.run(None, feeds), args.repeat)
            dimg = np.abs(sw.run(None, feeds)[0] - ref_img.numpy()).max()
            df = np.abs(sf.run(None, {"image": x.numpy()})[0] - ref_f.numpy()).max()
            print(f"onnxruntime CPU batch 1: F {ort_f:.0f} ms, M {ort_m:.0f} ms, W+G {ort_wg:.0f} ms; "
                  f"max |ORT − torch|: f_s {df:.2e}, image {dimg:.2e}")


if __name__ == "__main__":
    main()
