"""``avatar-agent``: start | render | check | devices | bench | models | config."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from .config import Config, ConfigError, load_config, sample_toml, to_toml

log = logging.getLogger("avatar_agent")

_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                     logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """"<priority>logger: message" — journald reads the priority prefix from stdout lines."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record).replace("\n", " ⏎ ")
        return f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>{record.name}: {msg}"


def journal_logs(cfg: Config) -> bool:
    """Whether logs are journald lines: ``service.log_format``, or under systemd for "auto"."""
    fmt = cfg.service.log_format
    return fmt == "journal" or (fmt == "auto" and bool(os.environ.get("JOURNAL_STREAM")
                                                       or os.environ.get("NOTIFY_SOCKET")))


def setup_logging(cfg: Config, journal: bool | None = None) -> None:
    """Logs to stdout: journald-friendly under systemd, timestamped otherwise (``journal``
    decides instead where given: a ``serve`` shard logs like its parent)."""
    if journal is None:
        journal = journal_logs(cfg)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JournalFormatter("%(message)s") if journal else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.service.log_level.upper())
    for noisy in ("aioice", "aiortc", "aiohttp.access", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="config file (default: $AVATAR_AGENT_CONFIG or "
                                          "~/.config/avatar-agent/config.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also show native libraries' logs (mediapipe, TensorFlow Lite, absl)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    ap = argparse.ArgumentParser(prog="avatar-agent", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("start", help="run the live agent (virtual camera + web page)")
    _common(p)
    p.add_argument("--avatar", help="portrait image (overrides avatar.image)")
    p.add_argument("--profile", choices=["embedded", "official"], help="model profile")

    p = sub.add_parser("serve", help="the session server: many faces over HTTP/WebRTC, spread "
                                      "over server.shards processes")
    _common(p)

    p = sub.add_parser("render", help="portrait + speech → mp4, offline, faster than real time")
    _common(p)
    p.add_argument("image", help="portrait image")
    p.add_argument("audio", nargs="?", help="speech audio file (any format PyAV reads)")
    p.add_argument("--text", help="speak this text with espeak-ng instead of an audio file")
    p.add_argument("--voice", help="espeak-ng voice for --text (default audio.voice)")
    p.add_argument("--emotion", help="emotion class (default avatar.emotion)")
    p.add_argument("--profile", choices=["embedded", "official"], help="model profile")
    p.add_argument("-o", "--output", required=True, help="output .mp4")

    p = sub.add_parser("check", help="check devices, models and config; exit 1 on problems")
    _common(p)

    sub.add_parser("devices", help="list audio inputs and virtual cameras")

    p = sub.add_parser("service", help="install | uninstall the systemd user unit for this install")
    p.add_argument("action", choices=["install", "uninstall"])
    p.add_argument("--config", "-c", help="config file the service starts with (install)")

    p = sub.add_parser("bench", help="measure the pipeline and print figures")
    _common(p)
    p.add_argument("--seconds", type=float, default=60.0, help="real-time run length")
    p.add_argument("--speech", choices=["tts", "mic"], default="tts",
                   help="real-time run: the looped speech with its TTS phonemes, or without them "
                        "as a microphone gives it (then audio.recognizer decides whether live "
                        "phone recognition runs)")
    p.add_argument("--simulate-hours", type=float, default=0.0,
                   help="also simulate a session this long on the fake clock")
    p.add_argument("--sessions", type=int, default=0,
                   help="run N concurrent sessions (speech pushed into each) as serve would")
    p.add_argument("--shards", type=int, default=None, metavar="K",
                   help="with --sessions: over K shard processes through the HTTP API (default: "
                        "server.shards, as serve; 1 = one engine in this process)")
    p.add_argument("--json", action="store_true", help="with --sessions: one JSON object")
    p.add_argument("--compare-processes", action="store_true",
                   help="with --sessions: also run one process per session, at once")
    p.add_argument("--soak", type=float, default=0.0, metavar="MINUTES",
                   help="a real-time soak: speech, API calls, viewer churn, avatar swaps")

    p = sub.add_parser("models", help="official weights: fetch | list | verify")
    p.add_argument("action", choices=["fetch", "list", "verify"])
    p.add_argument("name", nargs="?", default="official")
    _common(p)
    p.add_argument("--dir", help="models directory (default: motion.models_dir, else "
                                 "$AVATAR_AGENT_MODELS, else ~/.local/share/avatar-agent/models)")
    for group, orig in (("liveportrait", "KlingTeam/LivePortrait"),
                        ("hubert", "TencentGameMate/chinese-hubert-base")):
        p.add_argument(f"--{group}", choices=["auto", "moda", "upstream"], default="auto",
                       help=f"fetch: which copy of the {group} files (moda = lixinyizju/moda, "
                            f"upstream = {orig}, auto = moda with upstream as fallback)")
    p.add_argument("--pin", action="store_true",
                   help="verify: record the digests of present files that no published digest "
                        "pins, in <models dir>/pins.toml (after a trusted first download)")

    for name, what in (("train", "train a MoDA model on dataset shards (tiny on CPU, release on GPU)"),
                       ("data-prep", "turn utterances (TTS text) into training shards")):
        p = sub.add_parser(name, help=what, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER, help="see avatar-agent %s --help" % name)

    p = sub.add_parser("livekit-worker",
                       help="serve avatars to LiveKit Agents as a remote worker (extra: livekit)")
    _common(p)
    from .integrations.livekit_worker import add_arguments as livekit_worker_arguments

    livekit_worker_arguments(p)

    p = sub.add_parser("config", help="print the sample config or the effective config")
    _common(p)
    p.add_argument("--sample", action="store_true", help="print the documented defaults")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "data-prep"):   # their own parsers take every argument
        from .train.cli import prep_main, train_main

        return (train_main if argv[0] == "train" else prep_main)(argv[1:])
    args = build_parser().parse_args(argv)
    from .quiet import native_log_filter

    with native_log_filter(enabled=not getattr(args, "verbose", False)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; errors become one line on stderr and an exit code."""
    try:
        if args.cmd == "devices":
            return cmd_devices()
        if args.cmd == "service":
            from .service_install import cmd_service

            return cmd_service(args.action, args.config)
        if args.cmd == "models":
            return cmd_models(args)
        overrides = list(args.set)
        if getattr(args, "profile", None):
            overrides.append(f"avatar.profile={args.profile}")
        if getattr(args, "avatar", None):        # an override, so it survives a reload too
            overrides.append(f"avatar.image={Path(args.avatar).resolve()}")
        if args.cmd == "config" and args.sample:
            print(sample_toml(), end="")
            return 0
        cfg = load_config(args.config, overrides)
        setup_logging(cfg)
        if args.cmd in ("start", "serve", "livekit-worker", "bench"):   # long-running
            from .memory import keep_memory_flat

            keep_memory_flat()
        if args.cmd == "config":
            print(to_toml(cfg), end="")
            return 0
        if args.cmd == "start":
            return asyncio.run(cmd_start(cfg, args.config, overrides))
        if args.cmd == "serve":
            from .live import run_serve

            return asyncio.run(run_serve(cfg))
        if args.cmd == "render":
            return asyncio.run(cmd_render(cfg, args))
        if args.cmd == "check":
            from .check import run_check

            return run_check(cfg)
        if args.cmd == "livekit-worker":
            from .integrations.livekit_worker import run_worker

            return run_worker(cfg, args)
        if args.cmd == "bench":
            from .bench import run_bench

            if args.soak > 0:
                from .bench_soak import run as soak

                return soak(cfg, args.soak)
            if args.sessions > 0:
                from .bench_sessions import run

                return run(cfg, args.sessions, args.seconds, args.json, args.compare_processes,
                           list(args.set), shards=args.shards)
            return run_bench(cfg, seconds=args.seconds, simulate_hours=args.simulate_hours,
                             mic=args.speech == "mic")
    except ConfigError as e:
        print(f"avatar-agent: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"avatar-agent: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # port in use, unwritable path, ...: one line, never a traceback
        print(f"avatar-agent: {_os_error_line(e)}", file=sys.stderr)
        return 1
    return 0


def _os_error_line(e: OSError) -> str:
    """An OSError as one line naming the file (if any) and the cause."""
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return e.strerror or str(e)


# ------------------------------------------------------------------------------------------------
# start
# ------------------------------------------------------------------------------------------------

async def cmd_start(cfg: Config, config_path: str | None, overrides: list[str]) -> int:
    """The long-running agent (see :mod:`avatar_agent.live`)."""
    from .live import run_start

    return await run_start(cfg, config_path, overrides)


# ------------------------------------------------------------------------------------------------
# render
# ------------------------------------------------------------------------------------------------

async def cmd_render(cfg: Config, args: argparse.Namespace) -> int:
    """Offline: the same stages as `start` on a fake clock, into an mp4."""
    from .offline import render_to_file

    if bool(args.audio) == bool(args.text):
        raise ValueError("render needs either an AUDIO file or --text \"what to say\" (not both)")
    if args.emotion:
        cfg = dataclasses.replace(cfg, avatar=dataclasses.replace(cfg.avatar, emotion=args.emotion))
        cfg.validate()
    # Refuse before harm: a bad -o (an input, a folder, unwritable) fails here, before the
    # portrait is analysed or any file is created (render_to_file checks again, for its callers).
    from .offline import check_audio_input, check_output

    check_output(Path(args.output), [Path(p) for p in (args.image, args.audio) if p])
    if args.audio:
        check_audio_input(Path(args.audio))
    stats = await render_to_file(cfg, image=Path(args.image), output=Path(args.output),
                                 audio=Path(args.audio) if args.audio else None, text=args.text,
                                 voice=args.voice)
    print(f"wrote {args.output}: {stats['delivered']} frames, "
          f"{stats['delivered'] / cfg.player.fps:.2f} s, real-time factor {stats['rtf']:.3f}")
    return 0


# ------------------------------------------------------------------------------------------------
# devices, models
# ------------------------------------------------------------------------------------------------

def cmd_devices() -> int:
    """List audio inputs and v4l2loopback devices."""
    from .wiring import input_devices

    devs = input_devices()
    print("audio inputs:" if devs else "audio inputs: none (no sound server or PortAudio devices)")
    for d in devs:
        print(f"  [{d['index']}] {d['name']}  ({d['max_input_channels']} ch, "
              f"{d['default_samplerate']:.0f} Hz)")
    from .sinks.virtualcam import MODPROBE_LINE, available_devices

    cams = [d for d in available_devices() if d.loopback and d.output]
    print("virtual cameras:" if cams else f"virtual cameras: none — {MODPROBE_LINE} "
          "(Chrome, Zoom and Meet need exclusive_caps=1)")
    for c in cams:
        print(f"  {c.path}  {c.card}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """models fetch | list | verify [--pin]."""
    from . import models

    dest = (Path(args.dir).expanduser() if args.dir
            else models.models_dir(load_config(args.config, list(args.set))))
    pins = None
    try:
        if args.action == "fetch":
            rows = models.fetch(args.name, dest, progress=models.stderr_progress,
                                origins={"liveportrait": args.liveportrait, "hubert": args.hubert})
        elif args.action == "list":
            rows = models.list_models(dest)
        elif args.pin:
            rows, pins = models.pin(dest, args.name)
        else:
            rows = models.verify(dest, args.name)
    except models.ModelsError as e:
        print(f"avatar-agent: {e}", file=sys.stderr)
        return 1
    print(f"models directory: {dest}")
    for st in rows:
        shown = st.path.relative_to(dest) if st.path.is_relative_to(dest) else st.path
        print(f"  {shown}: {st.describe()}")
    if pins is not None:
        print(f"pins written to {pins}")
    bad = [st for st in rows if not st.good]
    if bad and args.action != "list":
        print(f"{len(bad)} file(s) missing or corrupt: avatar-agent models fetch {args.name}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
