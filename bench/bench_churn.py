"""Memory per repeated event of a long-running agent: RSS and the objects left behind.

The live agent (TTS source, WebRTC sink, local app) runs in this process and one kind of event is
repeated ``--n`` times (``--what``):

- ``viewers``: a child process opens WebRTC viewers one after another, each receiving video for
  ``--hold`` seconds and then hanging up;
- ``swaps``: avatar swaps over the control API, alternating two copies of the portrait;
- ``says``: ``/api/say`` of a sentence, each played to the end;
- ``pushes``: ``/api/audio`` of 2 s of 16-bit PCM (a TTS voice), each played to the end.

After every 10 events this process collects garbage, trims the allocator and records RSS and how
many peer connections, RTP senders, video encoders, viewer records and avatars are still alive.
Prints a table and the RSS slope per event after the first 20 (KB/event): a leak shows as a
steady slope and growing object counts; allocator warm-up flattens out. With ``--trace`` the
Python-level heap (tracemalloc, numpy arrays included) is compared between event 20 and the last
one, and the source lines whose live allocations grew most are printed: a leak in Python code
shows there with its size per event, while growth only in RSS points at native code or the
allocator.  This is how the soak's
RSS growth (`avatar-agent bench --soak`) is taken apart.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_churn.py [--what viewers] [--n 150]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _alive() -> dict[str, int]:
    """Live objects of the classes a viewer creates, by class name."""
    names = ("RTCPeerConnection", "RTCRtpSender", "Vp8Encoder", "H264Encoder", "_Viewer",
             "MailboxVideoTrack", "QueueAudioTrack", "RTCDtlsTransport", "RTCIceTransport",
             "Avatar")
    out = dict.fromkeys(names, 0)
    for o in gc.get_objects():
        n = type(o).__name__
        if n in out:
            out[n] += 1
    return out


def _trim() -> None:
    from avatar_agent.memory import trim_now

    gc.collect()
    trim_now()


async def _child(url: str, n: int, hold: float) -> None:
    from avatar_agent.bench_soak import _viewer

    for k in range(1, n + 1):
        frames = [0]
        await _viewer(url, hold, frames)
        print("left", k, frames[0], flush=True)


async def _parent(what: str, n: int, hold: float, trace: bool) -> None:
    from avatar_agent.agent import Agent
    from avatar_agent.audio.queue import SpeechQueueSource
    from avatar_agent.clock import SystemClock
    from avatar_agent.config import load_config
    from avatar_agent.memory import keep_memory_flat
    from avatar_agent.metrics import rss_bytes
    from avatar_agent.server.app import runner_urls, serve
    from avatar_agent.server.local import make_local_app
    from avatar_agent.session import Session
    from avatar_agent.wiring import make_motion, make_renderer, make_sinks, make_source, make_vad

    keep_memory_flat()
    cfg = load_config(None, [])
    portrait = cfg.avatar_path()
    copy = Path(tempfile.mkdtemp()) / "portrait.png"
    copy.write_bytes(portrait.read_bytes())
    cfg = dataclasses.replace(
        cfg, audio=dataclasses.replace(cfg.audio, source="tts"),
        sinks=dataclasses.replace(cfg.sinks, enabled=["webrtc"]),
        avatar=dataclasses.replace(cfg.avatar, directories=[str(copy.parent),
                                                            str(portrait.parent)]),
        server=dataclasses.replace(cfg.server, port=0, rate_offer_per_min=100_000,
                                   rate_say_per_min=100_000, rate_push_per_min=100_000))
    clock = SystemClock()
    sinks, webrtc = make_sinks(cfg)
    source = make_source(cfg, clock)
    assert isinstance(source, SpeechQueueSource)
    agent = Agent(cfg, source=source, vad=make_vad(cfg), motion=make_motion(cfg),
                  renderer=make_renderer(cfg), sinks=sinks, clock=clock)
    session = Session(agent)
    runner = await serve(make_local_app(cfg, session, webrtc), "127.0.0.1", 0)
    url = runner_urls(runner)[0]
    run = asyncio.create_task(session.run())
    while agent.player.stats.delivered < 25:
        await asyncio.sleep(0.1)
    rows: list[tuple[int, float, dict[str, int], int]] = []
    _trim()
    rows.append((0, rss_bytes() / 1e6, _alive(), 0))
    t0 = time.monotonic()

    snaps: list[tuple[int, tracemalloc.Snapshot]] = []
    if trace:
        tracemalloc.start(8)

    async def sample(k: int, frames: int) -> None:
        if k % 10 == 0:
            await asyncio.sleep(0.5)                 # the server has seen the last event end
            _trim()
            rows.append((k, rss_bytes() / 1e6, _alive(), frames))
            if trace and (k == 20 or k == n):
                snaps.append((k, tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__)])))

    if what == "viewers":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--child", url, "--n", str(n), "--hold", str(hold),
            stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            _, n_done, got = line.decode().split()
            await sample(int(n_done), int(got))
        await proc.wait()
    else:
        import aiohttp

        from avatar_agent.audio.tts import synthesize

        speech = synthesize("Here is what I found for you today.").audio[:32000]
        pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
        async with aiohttp.ClientSession() as http:
            for k in range(1, n + 1):
                if what == "swaps":
                    path = copy if k % 2 else portrait
                    async with http.post(url + "api/avatar", json={"path": str(path), "wait": True}
                                         ) as r:
                        assert r.status < 300, await r.text()
                else:
                    if what == "says":
                        req = http.post(url + "api/say", json={"text": "Let me check."})
                    else:
                        req = http.post(url + "api/audio?rate=16000&format=s16le", data=pcm)
                    async with req as r:
                        assert r.status < 300, await r.text()
                    while source.pending:
                        await asyncio.sleep(0.05)
                await sample(k, 0)
    agent.stop()
    await run
    await runner.cleanup()
    print(f"{n} {what} in {time.monotonic() - t0:.0f} s")
    names = [c for c in rows[-1][2] if any(r[2][c] for r in rows)]
    print(f"{what:>7s}  RSS MB  frames(last)  " + "  ".join(names))
    for done, rss, alive, frames in rows:
        print(f"{done:7d}  {rss:6.1f}  {frames:12d}  "
              + "  ".join(f"{alive[c]:>{len(c)}d}" for c in names))
    late = [(done, rss) for done, rss, _, _ in rows if done >= 20]
    if len(late) >= 2:
        slope = np.polyfit([d for d, _ in late], [r for _, r in late], 1)[0] * 1000
        print(f"RSS slope after 20 {what}: {slope:+.1f} KB per event")
    if len(snaps) == 2:
        (k0, first), (k1, last) = snaps
        stats = last.compare_to(first, "traceback")
        total = sum(st.size_diff for st in stats)
        print(f"Python heap {k0} -> {k1} {what}: {total / 1e3:+.0f} KB "
              f"({total / (k1 - k0):+.0f} B per event); largest growth:")
        for st in sorted(stats, key=lambda st: -st.size_diff)[:12]:
            if st.size_diff <= 0:
                break
            frames = [f"{Path(f.filename).name}:{f.lineno}" for f in st.traceback][:4]
            print(f"  {st.size_diff / 1e3:+8.1f} KB {st.count_diff:+6d} blocks  "
                  + " <- ".join(frames))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=("viewers", "swaps", "says", "pushes"), default="viewers")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--hold", type=float, default=1.5)
    ap.add_argument("--trace", action="store_true",
                    help="compare the Python heap (tracemalloc) between event 20 and the last")
    ap.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        asyncio.run(_child(args.child, args.n, args.hold))
    else:
        asyncio.run(_parent(args.what, args.n, args.hold, args.trace))


if __name__ == "__main__":
    from avatar_agent.quiet import native_log_filter

    with native_log_filter():            # mediapipe/TFLite info lines off the terminal
        main()
