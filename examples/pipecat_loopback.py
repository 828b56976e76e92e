"""pipecat + avatar-agent with no cloud service: speech → AvatarProcessor → SmallWebRTC → a
local aiortc viewer, which reports what it received.

In a real bot the processor sits between your TTS service and the transport output::

    Pipeline([transport.input(), stt, context_agg.user(), llm, tts,
              AvatarProcessor(face), transport.output(), context_agg.assistant()])

Here the "TTS" is an audio file (WAV/FLAC/OGG) sent as TTSAudioRawFrames.

    pip install 'avatar-agent[pipecat]'
    python examples/pipecat_loopback.py speech.wav
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import soundfile as sf
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from pipecat.frames.frames import TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from avatar_agent.config import load_config
from avatar_agent.engine import Engine
from avatar_agent.integrations.pipecat import AvatarProcessor


async def main(audio_path: str, overrides: list[str] | None = None) -> dict[str, float]:
    """Run it; returns what the viewer received (also printed)."""
    engine = Engine(load_config(None, overrides))
    await engine.warm_up()
    face = await engine.open_session()

    viewer = RTCPeerConnection()                     # stands in for the user's browser
    viewer.addTransceiver("audio", direction="sendrecv")
    viewer.addTransceiver("video", direction="sendrecv")
    got: dict[str, float] = {"audio": 0, "video": 0, "loud_audio": 0}
    readers: set[asyncio.Task[None]] = set()          # referenced until the viewer closes

    @viewer.on("track")
    def on_track(track) -> None:
        async def read() -> None:
            while True:
                try:
                    f = await track.recv()
                except MediaStreamError:             # the connection closed
                    return
                got[track.kind] += 1
                if track.kind == "audio" and np.abs(f.to_ndarray()).max() > 1000:
                    got["loud_audio"] += 1
        readers.add(asyncio.create_task(read()))

    await viewer.setLocalDescription(await viewer.createOffer())
    conn = SmallWebRTCConnection()
    await conn.initialize(sdp=viewer.localDescription.sdp, type=viewer.localDescription.type)
    answer = conn.get_answer()
    await viewer.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    transport = SmallWebRTCTransport(conn, TransportParams(
        audio_out_enabled=True, video_out_enabled=True, video_out_is_live=True,
        video_out_width=face.size, video_out_height=face.size, video_out_framerate=face.fps))
    worker = PipelineWorker(Pipeline([AvatarProcessor(face), transport.output()]),
                            params=PipelineParams(), cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())

    data, rate = sf.read(audio_path, dtype="int16", always_2d=True)
    s16 = np.ascontiguousarray(data[:, 0])           # first channel
    step = rate // 50
    await asyncio.sleep(2.0)                         # let the viewer connect
    t0 = time.monotonic()
    await worker.queue_frame(TTSStartedFrame())
    for i in range(0, len(s16), step):               # 20 ms chunks, as a TTS service sends
        await worker.queue_frame(TTSAudioRawFrame(audio=s16[i:i + step].tobytes(),
                                                  sample_rate=rate, num_channels=1))
    await worker.queue_frame(TTSStoppedFrame())
    await asyncio.sleep(len(s16) / rate + 2.0)
    seconds = time.monotonic() - t0
    await worker.cancel()
    await run
    await viewer.close()
    await engine.aclose()
    got["fps"] = got["video"] / (seconds + 2.0)
    got["speech_s"] = got["loud_audio"] * 0.02
    print(f"viewer received {got['video']} video frames ({got['fps']:.1f} fps) and "
          f"{got['audio']} audio frames, {got['speech_s']:.1f} s of it speech")
    return got


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("audio", help="speech audio file (the bot's TTS output)")
    asyncio.run(main(ap.parse_args().audio))
