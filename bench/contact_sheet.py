"""Render the embedded avatar's contact sheet (PNG) and a short talking mp4 with audio.

Rows: frames across a spoken sentence (viseme lip-sync from espeak-ng phonemes), a blink, and the
eight emotion presets at full intensity.  Usage:

    python bench/contact_sheet.py [--image PORTRAIT] [--out docs/contact_sheet.png] [--mp4 out.mp4]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import cv2
import numpy as np

from avatar_agent.audio.tts import synthesize
from avatar_agent.config import DEFAULT_AVATAR, load_config
from avatar_agent.face.landmarks import load_image
from avatar_agent.motion.emotion import emotion_offsets
from avatar_agent.motion.procedural import ProceduralMotion
from avatar_agent.motion.space import EXP, eye_opening, lip_opening
from avatar_agent.render.warp import WarpRenderer
from avatar_agent.types import EMOTIONS

TEXT = "Hello! I am the embedded avatar. Watch my lips move while I speak."
TILE = 192


def _label(img: np.ndarray, text: str) -> np.ndarray:
    out = cv2.resize(img, (TILE, TILE), interpolation=cv2.INTER_AREA).copy()
    cv2.rectangle(out, (0, TILE - 18), (TILE, TILE), (0, 0, 0), -1)
    cv2.putText(out, text, (4, TILE - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1,
                cv2.LINE_AA)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default=str(DEFAULT_AVATAR))
    ap.add_argument("--out", default="docs/contact_sheet.png")
    ap.add_argument("--mp4", default="", help="also render this mp4 with audio")
    args = ap.parse_args()

    renderer = WarpRenderer(size=512)
    avatar = renderer.prepare(load_image(args.image))
    gen = ProceduralMotion(seed=1)
    gen.prepare(avatar)
    kp = avatar.kp_canonical

    utt = synthesize(TEXT)
    speech = gen.generate_utterance(utt.audio, utt.phonemes, seed=1)
    lip = lip_opening(speech, kp)
    picks = np.linspace(0, len(speech) - 1, 40).astype(int)
    picks = sorted(picks[np.argsort(-lip[picks])[:8]])          # open and closed moments
    row_speech = [_label(f, f"t={i / 25:.2f}s  open {lip[i]:.2f}")
                  for i, f in zip(picks, renderer.render(avatar, speech[picks]))]

    gen.prepare(avatar)
    idle = gen.idle(25 * 8, gen.rest_pose, 0.0)
    eye = eye_opening(idle, kp)
    k = int(np.argmin(eye))
    blink_idx = [max(0, min(len(idle) - 1, k + d)) for d in (-12, -3, -2, -1, 0, 1, 2, 4)]
    row_blink = [_label(f, f"blink {d:+d}") for d, f in
                 zip((-12, -3, -2, -1, 0, 1, 2, 4), renderer.render(avatar, idle[blink_idx]))]

    emo = np.repeat(gen.rest_pose[None], len(EMOTIONS), 0)
    for i, name in enumerate(EMOTIONS):
        emo[i, EXP] += emotion_offsets(name, 1.0, kp)
    row_emotion = [_label(f, name) for name, f in zip(EMOTIONS, renderer.render(avatar, emo))]

    sheet = np.concatenate([np.concatenate(r, 1) for r in (row_speech, row_blink, row_emotion)], 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out} ({sheet.shape[1]}×{sheet.shape[0]})")

    if args.mp4:
        from avatar_agent.offline import render_to_file

        t = time.perf_counter()
        stats = asyncio.run(render_to_file(load_config(None, [], use_default_path=False),
                                           Path(args.image), Path(args.mp4), text=TEXT))
        print(f"wrote {args.mp4}: {stats['delivered']} frames in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
