"""Command-line entry points: ``avatar-agent data-prep`` (:func:`prep_main`) and
``avatar-agent train`` (:func:`train_main`).  Both return a process exit code (0 ok, 2 bad input)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from avatar_agent.train.shards import ShardError


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override {text!r} must look like field=value "
                                         "(e.g. hidden=64)")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _fail(prog: str, err: Exception) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


def prep_main(argv: list[str] | None = None) -> int:
    """``avatar-agent data-prep``: build a training corpus (synthetic, from a text file, or video)."""
    from avatar_agent.train.corpus import (VIDEO_SUFFIXES, AugmentParams, CorpusParams,
                                           build_corpus, build_corpus_from_texts, prep_video,
                                           read_sentences)

    prog = "avatar-agent data-prep"
    ap = argparse.ArgumentParser(prog=prog, description="Build a MoDA training corpus: espeak-ng "
                                 "speech + procedural teacher motion, sharded with statistics.")
    ap.add_argument("--out", required=True, help="output dataset directory (must be new/empty)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--n", type=int, default=None,
                     help="number of synthetic utterances from the built-in sentence generator "
                          "(default 1000 when no --texts/--video)")
    src.add_argument("--texts", help="text file, one sentence per line (# = comment)")
    src.add_argument("--video", help=f"talking-head video ({', '.join(VIDEO_SUFFIXES)}): needs a "
                                     "motion extractor, not available yet")
    ap.add_argument("--repeats", type=int, default=1, help="with --texts: times each line is spoken")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed (same seed = same corpus)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes")
    ap.add_argument("--block", type=int, default=32,
                    help="utterances per fresh espeak-ng process (part of the corpus identity)")
    ap.add_argument("--shard-size", type=int, default=256, help="utterances per shard file")
    ap.add_argument("--min-frames", type=int, default=80, help="pad utterances to this many frames")
    ap.add_argument("--no-augment", action="store_true", help="clean audio (no noise/reverb/gain)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    params = CorpusParams(min_frames=args.min_frames,
                          augment=None if args.no_augment else AugmentParams())
    try:
        if args.video:
            prep_video(args.video, args.out)
        if args.texts:
            stats = build_corpus_from_texts(args.out, read_sentences(args.texts), args.seed,
                                            args.workers, args.repeats, params, args.shard_size,
                                            args.block, progress=not args.quiet)
        else:
            stats = build_corpus(args.out, args.n if args.n is not None else 1000, args.seed,
                                 args.workers, params, args.shard_size, args.block,
                                 progress=not args.quiet)
    except (ShardError, ValueError) as e:
        return _fail(prog, e)
    if not args.quiet:
        from avatar_agent.train.shards import load_index

        idx = load_index(args.out)
        print(f"{args.out}: {idx['utterances']} utterances, {idx['frames']} frames "
              f"({idx['frames'] / 25 / 3600:.2f} h) in {len(idx['shards'])} shards; "
              f"pose std (deg) {stats.motion_std[67:70].round(2).tolist()}")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """``avatar-agent train``: train (or resume, or export) a MoDA model on a corpus."""
    from avatar_agent.train.loop import TrainConfig, TrainError, export_checkpoint, train

    prog = "avatar-agent train"
    d = TrainConfig()
    ap = argparse.ArgumentParser(prog=prog, description="Train the MoDA DiT with the rectified-flow "
                                 "objective; resumes from OUT/checkpoint.pt when present.")
    ap.add_argument("--data", help="dataset directory (from avatar-agent data-prep)")
    ap.add_argument("--out", required=True, help="run directory: checkpoint.pt, losses.csv/png")
    ap.add_argument("--preset", default=d.preset, help=f"model preset (default {d.preset})")
    ap.add_argument("--override", action="append", type=_parse_override, default=[],
                    metavar="FIELD=VALUE", help="MoDAParams field override, repeatable")
    ap.add_argument("--seq-len", type=int, default=None, help="frames per segment (default: preset)")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--warmup", type=int, default=d.warmup_steps)
    ap.add_argument("--ema", type=float, default=d.ema_decay, help="EMA decay")
    ap.add_argument("--p-drop-audio", type=float, default=d.p_drop_audio)
    ap.add_argument("--p-drop-emotion", type=float, default=d.p_drop_emotion)
    ap.add_argument("--p-tail-zero", type=float, default=d.p_tail_zero,
                    help="probability of zeroing a segment's audio from a random frame on")
    ap.add_argument("--w-vel", type=float, default=d.w_vel)
    ap.add_argument("--w-acc", type=float, default=d.w_acc)
    ap.add_argument("--relative", action="store_true",
                    help="learn motion relative to the avatar's rest pose (the embedded tiny model)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--max-minutes", type=float, default=None, help="wall-time budget")
    ap.add_argument("--log-every", type=int, default=d.log_every)
    ap.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    ap.add_argument("--val-every", type=int, default=d.val_every)
    ap.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--export", help="write the EMA model here at the end "
                                     "(e.g. models/embedded/moda-tiny.safetensors)")
    ap.add_argument("--export-only", action="store_true",
                    help="only export OUT/checkpoint.pt to --export, no training")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        if args.export_only:
            if not args.export:
                raise TrainError("--export-only needs --export PATH")
            path = export_checkpoint(Path(args.out) / "checkpoint.pt", args.export)
            print(f"exported {path}")
            return 0
        if not args.data:
            raise TrainError("--data DIR is required (build one with avatar-agent data-prep)")
        cfg = TrainConfig(preset=args.preset, overrides=dict(args.override), seq_len=args.seq_len,
                          batch_size=args.batch, steps=args.steps, lr=args.lr,
                          warmup_steps=args.warmup, ema_decay=args.ema,
                          p_drop_audio=args.p_drop_audio, p_drop_emotion=args.p_drop_emotion,
                          p_tail_zero=args.p_tail_zero,
                          w_vel=args.w_vel, w_acc=args.w_acc, relative=args.relative,
                          seed=args.seed, device=args.device,
                          bf16=args.bf16, threads=args.threads, max_minutes=args.max_minutes,
                          log_every=args.log_every, ckpt_every=args.ckpt_every,
                          val_every=args.val_every)
        trainer = train(cfg, args.data, args.out, resume=not args.no_resume,
                        progress=not args.quiet, export=args.export)
    except (TrainError, ShardError, ValueError) as e:
        return _fail(prog, e)
    last = trainer.history[-1] if trainer.history else {}
    print(f"step {trainer.step}/{cfg.steps}, loss {last.get('loss', float('nan')):.4f}, "
          f"{trainer.elapsed / 60:.1f} min, {trainer.n_params} parameters"
          + (f"; exported {args.export}" if args.export else ""))
    if not args.quiet:
        print(json.dumps({"params": dataclasses.asdict(trainer.params)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m avatar_agent.train.cli {prep,train} ...`` (until the main CLI hooks these up)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("prep", "train"):
        print("usage: python -m avatar_agent.train.cli {prep,train} [options]  (--help per command)",
              file=sys.stderr)
        return 2
    return (prep_main if argv[0] == "prep" else train_main)(argv[1:])


__all__ = ["prep_main", "train_main", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
