#!/usr/bin/env python
"""Evaluate a trained embedded MoDA model against the procedural generators.

Usage (from the repo root)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/eval_moda_tiny.py \\
        --model models/embedded/moda-tiny.safetensors [--heldout 16] [--seeds 3] [--json out.json]

Compared generators (all on a template avatar, 25 fps):

* ``teacher``     ProceduralMotion with TTS phonemes (the training target; synthetic speech only);
* ``procedural``  ProceduralMotion from audio alone (what the embedded profile does without a model);
* ``moda``        the trained model through the deployed ``MoDAMotion`` with the whole clip as one
                  chunk (as ``avatar-agent render`` feeds it), only with ``--model``;
* ``moda-stream`` the same with live chunks: 160 ms hops, 40 ms lookahead, 400 ms left context,
                  each conditioned on the last emitted frame, as ``avatar-agent start`` runs it.

Material: held-out synthetic utterances (corpus seed ``--seed``, never used for training with the
default training seed 0) and real recorded speech shipped by Debian's alsa-utils
(/usr/share/sounds/alsa/*.wav, a woman saying "Front left" etc.; Noise.wav is skipped).

Metrics per clip (then averaged):

* ``r_env``: Pearson r between mouth opening (inner-lip gap) and the speech-band level in dB, at
  the best lag within ±80 ms (±2 frames); ``lag_ms`` that lag (positive: mouth after audio);
* ``closed_silent_%``: share of silent frames (level 35 dB under the clip's peak, or < −60 dBFS)
  whose mouth opening is below ``closed`` (0.01 canonical units ≈ 9 % of a wide-open mouth);
* ``jerk_lip``: mean |Δ²| of the mouth opening; ``jerk_pose``: mean |Δ²| of pitch/yaw/roll (deg);
* ``div_exp``: mean over frames of the std across seeds of the exp block (diversity);
* synthetic only: ``err_exp`` (RMSE of exp vs the teacher), ``err_lip`` (MAE of the opening),
  ``r_teacher`` (r between the opening and the teacher's).

Without ``--model`` only the procedural generators are evaluated (useful as the baseline and as
the metric self-check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avatar_agent.audio.features import frame_features  # noqa: E402
from avatar_agent.motion.space import EXP, POSE, lip_opening  # noqa: E402

FPS = 25
ALSA_DIR = Path("/usr/share/sounds/alsa")
Generator = Callable[[np.ndarray, object, int], np.ndarray]


# --------------------------------------------------------------------------------------------
# Metrics (pure functions)
# --------------------------------------------------------------------------------------------


def speech_level_db(audio: np.ndarray) -> np.ndarray:
    """Speech-band level in dBFS per 25 fps frame."""
    return frame_features(np.asarray(audio, np.float32), FPS).energy_db.astype(np.float64)


def silent_frames(level_db: np.ndarray, gate_db: float = 35.0, floor_dbfs: float = -60.0) -> np.ndarray:
    """Frames quieter than the peak − gate_db, or than floor_dbfs."""
    return (level_db < level_db.max() - gate_db) | (level_db < floor_dbfs)


def best_lag_corr(a: np.ndarray, b: np.ndarray, max_lag: int = 2) -> tuple[float, int]:
    """(max Pearson r, lag) of a[t + lag] vs b[t] over lags −max_lag..max_lag (a lags b if > 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(a.shape[0], b.shape[0])
    best = (-2.0, 0)
    for lag in range(-max_lag, max_lag + 1):
        x = a[max(lag, 0) : n + min(lag, 0)]
        y = b[max(-lag, 0) : n - max(lag, 0)]
        if x.shape[0] < 3 or x.std() < 1e-12 or y.std() < 1e-12:
            continue
        r = float(np.corrcoef(x, y)[0, 1])
        if r > best[0]:
            best = (r, lag)
    return (float("nan"), 0) if best[0] == -2.0 else best


def clip_metrics(motion: np.ndarray, audio: np.ndarray, kp: np.ndarray, closed: float = 0.01,
                 max_lag: int = 2) -> dict[str, float]:
    """Audio-sync and smoothness metrics of one clip (see the module docstring)."""
    level = speech_level_db(audio)
    n = min(level.shape[0], motion.shape[0])
    m, level = np.asarray(motion[:n], np.float64), level[:n]
    opening = lip_opening(m, kp)
    # Floor the level so digital silence (-100 dB) does not dominate the correlation.
    env = np.maximum(level, level.max() - 50.0)
    r, lag = best_lag_corr(opening, env, max_lag)
    sil = silent_frames(level)
    closed_pct = float(100.0 * np.mean(opening[sil] < closed)) if sil.any() else float("nan")
    return {"r_env": r, "lag_ms": 1000.0 * lag / FPS, "closed_silent_%": closed_pct,
            "jerk_lip": float(np.abs(np.diff(opening, 2)).mean()) if n > 2 else float("nan"),
            "jerk_pose": float(np.abs(np.diff(m[:, POSE], 2, axis=0)).mean()) if n > 2 else float("nan"),
            "open_max": float(opening.max())}


def diversity(motions: list[np.ndarray]) -> float:
    """Mean over frames and exp dims of the std across samples (different seeds)."""
    if len(motions) < 2:
        return float("nan")
    n = min(m.shape[0] for m in motions)
    stack = np.stack([np.asarray(m[:n], np.float64)[:, EXP] for m in motions])   # [S, T, 63]
    return float(stack.std(0).mean())


def teacher_error(motion: np.ndarray, target: np.ndarray, kp: np.ndarray) -> dict[str, float]:
    """Errors vs the teacher's motion: exp RMSE, lip-opening MAE, opening correlation."""
    n = min(motion.shape[0], target.shape[0])
    m, t = np.asarray(motion[:n], np.float64), np.asarray(target[:n], np.float64)
    om, ot = lip_opening(m, kp), lip_opening(t, kp)
    r = float(np.corrcoef(om, ot)[0, 1]) if om.std() > 1e-12 and ot.std() > 1e-12 else float("nan")
    return {"err_exp": float(np.sqrt(np.mean((m[:, EXP] - t[:, EXP]) ** 2))),
            "err_lip": float(np.abs(om - ot).mean()), "r_teacher": r}


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.nanmean([r.get(k, np.nan) for r in rows])) for k in keys}


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


