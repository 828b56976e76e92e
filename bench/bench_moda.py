"""CPU speed of the MoDA motion generator pieces; prints figures (no asserts).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_moda.py [--threads 2] [--skip-release] [--no-segment]

Figures: release DiT ms per forward (batch 1 and CFG batch 2, 80 frames), ms per 80-frame segment
(10 Euler steps × one CFG batch-2 forward), HuBERT-base ms per second of audio (random weights:
speed does not depend on them), and the shipped tiny MoDA's motion real-time factor through the
deployed ``MoDAMotion`` with its own inference settings, log-mel features included: live (160 ms
chunks) and offline (one chunk): eager, traced, and on ONNX Runtime when the model's .onnx
export is there (the default runtime then).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from avatar_agent.nn.hubert import HubertFeatures, build_hubert
from avatar_agent.nn.moda import PRESETS, MoDADiT
from avatar_agent.nn.sampling import Conditions, Guidance, sample
from avatar_agent.types import SpeechChunk
from avatar_agent.wiring import EMBEDDED_MODA


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


def bench_tiny(seconds: float, model_path: Path) -> None:
    """Motion RTF of the embedded tiny MoDA through the deployed ``MoDAMotion``, features included.

    Live: 160 ms chunks (4 new frames, 400 ms left context, 40 ms lookahead; the model's own
    steps/CFG), eager, traced and on ONNX Runtime.  Offline: the whole clip as one chunk (``avatar-agent render``).
    """
    from avatar_agent.motion.template import template_avatar
    from avatar_agent.motion.moda_load import build_motion

    if not model_path.with_suffix(".json").is_file():
        print(f"tiny MoDA: no exported model at {model_path} (bench/train_tiny.sh); skipped")
        return
    avatar = template_avatar()
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
    n = audio.size // 640
    runs: list[tuple[str, Literal["torch", "onnx"], bool]] = [("eager ", "torch", False),
                                                              ("traced", "torch", True)]
    if model_path.with_suffix(".onnx").is_file():
        runs.append(("onnx  ", "onnx", True))
    n_par = 0
    for label, runtime, trace in runs:
        gen = build_motion(model_path, trace=trace, runtime=runtime)
        if isinstance(gen.model, MoDADiT):          # the ONNX runner has no torch parameters
            n_par = sum(int(q.numel()) for q in gen.model.parameters())
        gen.prepare(avatar)
        hop, left, look = gen.min_hop_ms // 40, 10, 1
        padded = np.concatenate([np.zeros(640 * left, np.float32), audio, np.zeros(640 * (hop + look), np.float32)])

        def live() -> None:
            prev = avatar.rest_motion
            for f0 in range(0, n - hop + 1, hop):
                a = padded[f0 * 640 : (f0 + left + hop + look) * 640]
                prev = gen.generate(SpeechChunk(a, f0 * 640, hop * 640, left * 640, look * 640, True), prev)[-1]

        def offline() -> None:
            gen.generate(SpeechChunk(audio, 0, n * 640, 0, 0, True), avatar.rest_motion)

        live()                                                                   # warm-up / traces
        offline()
        for name, fn in (("live", live), ("offline", offline)):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            what = f"{hop * 40} ms chunks" if name == "live" else "one chunk"
            print(f"tiny MoDA {name:7s} ({label}, {what}, {gen.steps} steps, "
                  f"CFG audio {gen.guidance.audio:g}, window {gen.window}, features incl.): "
                  f"RTF {dt / seconds:.4f}")
    print(f"tiny MoDA: {n_par / 1e6:.2f} M parameters")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-release", action="store_true")
    ap.add_argument("--skip-hubert", action="store_true")
    ap.add_argument("--tiny", type=Path, default=EMBEDDED_MODA, help="exported tiny MoDA")
    ap.add_argument("--no-segment", action="store_true", help="skip the 10-step segment timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU")
    if not args.skip_release:
        bench_release(args.repeat, not args.no_segment)
    if not args.skip_hubert:
        bench_hubert(5.0, args.repeat)
    bench_tiny(20.0, args.tiny)


if __name__ == "__main__":
    main()
