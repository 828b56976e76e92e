"""Blinks an independent tracker counts on rendered frames (issue 12, item 5).

For each portrait: 60 s of espeak-ng speech with pauses drives a motion generator — the default
embedded one (``wiring.make_motion`` on the default config: the tiny MoDA for speech, the idle
layer for silence; fed live-like 160 ms chunks with the VAD decision taken from the TTS timing)
or ``--generator procedural`` (offline, one utterance) — frames are rendered at 256², tracked with
FaceMesh, and blinks are counted as dips of the eye opening below 55 % of its median.  Prints
blinks per minute as made (motion) and as seen (tracker).  Target: 10–25 per minute on every
portrait.

    python bench/blink_check.py [--seconds 60] [--portraits photo,painting,hopper-gray]
                                [--generator default|procedural]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from portraits import portraits  # noqa: E402

from avatar_agent.audio.tts import synthesize  # noqa: E402
from avatar_agent.face import measure  # noqa: E402
from avatar_agent.motion.procedural import ProceduralMotion  # noqa: E402
from avatar_agent.motion.space import eye_opening  # noqa: E402
from avatar_agent.render.warp import WarpRenderer  # noqa: E402
from avatar_agent.types import SAMPLE_RATE, Phoneme  # noqa: E402

SENTENCES = ("The weather today is mild, with a light breeze from the west.",
             "I would like to tell you a little about how this avatar works.",
             "Every frame is rendered from one photograph on the processor.",
             "Please ask me anything, and I will do my best to answer.")


def speech(seconds: float) -> tuple[np.ndarray, list[Phoneme]]:
    """Sentences with 0.8 s pauses, repeated to ``seconds``."""
    audio, phon, t, i = [], [], 0.0, 0
    while t < seconds:
        u = synthesize(SENTENCES[i % len(SENTENCES)])
        phon += [Phoneme(p.symbol, p.start + t, p.end + t) for p in u.phonemes]
        pause = np.zeros(int(0.8 * SAMPLE_RATE), np.float32)
        audio += [u.audio, pause]
        t += (len(u.audio) + len(pause)) / SAMPLE_RATE
        i += 1
    a = np.concatenate(audio)[: int(seconds * SAMPLE_RATE)]
    return a, [p for p in phon if p.end <= seconds]


def default_motion(avatar, audio: np.ndarray, phon: list[Phoneme]) -> np.ndarray:
    """The default generator over ``audio`` in 160 ms chunks (speech where the TTS spoke)."""
    import torch

    from avatar_agent.config import load_config
    from avatar_agent.types import SpeechChunk
    from avatar_agent.wiring import make_motion

    torch.set_num_threads(1)
    g = make_motion(load_config(None, [], use_default_path=False))
    g.prepare(avatar)
    hop, left, right = 2560, 4800, 640
    pad = np.concatenate([np.zeros(left, np.float32), audio, np.zeros(right + hop, np.float32)])
    voiced = np.zeros(len(audio) // hop + 1, bool)
    for p in phon:
        voiced[int(p.start * SAMPLE_RATE) // hop: int(p.end * SAMPLE_RATE) // hop + 1] = True
    out, prev = [], g.rest_pose
    for k, s in enumerate(range(0, len(audio) - hop + 1, hop)):
        if voiced[k]:
            chunk = SpeechChunk(pad[s: s + left + hop + right], s, hop, left, right, speech=True,
                                phonemes=tuple(phon))
            m = g.generate(chunk, prev, 5, 1.0)
        else:
            m = g.idle(hop // 640, prev, s / SAMPLE_RATE)
        out.append(m)
        prev = m[-1]
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--portraits", default="photo,painting,hopper-gray")
    ap.add_argument("--generator", choices=("default", "procedural"), default="default")
    args = ap.parse_args()
    audio, phon = speech(args.seconds)
    r = WarpRenderer(size=256)
    imgs = portraits()
    print(f"generator: {args.generator}, {args.seconds:.0f} s of speech with pauses")
    print(f"{'portrait':12s} {'made/min':>8s} {'seen/min':>8s} {'lost':>5s}")
    for name in args.portraits.split(","):
        av = r.prepare(imgs[name])
        if args.generator == "procedural":
            g = ProceduralMotion(seed=0)
            g.prepare(av)
            m = g.generate_utterance(audio, phon, seed=0)
        else:
            m = default_motion(av, audio, phon)
        made = measure.count_blinks(eye_opening(m, av.kp_canonical), threshold=0.5)
        opening, lost = [], 0
        for i in range(0, len(m), 50):
            for f in r.render(av, m[i:i + 50]):
                p = measure.track(f)
                lost += p is None
                opening.append(np.nan if p is None else measure.eye_opening(p))
        seen = measure.count_blinks(np.array(opening))
        per_min = 60.0 / args.seconds
        print(f"{name:12s} {made * per_min:8.1f} {seen * per_min:8.1f} {lost:5d}")


if __name__ == "__main__":
    from avatar_agent.quiet import native_log_filter

    with native_log_filter():            # mediapipe/TFLite info lines off the terminal
        main()
