"""Offline rendering: the live pipeline's stages on a fake clock, as fast as the CPU allows.

Nothing is special-cased: the source is paced by a :class:`FakeClock` (so its timestamps are exact),
the clock holds still while the inference thread works (so no frame is ever late), and the player
delivers every frame, each with its audio slice, to an mp4 sink.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from .clock import FakeClock
from .config import Config
from .types import Sink


async def render_to_file(cfg: Config, image: Path, output: Path | None, *, audio: Path | None = None,
                         text: str | None = None, voice: str | None = None,
                         extra_sinks: Sequence[Sink] = ()) -> dict[str, Any]:
    """Render ``image`` speaking ``audio`` (a file) or ``text`` (espeak-ng) into ``output``.

    Returns the player's statistics plus ``rtf`` (wall time / media duration) and ``seconds``.
    """
    from .agent import Agent
    from .face.landmarks import load_image
    from .wiring import make_motion, make_renderer, make_vad

    clock = FakeClock()
    if audio is not None:
        from .audio.file import FileSource

        source: Any = FileSource(audio, realtime=True, clock=clock)
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
    if output is not None:
        from .sinks.file import Mp4Sink

        output.parent.mkdir(parents=True, exist_ok=True)
        sinks.append(Mp4Sink(output, offline=True))   # offline: wait for the encoder, drop nothing
    cfg = dataclasses.replace(cfg, service=dataclasses.replace(cfg.service, drain_s=0.0))
    agent = Agent(cfg, source=source, vad=make_vad(cfg), motion=make_motion(cfg),
                  renderer=make_renderer(cfg), sinks=sinks, clock=clock,
                  image=load_image(image), offline=True)
    t = time.perf_counter()
    await agent.warm_up()                    # face analysis + first render: once per portrait
    warm = time.perf_counter() - t
    await agent.run()
    wall = time.perf_counter() - t
    stats = agent.stats()
    seconds = stats["delivered"] / cfg.player.fps
    nan = float("nan")
    stats.update(seconds=seconds, wall_s=wall, warmup_s=warm,
                 rtf=wall / seconds if seconds else nan,
                 rtf_after_warmup=(wall - warm) / seconds if seconds else nan)
    return stats
