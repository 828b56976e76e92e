"""A LiveKit Agents voice agent whose face is rendered by a remote avatar worker.

Start one or more avatar workers (each registers with LiveKit and reports active sessions /
capacity as its load, so LiveKit spreads avatars over the machines):

    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    avatar-agent livekit-worker --max-sessions 8            # on each avatar machine

Then run this agent (any machine; it needs no avatar models):

    pip install 'avatar-agent[livekit]'
    python examples/livekit_remote_avatar.py dev

Each conversation dispatches one avatar job into the room; the agent's TTS audio streams to it
over LiveKit data streams, and the worker publishes the avatar's video and voice on the agent's
behalf.
"""

from __future__ import annotations

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli

from avatar_agent.integrations.livekit import start_remote_avatar

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    """One LiveKit job: the agent's conversation in this room, with the avatar."""
    await ctx.connect()
    session = AgentSession(stt="assemblyai/universal-streaming", llm="openai/gpt-4.1-mini",
                           tts="cartesia/sonic-2")
    # options: "avatar" = a portrait file name in the worker's --avatar-dir, "emotion"
    await start_remote_avatar(session, ctx.room, options={"emotion": "happiness"})
    await session.start(agent=Agent(instructions="You are a friendly assistant. Be brief."),
                        room=ctx.room)
    await session.generate_reply(instructions="Greet the user.")


if __name__ == "__main__":
    cli.run_app(server)
