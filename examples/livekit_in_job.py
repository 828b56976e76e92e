"""A LiveKit Agents voice agent with an avatar-agent face, rendered inside the agent's own job.

The agent's TTS audio goes to the avatar through a ``QueueAudioOutput`` (no network hop); the job
publishes ``avatar_video`` + ``avatar_audio`` into the room.  All jobs of this process share one
engine (models, renderer, inference thread), so jobs run as threads.

    pip install 'avatar-agent[livekit]'
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python examples/livekit_in_job.py dev          # or: start (production)

Then join the room from any LiveKit client (e.g. the Agents Playground) and talk.  STT/LLM/TTS
below are LiveKit Inference model strings; any livekit-plugins-* services work the same way.
"""

from __future__ import annotations

import asyncio
import threading

from livekit.agents import (Agent, AgentServer, AgentSession, JobContext, JobExecutorType,
                            cli)

from avatar_agent.config import load_config
from avatar_agent.engine import Engine
from avatar_agent.integrations.livekit import start_local_avatar

server = AgentServer(job_executor_type=JobExecutorType.THREAD)
_engine: Engine | None = None
_engine_lock = threading.Lock()       # jobs are threads, each with its own event loop


def shared_engine() -> Engine:
    """The process's one engine, built (and its cost measured) by the first job."""
    global _engine
    with _engine_lock:
        if _engine is None:
            engine = Engine(load_config())
            asyncio.run(engine.warm_up())
            _engine = engine
    return _engine


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    """One LiveKit job: the agent's conversation in this room, with the avatar."""
    await ctx.connect()
    engine = await asyncio.to_thread(shared_engine)
    face = await engine.open_session(emotion="happiness")
    session = AgentSession(stt="assemblyai/universal-streaming", llm="openai/gpt-4.1-mini",
                           tts="cartesia/sonic-2")
    runner = await start_local_avatar(face, session, ctx.room)   # before session.start

    async def close() -> None:
        await runner.aclose()
        await engine.close_session(face.id)

    ctx.add_shutdown_callback(close)
    await session.start(agent=Agent(instructions="You are a friendly assistant. Be brief."),
                        room=ctx.room)
    await session.generate_reply(instructions="Greet the user.")


if __name__ == "__main__":
    cli.run_app(server)
