"""``avatar-agent livekit-worker`` up to the network boundary: options, the load function over a
real engine, job requests (LiveKit's own JobRequest), and a clear error when no server answers."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import pytest
import pytest_asyncio

pytest.importorskip("livekit.agents", reason="needs the livekit extra (./install.sh --dev)")
from livekit.agents import JobRequest  # noqa: E402
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF  # noqa: E402
from livekit.protocol import agent as lk_agent  # noqa: E402

from avatar_agent.config import load_config  # noqa: E402
from avatar_agent.engine import Engine  # noqa: E402
from avatar_agent.integrations.livekit_worker import (AvatarWorker, add_arguments,  # noqa: E402
                                                      check_arguments, run_worker)

from .sessions import SIZE  # noqa: E402

AVATARS = Path(__file__).resolve().parents[2] / "avatars"


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(autouse=True)
def _no_livekit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "LIVEKIT_AGENT_NAME"):
        monkeypatch.delenv(k, raising=False)


def test_options_default_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    a = parse()
    assert (a.agent_name, a.load_threshold, a.max_sessions) == ("avatar-agent", 1.0, None)
    monkeypatch.setenv("LIVEKIT_URL", "wss://lk.example")
    monkeypatch.setenv("LIVEKIT_API_KEY", "key")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "secret")
    a = parse("--max-sessions", "6", "--agent-name", "faces")
    check_arguments(a)
    assert (a.url, a.api_key, a.max_sessions, a.agent_name) == ("wss://lk.example", "key", 6,
                                                                "faces")


@pytest.mark.parametrize("argv, words", [
    ((), ["--url / $LIVEKIT_URL", "--api-key", "--api-secret"]),
    (("--url", "ws://h", "--api-key", "k"), ["--api-secret"]),
    (("--url", "lk.example:7880", "--api-key", "k", "--api-secret", "s"), ["ws://"]),
    (("--url", "ws://h", "--api-key", "k", "--api-secret", "s", "--load-threshold", "1.5"),
     ["--load-threshold"]),
    (("--url", "ws://h", "--api-key", "k", "--api-secret", "s", "--max-sessions", "-1"),
     ["--max-sessions"]),
])
def test_bad_options_are_one_clear_error(argv: tuple[str, ...], words: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        check_arguments(parse(*argv))
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_metadata_picks_avatars_only_inside_the_avatar_dir() -> None:
    w = AvatarWorker(None, avatar_dir=AVATARS)
    meta = w.metadata(json.dumps({"agent_identity": "agent-1", "avatar": "default.png"}))
    assert meta["avatar"] == str(AVATARS / "default.png")
    for bad in ("../pyproject.toml", "/etc/passwd", "missing.png"):
        with pytest.raises(ValueError, match="avatar"):
            w.metadata(json.dumps({"avatar": bad}))
    with pytest.raises(ValueError, match="JSON"):
        w.metadata("{not json")
    assert w.metadata("") == {}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    cfg = load_config(None, [f"render.size={SIZE}", "server.max_sessions=2"],
                      use_default_path=False)
    e = Engine(cfg)
    await e.warm_up()
    yield e
    await e.aclose()


def _request(meta: dict, answers: list) -> JobRequest:
    job = lk_agent.Job(id="AJ_test", metadata=json.dumps(meta))

    async def on_reject(terminate: bool) -> None:
        answers.append(("reject", terminate))

    async def on_accept(args) -> None:
        answers.append(("accept", args))

    return JobRequest(job=job, on_reject=on_reject, on_accept=on_accept)


@pytest.mark.asyncio(loop_scope="module")
async def test_load_is_sessions_over_capacity_and_full_passes_jobs_on(engine) -> None:
    """load = active sessions / capacity; a full (or still warming) worker passes a job on
    (reject without terminate, so LiveKit offers it to another worker); otherwise it accepts as
    the agent's avatar, publishing on its behalf."""
    w = AvatarWorker(None)
    assert w.load() == 1.0                                    # warming up: full
    answers: list = []
    await w.on_request(_request({"agent_identity": "agent-1"}, answers))
    assert answers == [("reject", False)]
    w.engine = engine
    assert w.load() == 0.0
    answers.clear()
    await w.on_request(_request({"agent_identity": "agent-1"}, answers))
    (kind, acc), = answers
    assert kind == "accept" and acc.identity == "avatar-agent-agent-1"
    assert acc.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: "agent-1"}
    s1 = await engine.open_session()
    assert w.load() == pytest.approx(0.5)
    s2 = await engine.open_session()
    assert w.load() == pytest.approx(1.0)
    answers.clear()
    await w.on_request(_request({"agent_identity": "agent-2"}, answers))
    assert answers == [("reject", False)]
    await engine.close_session(s1.id)
    await engine.close_session(s2.id)
    assert w.load() == 0.0


def test_unreachable_server_is_one_clear_error() -> None:
    """Nothing listens on the port: the worker gives up after --max-retry attempts with one
    line naming the URL (no traceback), quickly."""
    cfg = load_config(None, [f"render.size={SIZE}"], use_default_path=False)
    args = parse("--url", "ws://127.0.0.1:9", "--api-key", "k", "--api-secret", "s" * 32,
                 "--max-retry", "1", "--http-port", "0")
    t = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        run_worker(cfg, args)
    assert time.monotonic() - t < 30
    msg = str(e.value)
    assert "\n" not in msg
    assert "ws://127.0.0.1:9" in msg and "cannot register" in msg