def procedural(audio: np.ndarray, avatar, seed: int, phonemes=None, emotion: int = 8,
               intensity: float = 1.0) -> np.ndarray:
    """ProceduralMotion on a whole clip (audio-only unless phonemes are given)."""
    from avatar_agent.motion.procedural import ProceduralMotion

    g = ProceduralMotion(seed=seed)
    g.prepare(avatar)
    return g.generate_utterance(audio, phonemes, seed=seed, emotion=emotion, intensity=intensity)


def moda_generator(model_path: str | Path, cfg_audio: float | None = None, steps: int | None = None,
                   hop_frames: int | None = None, lookahead_frames: int = 1,
                   left_frames: int = 10) -> Generator:
    """``(audio, avatar, seed) -> raw motion [T, 70]`` through the deployed :class:`MoDAMotion`.

    ``hop_frames`` None = the whole clip as one chunk (``avatar-agent render``'s long chunks);
    else chunks of that many new frames with ``lookahead_frames`` of lookahead and
    ``left_frames`` of left context, as the live chunker cuts them (defaults: 4 = the model's
    160 ms hop, 40 ms lookahead, 400 ms context).  Steps and audio CFG default to the model's.
    """
    from avatar_agent.motion.procedural import ProceduralMotion
    from avatar_agent.motion.moda_load import build_motion
    from avatar_agent.types import SpeechChunk

    spf = 16000 // FPS

    def run(audio: np.ndarray, avatar, seed: int, emotion: int = 8) -> np.ndarray:
        gen = build_motion(model_path, steps=steps, cfg_audio=cfg_audio, seed=seed)
        pm = ProceduralMotion()
        pm.prepare(avatar)
        prev = pm.rest_pose                                     # mouth-closed rest = training prev
        gen.prepare(avatar, reference=prev)                     # as EmbeddedMoDA does
        n = audio.shape[0] // spf
        hop = hop_frames or n
        look = lookahead_frames if hop_frames else 0
        padded = np.concatenate([np.zeros(left_frames * spf, np.float32), audio[: n * spf],
                                 np.zeros((hop + look) * spf, np.float32)])
        out = []
        for f0 in range(0, n, hop):
            k = min(hop, n - f0)
            a = padded[f0 * spf : (f0 + left_frames + k + look) * spf]
            chunk = SpeechChunk(a, f0 * spf, k * spf, left_frames * spf, look * spf, True)
            m = gen.generate(chunk, prev, emotion)
            out.append(m)
            prev = m[-1]
        return np.concatenate(out)

    return run


