"""CPU speed of the MoDA motion generator pieces; prints figures (no asserts).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_moda.py [--threads 2] [--skip-release] [--no-segment]

Figures: release DiT ms per forward (batch 1 and CFG batch 2, 80 frames), ms per 80-frame segment
(10 Euler steps × one CFG batch-2 forward), HuBERT-base ms per second of audio, and the tiny preset's
real-time factor in the streaming generator (stand-in [T, 1, 80] features, so feature time is
excluded).  Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from avatar_agent.motion.moda import MoDAMotion
from avatar_agent.nn.hubert import HubertFeatures, build_hubert
from avatar_agent.nn.moda import PRESETS, MoDADiT
from avatar_agent.nn.sampling import Conditions, Guidance, sample
from avatar_agent.types import Avatar, SpeechChunk


def timed(fn, repeat: int, warmup: bool = True) -> float:  # noqa: ANN001
    """Median wall time of fn() in ms (after one warm-up call)."""
    if warmup:
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * float(np.median(ts))


@torch.inference_mode()
def bench_release(repeat: int, segment: bool) -> None:
    p = PRESETS["release"]
    torch.manual_seed(0)
    model = MoDADiT(p).eval()
    n = p.seq_len

    def forward(b: int) -> None:
        model(torch.randn(b, n, 140), torch.full((b,), 500.0), torch.randn(b, n, 1, 12, 768),
              torch.full((b,), 8), torch.randn(b, 63))

    print(f"release DiT forward, batch 1: {timed(lambda: forward(1), repeat):8.0f} ms")
    print(f"release DiT forward, batch 2 (CFG): {timed(lambda: forward(2), repeat):8.0f} ms")
    if not segment:
        return
    cond = Conditions(prev=torch.randn(1, 1, 70), audio=torch.randn(1, n, 1, 12, 768),
                      emotion=torch.tensor([8]), identity=torch.randn(1, 63),
                      null_audio=torch.randn(1, 1, 1, 1, 768))
    seg = timed(lambda: sample(model, cond, torch.randn(1, n, 70), Guidance.release(1.2), 10), 1, warmup=False)
    print(f"release 80-frame segment (10 steps, CFG batch 2): {seg:8.0f} ms  "
          f"(= {seg / 64 / 40:.2f}× real time at stride 64, 25 fps)")


@torch.inference_mode()
def bench_hubert(seconds: float, repeat: int) -> None:
    torch.manual_seed(0)
    feats = HubertFeatures(build_hubert())
    audio = (0.1 * np.random.default_rng(0).standard_normal(int(16000 * seconds))).astype(np.float32)
    ms = timed(lambda: feats(audio), repeat)
    print(f"HuBERT-base features: {ms / seconds:8.0f} ms per second of audio ({seconds:.0f} s clip)")


def bench_tiny(seconds: float, hop_frames: int) -> None:
    p = PRESETS["tiny"]
    torch.manual_seed(0)
    model = MoDADiT(p).eval()

    def features(audio: np.ndarray) -> np.ndarray:
        return np.zeros((audio.size // 640, 1, p.audio_dim), np.float32)       # stand-in mel shape

    mean, std = np.zeros(70, np.float32), np.ones(70, np.float32)
    gen = MoDAMotion(model, features, mean, std, profile="embedded", hop=hop_frames)
    rest = np.zeros(70, np.float32)
    rest[63] = 1.0
    gen.prepare(Avatar(profile="embedded", image=np.zeros((4, 4, 3), np.uint8),
                       crop=np.zeros((4, 4, 3), np.uint8), crop_to_image=np.eye(3),
                       kp_canonical=np.zeros((21, 3), np.float32), rest_motion=rest))
    n_hops = int(seconds * 25 / hop_frames)
    prev = rest
    gen.generate(SpeechChunk(np.zeros(640 * hop_frames, np.float32), 0, 640 * hop_frames, 0, 0, True), prev)
    t0 = time.perf_counter()
    for _ in range(n_hops):
        c = SpeechChunk(np.zeros(640 * (hop_frames + 5), np.float32), 0, 640 * hop_frames, 0, 640 * 5, True)
        prev = gen.generate(c, prev)[-1]
    dt = time.perf_counter() - t0
    audio_s = n_hops * hop_frames / 25
    print(f"tiny preset ({sum(q.numel() for q in model.parameters()) / 1e6:.2f} M params, window "
          f"{p.seq_len}, hop {hop_frames}, 10 steps, CFG): RTF {dt / audio_s:.3f} "
          f"({1000 * dt / n_hops:.0f} ms per {hop_frames}-frame hop)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-release", action="store_true")
    ap.add_argument("--skip-hubert", action="store_true")
    ap.add_argument("--hop", type=int, default=24, help="tiny streaming hop in frames (window 40)")
    ap.add_argument("--no-segment", action="store_true", help="skip the 10-step segment timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU")
    if not args.skip_release:
        bench_release(args.repeat, not args.no_segment)
    if not args.skip_hubert:
        bench_hubert(5.0, args.repeat)
    bench_tiny(8.0, args.hop)


if __name__ == "__main__":
    main()