@pytest.mark.parametrize("name", ["livekit_in_job.py", "livekit_remote_avatar.py"])
def test_examples_define_an_agent_server(name: str) -> None:
    """The examples load against the installed livekit-agents and register their entrypoint
    (running them needs a LiveKit server)."""
    import runpy

    from livekit.agents import AgentServer

    ns = runpy.run_path(str(AVATARS.parent / "examples" / name), run_name="example")
    server = ns["server"]
    assert isinstance(server, AgentServer)
    assert server._entrypoint_fnc is ns["entrypoint"]


def test_cli_subcommand_reports_missing_server_in_one_line(capsys) -> None:
    from avatar_agent.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None)
               and "start" in a.choices)
    assert "livekit-worker" in sub.choices
    assert main(["livekit-worker"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--url / $LIVEKIT_URL" in err


@pytest.mark.asyncio(loop_scope="module")
async def test_jobs_on_their_own_threads_share_the_engine(engine) -> None:
    """The worker runs each LiveKit job on a thread with its own event loop: sessions opened
    there on the shared engine produce paced frames alongside one on the main loop."""
    import threading

    def job(out: dict) -> None:
        async def run() -> None:
            s = await engine.open_session()
            frames = s.frames()
            t0 = time.monotonic()
            out["n"] = len([await anext(frames) for _ in range(25)])
            out["s"] = time.monotonic() - t0
            await engine.close_session(s.id)
        try:
            asyncio.run(run())
        except BaseException as e:   # reported to the test thread
            out["error"] = e

    main_s = await engine.open_session()
    frames = main_s.frames()
    out: dict = {}
    t = threading.Thread(target=job, args=(out,))
    t.start()
    got = [await anext(frames) for _ in range(50)]
    await asyncio.to_thread(t.join, 30)
    await engine.close_session(main_s.id)
    assert "error" not in out, out.get("error")
    assert out["n"] == 25 and out["s"] == pytest.approx(1.0, abs=0.2)
    assert [f.index for f in got] == list(range(got[0].index, got[0].index + 50))


@pytest.mark.asyncio(loop_scope="module")
async def test_remote_avatar_job_over_data_streams(engine) -> None:
    """The worker's job end to end over loopback rooms: the agent's real DataStreamAudioOutput
    streams TTS audio to the job's DataStreamAudioReceiver + AvatarRunner; the agent sees the
    playback finish (full, then interrupted by clear_buffer over RPC), the avatar publishes its
    tracks, and the job ends (session closed) when the agent leaves."""
    from livekit import rtc
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    from avatar_agent.integrations.livekit import avatar_identity, start_remote_avatar

    from .lk_loopback import JobContextStandIn, LoopbackRoom, pair
    from .test_livekit import tts

    agent_id = "agent-7"
    avatar_id = avatar_identity(agent_id)
    agent_room = LoopbackRoom("room", agent_id, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
    avatar_room = LoopbackRoom("room", avatar_id, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT,
                               {ATTRIBUTE_PUBLISH_ON_BEHALF: agent_id})
    pair(agent_room, avatar_room)
    worker = AvatarWorker(engine, avatar_dir=AVATARS)

    class Dispatcher:                                     # LiveKitAPI's agent_dispatch
        def __init__(self) -> None:
            self.agent_dispatch, self.requests = self, []

        async def create_dispatch(self, req) -> None:
            self.requests.append(req)

    class AgentSessionStandIn:
        class output:                                     # noqa: N801 (mirrors AgentSession)
            audio = None

    api, agent_session = Dispatcher(), AgentSessionStandIn()
    assert await start_remote_avatar(agent_session, agent_room, lk_api=api,
                                     options={"emotion": "happiness",
                                              "avatar": "default.png"}) == avatar_id
    (req,) = api.requests
    assert (req.agent_name, req.room) == ("avatar-agent", "room")
    ctx = JobContextStandIn(avatar_room, req.metadata)    # what LiveKit hands the worker
    before = len(engine.sessions)
    job = asyncio.create_task(worker.entrypoint(ctx))
    out = agent_session.output.audio
    assert isinstance(out, DataStreamAudioOutput)
    try:
        async with asyncio.timeout(30):
            while "lk.clear_buffer" not in avatar_room.local_participant._rpc_handlers:
                await asyncio.sleep(0.05)                 # the job's receiver is listening
        assert len(engine.sessions) == before + 1
        await tts(out, 1.0)
        ev = await asyncio.wait_for(out.wait_for_playout(), 10)
        assert ev.interrupted is False and ev.playback_position == pytest.approx(1.0, abs=0.04)
        assert set(avatar_room.local_participant.published) == {"avatar_audio", "avatar_video"}

        await tts(out, 3.0, flush=False)
        await asyncio.sleep(1.0)
        out.clear_buffer()                                # RPC lk.clear_buffer to the avatar
        ev = await asyncio.wait_for(out.wait_for_playout(), 5)
        print(f"remote avatar: interrupted at {ev.playback_position:.2f} s")
        assert ev.interrupted is True and 0.5 < ev.playback_position < 1.5
    finally:
        agent_room.leave()                                # the agent leaves the room
        await asyncio.wait_for(job, 10)
        await asyncio.wait_for(ctx.closed.wait(), 10)
    assert ctx.shutdown_reason == "the agent left"
    assert len(engine.sessions) == before
