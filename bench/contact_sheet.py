"""Render the embedded avatar's contact sheet (PNG) and optionally a short talking mp4 with audio.

Three portraits (the bundled photo, a painting, a black-and-white photo; see bench/portraits.py),
two rows each: six visemes of a spoken sentence (the procedural lip-sync driven by espeak-ng's
phonemes, each tile labelled with its phoneme) and a blink; then the eight emotion presets at full
intensity.  Usage:

    python bench/contact_sheet.py [--out docs/contact_sheet.png] [--mp4 out.mp4]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from portraits import portraits  # noqa: E402

from avatar_agent.audio.tts import synthesize  # noqa: E402
from avatar_agent.config import DEFAULT_AVATAR, load_config  # noqa: E402
from avatar_agent.motion.emotion import emotion_offsets  # noqa: E402
from avatar_agent.motion.procedural import ProceduralMotion  # noqa: E402
from avatar_agent.motion.space import EXP, eye_opening  # noqa: E402
from avatar_agent.render.warp import WarpRenderer  # noqa: E402
from avatar_agent.types import EMOTIONS  # noqa: E402

TEXT = "Hello! I am the embedded avatar. Watch my lips move while I speak."
TILE = 160
VISEMES = {"oʊ": "hellO", "m": "aM", "æ": "Avatar", "v": "aVatar", "uː": "mOve", "iː": "spEAk"}
"""Phonemes of TEXT shown in the speech row (rounded, closed, open, lip on teeth, rounded, spread)
and their ASCII labels (OpenCV's font has no IPA)."""
SHEET = (("photo", "photo"), ("painting", "painting"), ("hopper-gray", "b&w"))


def _label(img: np.ndarray, text: str) -> np.ndarray:
    # the face fills the middle of the crop: show that part
    s = img.shape[0]
    face = img[int(0.14 * s): int(0.86 * s), int(0.14 * s): int(0.86 * s)]
    out = cv2.resize(face, (TILE, TILE), interpolation=cv2.INTER_AREA).copy()
    cv2.rectangle(out, (0, TILE - 16), (TILE, TILE), (0, 0, 0), -1)
    cv2.putText(out, text, (3, TILE - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1,
                cv2.LINE_AA)
    return out


def rows_for(image: np.ndarray, name: str, renderer: WarpRenderer, utt) -> list[list[np.ndarray]]:
    """[speech + blink row, emotion row] of tiles for one portrait."""
    avatar = renderer.prepare(image)
    gen = ProceduralMotion(seed=1)
    gen.prepare(avatar)
    kp = avatar.kp_canonical
    speech = gen.generate_utterance(utt.audio, utt.phonemes, seed=1)
    # visemes: the middle of one phoneme of each kind (open, rounded, spread, closed lips, lip
    # on teeth), in the order spoken
    picks: list[tuple[int, str]] = []
    for sym in VISEMES:
        p = next(p for p in utt.phonemes if p.symbol == sym)
        picks.append((min(len(speech) - 1, int((p.start + p.end) / 2 * 25)), sym))
    picks.sort()
    idx = [i for i, _ in picks]
    row1 = [_label(f, f"{name}: {VISEMES[sym]}") for (_, sym), f in
            zip(picks, renderer.render(avatar, speech[idx]), strict=True)]
    gen.prepare(avatar)
    idle = gen.idle(25 * 8, gen.rest_pose, 0.0)
    k = int(np.argmin(eye_opening(idle, kp)))
    row1 += [_label(f, t) for f, t in zip(renderer.render(avatar, idle[[max(0, k - 6), k]]),
                                          ("blink: open", "blink: shut"), strict=True)]
    rest = gen.rest_pose
    emo = np.repeat(rest[None], len(EMOTIONS), 0)
    for i, e in enumerate(EMOTIONS):
        emo[i, EXP] += emotion_offsets(e, 1.0, kp, rest)
    row2 = [_label(f, e) for e, f in zip(EMOTIONS, renderer.render(avatar, emo), strict=True)]
    return [row1, row2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/contact_sheet.png")
    ap.add_argument("--mp4", default="", help="also render this mp4 of the bundled portrait")
    args = ap.parse_args()

    renderer = WarpRenderer(size=512)
    imgs = portraits()
    utt = synthesize(TEXT)
    rows: list[list[np.ndarray]] = []
    for key, name in SHEET:
        rows += rows_for(imgs[key], name, renderer, utt)
    sheet = np.concatenate([np.concatenate(r, 1) for r in rows], 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out} ({sheet.shape[1]}×{sheet.shape[0]})")

    if args.mp4:
        from avatar_agent.offline import render_to_file

        t = time.perf_counter()
        stats = asyncio.run(render_to_file(load_config(None, [], use_default_path=False),
                                           Path(DEFAULT_AVATAR), Path(args.mp4), text=TEXT))
        print(f"wrote {args.mp4}: {stats['delivered']} frames in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    from avatar_agent.quiet import native_log_filter

    with native_log_filter():            # mediapipe/TFLite info lines off the terminal
        main()
