"""Offline rendering: the live pipeline's stages on a fake clock, as fast as the CPU allows.

The stages are the live ones, with four offline settings: the source is paced by a
:class:`FakeClock` (so its timestamps are exact) that holds still while the inference thread works
(so no frame is ever late); ``Agent(offline=True)`` animates whole windows (the chunker's offline
mode) with the latency and player capacity that needs; the shutdown drain is 0 (nothing plays on
after the end); and :class:`Mp4Sink` runs with ``offline=True``, waiting for the encoder instead of
dropping images.  The player delivers every frame, each with its audio slice, to that sink.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Sequence

from .clock import FakeClock
from .config import Config
from .types import Sink


class OutputError(ValueError):
    """The output path cannot be written, or it is one of the inputs (checked before rendering)."""


class RenderFailedError(RuntimeError):
    """The render ran but the promised file was not produced (the message says why)."""


def check_output(output: Path, inputs: Sequence[Path] = (), name: str = "-o") -> Path:
    """Refuse an output path before any work is done; returns it resolved.

    ``name`` is how the user gave the path, for the message: ``-o`` (render) or
    ``sinks.file =`` (the live file sink).

    Refused: a directory, a path through a file, an unwritable or uncreatable location
    (``/proc/x.mp4``, ``/sys/new/x.mp4``, a read-only folder) and any of ``inputs`` (the same file
    by path, symlink or hard link): rendering would empty it.  Missing parent folders are created
    (as the render would); a probe file is created and removed, an existing output is opened
    without truncating it.

    Raises:
        OutputError: one line naming the path and the fix.
    """
    out = Path(output).expanduser()
    shown = str(output)
    for src in inputs:
        if src is None:
            continue
        try:
            same = out.resolve() == Path(src).resolve() or (
                out.exists() and Path(src).exists() and os.path.samefile(out, src))
        except OSError:
            same = False
        if same:
            raise OutputError(f"{name} {shown} is the input {src}: rendering would overwrite it; "
                              "choose another output path such as out.mp4")
    if out.is_dir():
        raise OutputError(f"{name} {shown} is a directory; give a file path such as "
                          f"{out / 'out.mp4'}")
    parent = out.parent
    for anc in (parent, *parent.parents):        # the nearest existing ancestor must be a folder
        if anc.exists():
            if not anc.is_dir():
                raise OutputError(f"{name} {shown}: {anc} is a file, not a folder; choose an output "
                                  "path in a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{name} {shown}: cannot create the folder {parent} "
                          f"({e.strerror or e}); choose a writable location") from None
    try:
        if out.exists():
            with open(out, "r+b"):               # writable? (no truncation before we render)
                pass
        else:
            with open(out, "xb"):
                pass
            out.unlink()
    except OSError as e:
        raise OutputError(f"{name} {shown}: cannot write there ({e.strerror or e}); choose a "
                          "writable location") from None
    return out.resolve()


def check_audio_input(audio: Path) -> None:
    """Refuse an audio file with no samples (e.g. a header-only WAV) before rendering.

    Decodes only until the first non-empty frame, so a real file costs milliseconds.

    Raises:
        AudioFileError: missing, not audio, or empty.
    """
    from .audio.file import AudioFileError, _open

    path = Path(audio)
    if path.is_file() and path.stat().st_size == 0:
        raise AudioFileError(f"audio file {str(path)!r} is empty (0 bytes); give a file with "
                             "speech")
    container, stream = _open(path)
    try:
        for frame in container.decode(stream):
            if frame.samples > 0:
                return
    except Exception as e:  # FFmpeg's own error types
        raise AudioFileError(f"audio file {str(path)!r} cannot be decoded ({e})") from None
    finally:
        container.close()
    raise AudioFileError(f"audio file {str(path)!r} holds no audio samples (a header only); "
                         "give a file with speech")


async def render_to_file(cfg: Config, image: Path, output: Path | None, *, audio: Path | None = None,
                         text: str | None = None, voice: str | None = None,
                         extra_sinks: Sequence[Sink] = ()) -> dict[str, Any]:
    """Render ``image`` speaking ``audio`` (a file) or ``text`` (espeak-ng) into ``output``.

    Returns the player's statistics plus ``rtf`` (wall time / media duration) and ``seconds``.

    Raises:
        OutputError: ``output`` cannot be written or is an input (before any work).
        AudioFileError: ``audio`` is missing, not audio or holds no samples (before any work).
        RenderFailedError: the mp4 was not produced (no frames, or the encoder failed).
    """
    from .agent import Agent
    from .face.landmarks import load_portrait
    from .wiring import make_motion, make_renderer, make_vad

    clock = FakeClock()
    if output is not None:   # refuse before harm: nothing is read, created or emptied yet
        output = check_output(output, [p for p in (image, audio) if p is not None])
    if audio is not None:
        from .audio.file import FileSource
        from .audio.recognizer import phoneme_source

        check_audio_input(audio)
        # Recognised phones give recorded speech visemes, as espeak-ng's give TTS (pocketsphinx).
        source: Any = (await phoneme_source(audio, clock)
                       or FileSource(audio, realtime=True, clock=clock))
    elif text is not None:
        import numpy as np

        from .audio.frames import FramesSource
        from .audio.tts import synthesize
        from .types import SAMPLE_RATE, Phoneme

        utt = synthesize(text, voice=voice or cfg.audio.voice, rate_wpm=cfg.audio.tts_rate)
        # Half a second of silence on both sides: the avatar starts and ends at rest.
        pad = SAMPLE_RATE // 2
        speech = np.concatenate([np.zeros(pad, np.float32), utt.audio, np.zeros(pad, np.float32)])
        phonemes = tuple(Phoneme(p.symbol, p.start + 0.5, p.end + 0.5) for p in utt.phonemes)
        source = FramesSource.from_audio(speech, clock, phonemes)
    else:
        raise ValueError("render needs an audio file or text")
    # Offline there is no compute deadline, so the full latency budget is not needed, but the
    # chunker's own delay (hop + lookahead) still has to fit in it.
    sinks: list[Sink] = list(extra_sinks)
    mp4 = None
    if output is not None:
        from .sinks.file import Mp4Sink

        mp4 = Mp4Sink(output, offline=True)      # offline: wait for the encoder, drop nothing
        sinks.append(mp4)
    cfg = dataclasses.replace(cfg, service=dataclasses.replace(cfg.service, drain_s=0.0))
    agent = Agent(cfg, source=source, vad=make_vad(cfg), motion=make_motion(cfg),
                  renderer=make_renderer(cfg), sinks=sinks, clock=clock,
                  image=load_portrait(image), offline=True)
    t = time.perf_counter()
    await agent.warm_up()                    # face analysis + first render: once per portrait
    warm = time.perf_counter() - t
    await agent.run()
    wall = time.perf_counter() - t
    stats: dict[str, Any] = dataclasses.asdict(agent.player.stats)
    if mp4 is not None:
        _check_written(mp4, stats["delivered"])
    seconds = stats["delivered"] / cfg.player.fps
    nan = float("nan")
    stats.update(seconds=seconds, wall_s=wall, warmup_s=warm,
                 rtf=wall / seconds if seconds else nan,
                 rtf_after_warmup=(wall - warm) / seconds if seconds else nan)
    return stats


def _check_written(mp4: Any, delivered: int) -> None:
    """Exit non-zero whenever the promised file is not there: no frames, or the sink failed."""
    if mp4.failure is not None:
        raise RenderFailedError(f"{mp4.path} was not written: {mp4.failure}")
    if not mp4.finished or mp4.frames_written == 0 or delivered == 0:
        with contextlib.suppress(OSError):
            if mp4.path.exists() and mp4.path.stat().st_size == 0:
                mp4.path.unlink()                 # an empty file would only look like a result
        raise RenderFailedError(f"{mp4.path} was not written: the render produced "
                                f"{mp4.frames_written} video frames")
