"""Emotion presets as a face tracker sees them on rendered frames (issue 12, item 2).

For each portrait (bench/portraits.py): render the rest pose in silence with each of the 8
emotions, track every frame with FaceMesh and print, relative to the "neutral" render and as % of
the inter-ocular distance (IOD), after removing head motion: the mean motion of the 40 expression
landmarks (avatar_agent.face.measure), the motion of each region (brows, lid midpoints, lip
corners: mean of the region's more-moved half of landmarks), the emotion's defining region(s),
the closest other emotion, and the 40-landmark mean at intensity 0.5 (relative to "neutral" at
0.5: intensity blends from the portrait's own expression to the full preset on its relaxed
face).  Targets: defining region ≥ 6 %, 40-landmark mean ≥ 3 %, any two emotions ≥ 2 % apart.

With ``--speech`` it also checks that speech keeps the emotion: the default embedded generator
(``avatar_agent.wiring.make_motion`` on the default config) speaks a sentence in live-like 160 ms
chunks after 1 s of silence, once per emotion; brows and lip corners are compared with the
neutral run's frame at the same time, in silence and while speaking.

    python bench/emotion_check.py [--portraits photo,photo-gray,statue,photo-painting,painting,hopper-gray]
                                  [--speech]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
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


def flow_regions(frame: np.ndarray, ref_frame: np.ndarray, ref_points: np.ndarray
                 ) -> dict[str, float]:
    """Image motion from ``ref_frame`` to ``frame`` (Farneback optical flow) at ``ref_points``'
    landmarks of each region: mean of the region's more-moved half, as a fraction of the IOD."""
    a = cv2.cvtColor(ref_frame, cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    # (4 pyramid levels, 21 px windows: brows move 10-15 px at 512² and must not be smoothed away)
    flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, 21, 5, 7, 1.5, 0)
    scale = measure.iod(ref_points)
    out = {}
    for region, idx in measure.REGIONS.items():
        p = np.clip(np.round(ref_points[list(idx)]).astype(int), 0, a.shape[0] - 1)
        d = np.linalg.norm(flow[p[:, 1], p[:, 0]], axis=1) / scale
        out[region] = float(np.sort(d)[len(idx) // 2:].mean())
    return out


def check_portrait(name: str, image: np.ndarray, renderer: WarpRenderer) -> dict:
    """Figures of one portrait: {emotion: {mean, regions, closest, mean_half}}."""
    avatar = renderer.prepare(image)
    gen = ProceduralMotion()
    gen.prepare(avatar)
    res: dict = {}
    pts, full = {}, {}
    for intensity in (1.0, 0.5):
        frames = renderer.render(avatar, emotion_motion(gen, avatar.kp_canonical, intensity))
        pts[intensity] = {e: measure.track(f) for e, f in zip(EMOTIONS, frames, strict=True)}
        if intensity == 1.0:
            full = dict(zip(EMOTIONS, frames, strict=True))
    ref = pts[1.0]["neutral"]
    for e in EMOTIONS:
        if e == "neutral":
            continue
        ch = measure.expression_change(pts[1.0][e], ref)
        half = measure.expression_change(pts[0.5][e], pts[0.5]["neutral"])
        others = [(measure.expression_distance(pts[1.0][e], pts[1.0][o], ref), o)
                  for o in EMOTIONS if o != e]
        flow = flow_regions(full[e], full["neutral"], ref)
        res[e] = {"mean": ch.mean, "regions": ch.regions, "closest": min(others),
                  "mean_half": half.mean,
                  "defining": min(ch.regions[r] for r in DEFINING[e]),
                  "flow": flow, "flow_defining": min(flow[r] for r in DEFINING[e])}
    return res


def speech_check(image: np.ndarray, renderer: WarpRenderer) -> None:
    """Brows and corners vs the neutral run, in silence and in speech, per emotion."""
    import torch

    from avatar_agent.audio.tts import synthesize
    from avatar_agent.config import load_config
    from avatar_agent.motion.emotion import emotion_label
    from avatar_agent.types import Phoneme, SpeechChunk
    from avatar_agent.wiring import make_motion

    torch.set_num_threads(1)
    cfg = load_config(None, [], use_default_path=False)
    avatar = renderer.prepare(image)
    u = synthesize("Hello there, I am speaking to you with a lot of feeling today.")
    audio = np.concatenate([np.zeros(8000, np.float32), u.audio, np.zeros(16000, np.float32)])
    phon = tuple(Phoneme(p.symbol, p.start + 0.5, p.end + 0.5) for p in u.phonemes)
    hop, left, right = 2560, 4800, 640
    pad = np.concatenate([np.zeros(left, np.float32), audio, np.zeros(right + hop, np.float32)])

    def run(emotion: str) -> list:
        g = make_motion(cfg)
        g.prepare(avatar)
        label = emotion_label(emotion)
        g.set_emotion(label, 1.0)
        out = [g.idle(25, g.rest_pose, 0.0)]
        for s in range(0, len(audio) - hop, hop):
            chunk = SpeechChunk(pad[s: s + left + hop + right], s, hop, left, right, speech=True,
                                phonemes=phon)
            out.append(g.generate(chunk, out[-1][-1], label, 1.0))
        m = np.concatenate(out)
        idx = list(range(5, 25, 5)) + list(range(40, len(m), 12))   # 4 silent, then speech
        return [measure.track(f) for f in renderer.render(avatar, m[idx])]

    print(f"\nspeech keeps the emotion ({type(make_motion(cfg)).__name__}): % IOD vs neutral")
    neutral = run("neutral")
    for e in ("surprise", "sadness", "anger", "happiness", "disgust"):
        pts = run(e)
        ch = [measure.expression_change(p, n).regions for p, n in zip(pts, neutral, strict=True)]

        def avg(rows: list, key: str) -> float:
            return 100 * float(np.mean([r[key] for r in rows]))

        print(f"{e:10s} silence: brows {avg(ch[:4], 'brows'):5.2f} corners "
              f"{avg(ch[:4], 'corners'):5.2f} | speech: brows {avg(ch[4:], 'brows'):5.2f} "
              f"corners {avg(ch[4:], 'corners'):5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--portraits",
                    default="photo,photo-gray,statue,photo-painting,painting,hopper-gray")
    ap.add_argument("--speech", action="store_true", help="also check emotion while speaking")
    args = ap.parse_args()
    renderer = WarpRenderer(size=512)
    imgs = portraits()
    worst = {"defining": 1.0, "mean": 1.0, "closest": 1.0}
    for name in args.portraits.split(","):
        res = check_portrait(name, imgs[name], renderer)
        print(f"\n{name}: % IOD vs the neutral render (intensity 1; mean at 0.5 in brackets)")
        print(f"{'emotion':10s} {'mean40':>13s} {'brows':>6s} {'lids':>6s} {'corners':>7s} "
              f"{'defining':>8s}  {'closest':14s} flow: {'brows':>5s} {'corners':>7s} "
              f"{'defining':>8s}")
        for e, r in res.items():
            g = r["regions"]
            print(f"{e:10s} {100 * r['mean']:5.2f} ({100 * r['mean_half']:4.2f}) "
                  f"{100 * g['brows']:6.2f} {100 * g['lids']:6.2f} {100 * g['corners']:7.2f} "
                  f"{100 * r['defining']:8.2f}  {r['closest'][1]:9s} {100 * r['closest'][0]:4.2f}"
                  f"       {100 * r['flow']['brows']:5.2f} {100 * r['flow']['corners']:7.2f} "
                  f"{100 * r['flow_defining']:8.2f}")
            worst["defining"] = min(worst["defining"], r["defining"])
            worst["mean"] = min(worst["mean"], r["mean"])
            worst["closest"] = min(worst["closest"], r["closest"][0])
        print(f"worst on {name}: defining {100 * min(r['defining'] for r in res.values()):.2f}, "
              f"mean40 {100 * min(r['mean'] for r in res.values()):.2f}, closest pair "
              f"{100 * min(r['closest'][0] for r in res.values()):.2f}")
    print(f"\nworst over portraits: defining region {100 * worst['defining']:.2f} % (target ≥ 6), "
          f"40-landmark mean {100 * worst['mean']:.2f} % (≥ 3), closest pair "
          f"{100 * worst['closest']:.2f} % (≥ 2)")
    if args.speech:
        speech_check(imgs["photo"], renderer)


if __name__ == "__main__":
    from avatar_agent.quiet import native_log_filter

    with native_log_filter():            # mediapipe/TFLite info lines off the terminal
        main()
