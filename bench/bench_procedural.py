"""Cost of procedural motion per second of audio (ms), audio-only and with phonemes.

Usage:  OMP_NUM_THREADS=1 python bench/bench_procedural.py [--repeats 5]

Speech is real espeak-ng output (about 20 s).  "offline" is one generate_utterance call over the
whole audio; "stream" feeds 200 ms chunks (1280 samples left context, 640 lookahead) through
generate() as the agent does, which also pays the per-call overhead.  The figure is the median
over repeats; synthesis time is not included.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from avatar_agent.audio.tts import synthesize
from avatar_agent.motion.procedural import ProceduralMotion
from avatar_agent.motion.template import template_avatar
from avatar_agent.types import SAMPLE_RATE, SpeechChunk

TEXT = ("Procedural lip sync has to be cheap, because the renderer needs almost all of the two "
        "small processor cores. This paragraph is long enough to average out the noise of the "
        "measurement, and it contains rounded vowels, spread vowels, bilabial closures like "
        "maybe, baby and mum, and fricatives such as fish, vase, and thistle.")


def stream(gen: ProceduralMotion, audio: np.ndarray, phonemes, hop: int = 3200) -> np.ndarray:
    prev = gen.rest_pose
    out = []
    for start in range(0, len(audio) - hop + 1, hop):
        a, b = max(start - 1280, 0), min(start + hop + 640, len(audio))
        ph = tuple(p for p in phonemes if p.end > a / SAMPLE_RATE and p.start < b / SAMPLE_RATE)
        chunk = SpeechChunk(audio[a:b], start, hop, start - a, b - start - hop, True, ph)
        m = gen.generate(chunk, prev)
        prev = m[-1]
        out.append(m)
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    u = synthesize(TEXT)
    audio = u.audio[: len(u.audio) // 3200 * 3200]
    seconds = len(audio) / SAMPLE_RATE
    gen = ProceduralMotion()
    gen.prepare(template_avatar())
    print(f"audio: {seconds:.1f} s of espeak-ng speech, {len(u.phonemes)} phonemes")
    for label, ph in (("audio-only", ()), ("phonemes", u.phonemes)):
        for mode in ("offline", "stream"):
            times = []
            for _ in range(args.repeats):
                gen.reset()
                t = time.perf_counter()
                if mode == "offline":
                    gen.generate_utterance(audio, ph or None)
                else:
                    stream(gen, audio, ph)
                times.append(time.perf_counter() - t)
            ms = 1000 * statistics.median(times) / seconds
            print(f"{label:10s} {mode:7s}: {ms:6.2f} ms per second of audio "
                  f"(median of {args.repeats}, {1000 * min(times) / seconds:.2f} best)")


if __name__ == "__main__":
    from avatar_agent.quiet import native_log_filter

    with native_log_filter():            # mediapipe/TFLite info lines off the terminal
        main()