class _Tap:
    """Wraps the agent's motion generator and keeps every frame's motion by frame index."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner, self.profile, self.fps = inner, inner.profile, inner.fps
        self.frames: dict[int, np.ndarray] = {}
        self.avatar = None

    def __getattr__(self, name: str):  # noqa: ANN204 - rest_pose, set_emotion, min_hop_ms, ...
        return getattr(self.inner, name)

    def prepare(self, avatar) -> None:  # noqa: ANN001
        self.avatar = avatar
        self.inner.prepare(avatar)

    def _keep(self, first: int, m: np.ndarray) -> np.ndarray:
        for i, row in enumerate(m):
            self.frames[first + i] = row
        return m

    def generate(self, chunk, prev, emotion=8, intensity=1.0):  # noqa: ANN001, ANN201
        return self._keep(chunk.start // 640, self.inner.generate(chunk, prev, emotion, intensity))

    def idle(self, n, prev, t0):  # noqa: ANN001, ANN201
        return self._keep(int(round(t0 * FPS)), self.inner.idle(n, prev, t0))


def agent_generator(generator: str, model_path: str | Path | None = None,
                    overrides: tuple[str, ...] = ()) -> Generator:
    """The whole live pipeline on a fake clock — VAD, 160/80 ms chunks with their context and
    lookahead, the generator (speech) + idle layer (silence) — on the bundled portrait; returns
    the motion of every frame.  ``avatar`` is ignored (use :func:`pipeline_avatar` for metrics)."""
    import asyncio

    from avatar_agent import wiring
    from avatar_agent.agent import Agent
    from avatar_agent.audio.frames import FramesSource
    from avatar_agent.bench import _FlatRenderer
    from avatar_agent.clock import FakeClock
    from avatar_agent.config import load_config
    from avatar_agent.face.landmarks import load_image

    def run(audio: np.ndarray, avatar, seed: int, emotion: int = 8) -> np.ndarray:
        if model_path is not None:
            wiring.EMBEDDED_MODA = Path(model_path)
        cfg = load_config(None, [f"motion.generator={generator}", f"motion.seed={seed}",
                                 "service.drain_s=0", *overrides], use_default_path=False)
        clock = FakeClock()
        tap = _Tap(wiring.make_motion(cfg))

        class Null:
            name = "null"

            async def start(self, *a) -> None:  # noqa: ANN002
                pass

            async def send(self, frame) -> None:  # noqa: ANN001
                pass

            async def close(self) -> None:
                pass

        agent = Agent(cfg, source=FramesSource.from_audio(audio, clock), vad=wiring.make_vad(cfg),
                      motion=tap, renderer=_FlatRenderer(wiring.make_renderer(cfg).prepare),
                      sinks=[Null()], clock=clock, image=load_image(cfg.avatar_path()))
        asyncio.run(agent.run())
        n = audio.shape[0] // 640
        return np.stack([tap.frames[i] for i in range(n)])

    return run


def pipeline_avatar():  # noqa: ANN201
    """The bundled portrait as the embedded renderer prepares it (for lip-opening metrics)."""
    from avatar_agent import wiring
    from avatar_agent.config import load_config
    from avatar_agent.face.landmarks import load_image

    cfg = load_config(None, [], use_default_path=False)
    return wiring.make_renderer(cfg).prepare(load_image(cfg.avatar_path()))


# --------------------------------------------------------------------------------------------
# Material
# --------------------------------------------------------------------------------------------


def real_speech(directory: Path = ALSA_DIR) -> list[tuple[str, np.ndarray]]:
    """Recorded speech files of alsa-utils as 16 kHz mono float32 (empty list if absent)."""
    import soundfile as sf
    import soxr

    out = []
    for p in sorted(directory.glob("*.wav")):
        if p.stem.lower() == "noise":
            continue
        x, sr = sf.read(str(p), dtype="float32", always_2d=True)
        x = x.mean(1)
        if sr != 16000:
            x = soxr.resample(x, sr, 16000).astype(np.float32)
        out.append((p.name, np.concatenate([np.zeros(8000, np.float32), x, np.zeros(8000, np.float32)])))
    return out


def evaluate(model_path: str | None, heldout: int, seeds: int, seed: int, cfg_audio: float | None,
             steps: int | None, stream: bool = True, live: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    from avatar_agent.motion.template import template_avatar
    from avatar_agent.train.corpus import CorpusParams, make_sample

    gens: dict[str, Generator] = {"procedural": lambda a, av, s: procedural(a, av, s)}
    if model_path:
        gens["moda"] = moda_generator(model_path, cfg_audio, steps)
        if stream:
            gens["moda-stream"] = moda_generator(model_path, cfg_audio, steps, hop_frames=4)
    results: dict[str, dict[str, dict[str, float]]] = {}

    # Held-out synthetic speech (clean audio; the teacher's motion is the reference).
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in ["teacher", *gens]}
    params = CorpusParams(augment=None)
    for i in range(heldout):
        smp = make_sample(seed, i, params)
        kp, rec = smp.avatar.kp_canonical, smp.record
        rows["teacher"].append(clip_metrics(rec.motion, smp.clean, kp))
        for name, g in gens.items():
            outs = [g(smp.clean, smp.avatar, s) for s in range(seeds)]
            row = clip_metrics(outs[0], smp.clean, kp)
            row.update(teacher_error(outs[0], rec.motion, kp))
            row["div_exp"] = diversity(outs)
            rows[name].append(row)
    results["synthetic"] = {k: mean_rows(v) for k, v in rows.items()}

    # Real recorded speech (no reference motion).
    real = real_speech()
    if real:
        results[f"real ({len(real)} alsa clips)"] = on_clips(real, gens, template_avatar(), seeds)
        # The same clips through the whole live agent (VAD: silence goes to the idle layer).
        if live:
            pipes = {"procedural-agent": agent_generator("procedural")}
            if model_path:
                pipes["moda-agent"] = agent_generator("moda", model_path)
            results[f"real, live agent ({len(real)} alsa clips)"] = on_clips(
                real, pipes, pipeline_avatar(), seeds)
    return results


def on_clips(clips: list[tuple[str, np.ndarray]], gens: dict[str, Generator], avatar,  # noqa: ANN001
             seeds: int) -> dict[str, dict[str, float]]:
    """Mean metrics per generator over clips without reference motion (``seeds`` samples each)."""
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in gens}
    for _, audio in clips:
        for name, g in gens.items():
            outs = [g(audio, avatar, s) for s in range(seeds)]
            row = clip_metrics(outs[0], audio, avatar.kp_canonical)
            row["div_exp"] = diversity(outs)
            rows[name].append(row)
    return {k: mean_rows(v) for k, v in rows.items()}


def print_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    for material, by_gen in results.items():
        keys = sorted({k for v in by_gen.values() for k in v})
        print(f"\n== {material}")
        print(f"{'metric':16s}" + "".join(f"{g:>14s}" for g in by_gen))
        for k in keys:
            print(f"{k:16s}" + "".join(f"{by_gen[g].get(k, float('nan')):14.4f}" for g in by_gen))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="exported model (.safetensors + .json); omit = procedural only")
    ap.add_argument("--heldout", type=int, default=16, help="held-out synthetic utterances")
    ap.add_argument("--seeds", type=int, default=3, help="samples per clip (diversity)")
    ap.add_argument("--seed", type=int, default=1_000_003, help="corpus seed of the held-out set")
    ap.add_argument("--cfg-audio", type=float, default=None,
                    help="audio CFG scale λ (paper eq. 8; 0 = no guidance; default: the model's)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's)")
    ap.add_argument("--no-stream", action="store_true",
                    help="skip the live-chunk evaluation (4-frame hops, 1 frame lookahead)")
    ap.add_argument("--no-live", action="store_true",
                    help="skip the whole-agent runs on the bundled portrait")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.model and not Path(args.model).with_suffix(".json").is_file():
        ap.error(f"--model {args.model}: no export there (train with bench/train_tiny.sh first)")
    t0 = time.monotonic()
    res = evaluate(args.model, args.heldout, args.seeds, args.seed, args.cfg_audio, args.steps,
                   stream=not args.no_stream, live=not args.no_live)
    print_table(res)
    print(f"\n({time.monotonic() - t0:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
