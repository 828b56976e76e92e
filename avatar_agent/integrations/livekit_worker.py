"""``avatar-agent livekit-worker``: a remote LiveKit avatar worker, the scale-out path.

The worker registers with a LiveKit server under an ``agent_name`` (explicit dispatch) and reports
its load as active sessions / capacity, so LiveKit's dispatcher spreads avatars over every machine
that runs one.  An agent asks for an avatar with
:func:`avatar_agent.integrations.livekit.start_remote_avatar`; the worker that takes the job:

1. accepts it as ``<agent_name>-<agent identity>`` with ``lk.publish_on_behalf`` = the agent,
   so the agent's room I/O does not mistake the avatar for the user;
2. opens a session on the process's one shared :class:`~avatar_agent.engine.Engine`;
3. receives the agent's TTS audio over LiveKit data streams (``DataStreamAudioReceiver``) and
   publishes ``avatar_video`` + ``avatar_audio`` with ``AvatarRunner``;
4. ends the session when the agent leaves the room.

Jobs run as threads of this process (``JobExecutorType.THREAD``) so that every session shares the
engine's models and inference thread; each job has its own event loop, which the engine allows
(inference results go back to the loop that asked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from ..config import Config

log = logging.getLogger(__name__)

DEFAULT_AGENT_NAME = "avatar-agent"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The subcommand's options (importable without the livekit extra, for the CLI parser)."""
    env = os.environ.get
    p.add_argument("--url", default=env("LIVEKIT_URL"),
                   help="LiveKit server URL, ws(s):// or http(s):// (default $LIVEKIT_URL)")
    p.add_argument("--api-key", default=env("LIVEKIT_API_KEY"),
                   help="API key (default $LIVEKIT_API_KEY)")
    p.add_argument("--api-secret", default=env("LIVEKIT_API_SECRET"),
                   help="API secret (default $LIVEKIT_API_SECRET; prefer the variable)")
    p.add_argument("--agent-name", default=env("LIVEKIT_AGENT_NAME") or DEFAULT_AGENT_NAME,
                   help=f"name agents dispatch (default {DEFAULT_AGENT_NAME})")
    p.add_argument("--max-sessions", type=int, default=None,
                   help="capacity of this machine (default server.max_sessions; 0 = measured)")
    p.add_argument("--load-threshold", type=float, default=1.0,
                   help="report full at this load = sessions / capacity (default 1.0: when "
                        "every session slot is taken)")
    p.add_argument("--http-port", type=int, default=8081,
                   help="LiveKit's worker health-check port (0 = any free port)")
    p.add_argument("--max-retry", type=int, default=16,
                   help="connection attempts to the server before giving up")
    p.add_argument("--avatar-dir", default=None,
                   help="portraits a dispatch may pick by file name (default: the directory of "
                        "avatar.image)")


def check_arguments(args: argparse.Namespace) -> None:
    """One clear error for each missing or bad option (before anything loads)."""
    missing = [name for name, value in (("--url / $LIVEKIT_URL", args.url),
                                        ("--api-key / $LIVEKIT_API_KEY", args.api_key),
                                        ("--api-secret / $LIVEKIT_API_SECRET", args.api_secret))
               if not value]
    if missing:
        raise ValueError(f"livekit-worker needs {', '.join(missing)}: the LiveKit server to "
                         "register with and its API credentials")
    if not str(args.url).startswith(("ws://", "wss://", "http://", "https://")):
        raise ValueError(f"--url {args.url!r}: expected ws://, wss://, http:// or https://")
    if args.max_sessions is not None and args.max_sessions < 0:
        raise ValueError(f"--max-sessions {args.max_sessions}: must be ≥ 0 (0 = measured)")
    if not 0 < args.load_threshold <= 1:
        raise ValueError(f"--load-threshold {args.load_threshold}: must be in (0, 1]")


class AvatarWorker:
    """The worker's logic, apart from LiveKit's server loop (tested on its own).

    Args:
        engine: the shared engine (``avatar_agent.engine.Engine``).
        agent_name: the dispatch name.
        avatar_dir: where dispatch metadata may pick a portrait by file name.
    """

    def __init__(self, engine: Any = None, agent_name: str = DEFAULT_AGENT_NAME,
                 avatar_dir: Path | None = None) -> None:
        self.engine, self.agent_name, self.avatar_dir = engine, agent_name, avatar_dir
        self.jobs = 0

    def load(self) -> float:
        """LiveKit's load: active sessions / capacity; 1.0 (full) until the engine is ready."""
        if self.engine is None:
            return 1.0
        return min(1.0, float(self.engine.load))

    def metadata(self, raw: str) -> dict[str, Any]:
        """The dispatch's JSON metadata, with ``avatar`` resolved inside ``avatar_dir``."""
        try:
            meta = json.loads(raw) if raw else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"dispatch metadata is not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError("dispatch metadata must be a JSON object")
        name = meta.get("avatar")
        if name is not None:
            if self.avatar_dir is None or Path(name).name != name:
                raise ValueError(f"avatar {name!r}: give the file name of a portrait in the "
                                 "worker's --avatar-dir")
            path = self.avatar_dir / name
            if not path.is_file():
                raise ValueError(f"avatar {name!r} is not in {self.avatar_dir}")
            meta["avatar"] = str(path)
        return meta

    async def on_request(self, req: Any) -> None:
        """Accept as the agent's avatar, or reject when full / the request is malformed."""
        from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

        from .livekit import avatar_identity

        try:
            meta = self.metadata(req.job.metadata)
        except ValueError as e:
            log.warning("rejecting job %s: %s", req.id, e)
            await req.reject()
            return
        if self.load() >= 1.0:   # not ready or full: LiveKit offers the job to another worker
            log.info("passing on job %s: %s", req.id, "warming up" if self.engine is None else
                     f"at capacity ({self.engine.capacity} sessions)")
            await req.reject(terminate=False)
            return
        agent = meta.get("agent_identity") or ""
        identity = meta.get("avatar_identity") or avatar_identity(agent or req.id,
                                                                  self.agent_name)
        await req.accept(identity=identity, name="avatar",
                         attributes={ATTRIBUTE_PUBLISH_ON_BEHALF: agent} if agent else None)

    async def entrypoint(self, ctx: Any) -> None:
        """One job: a session fed by the agent's data-stream audio, published into the room."""
        from livekit import rtc
        from livekit.agents import AutoSubscribe
        from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioReceiver

        from .livekit import SessionVideoGenerator, avatar_options

        meta = self.metadata(ctx.job.metadata)
        agent = meta.get("agent_identity") or None
        await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE)   # audio comes as data
        session = await self.engine.open_session(avatar=meta.get("avatar"),
                                                 emotion=meta.get("emotion"))
        self.jobs += 1
        runner = AvatarRunner(ctx.room, audio_recv=DataStreamAudioReceiver(
            ctx.room, sender_identity=agent), video_gen=SessionVideoGenerator(session),
            options=avatar_options(session))

        async def close() -> None:
            await runner.aclose()
            await self.engine.close_session(session.id)

        ctx.add_shutdown_callback(close)
        await runner.start()
        left: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_left(p: rtc.RemoteParticipant) -> None:
            if (agent is None or p.identity == agent) and not left.done():
                left.set_result(None)

        ctx.room.on("participant_disconnected", on_left)
        await left
        ctx.shutdown("the agent left")


class _OwnErrorsFilter(logging.Filter):
    """Drops livekit's traceback for the final connection failure: :func:`serve` reports it as
    one line (retries before it stay visible as livekit's warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Error in _connection_task")


async def serve(cfg: Config, args: argparse.Namespace) -> None:
    """Build the engine, register with LiveKit and serve jobs until stopped.

    Raises:
        RuntimeError: the server could not be reached after ``--max-retry`` attempts.
    """
    try:
        from livekit.agents import AgentServer, JobExecutorType
    except ImportError as e:
        raise ImportError("livekit-worker needs the livekit extra: "
                          f"pip install 'avatar-agent[livekit]' ({e})") from None
    import dataclasses

    from ..engine import Engine
    from ..memory import freeze_startup_heap

    if args.max_sessions is not None:
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(
            cfg.server, max_sessions=args.max_sessions))
    logging.getLogger("livekit.agents").addFilter(_OwnErrorsFilter())
    avatar_dir = Path(args.avatar_dir) if args.avatar_dir else Path(cfg.avatar_path()).parent
    worker = AvatarWorker(None, args.agent_name, avatar_dir)
    server = AgentServer(job_executor_type=JobExecutorType.THREAD, load_fnc=worker.load,
                         load_threshold=args.load_threshold, num_idle_processes=1,
                         max_retry=args.max_retry, ws_url=args.url, api_key=args.api_key,
                         api_secret=args.api_secret, port=args.http_port)
    server.rtc_session(worker.entrypoint, agent_name=args.agent_name, on_request=worker.on_request)

    async def build() -> None:   # models load while the worker registers (reported full till then)
        engine = await asyncio.to_thread(Engine, cfg)
        await engine.warm_up()
        freeze_startup_heap()             # (no full GC pause of ~0.1 s across all sessions)
        worker.engine = engine
        log.info("livekit-worker %r ready: capacity %d sessions", args.agent_name,
                 engine.capacity)

    ready = asyncio.create_task(build(), name="engine")
    run = asyncio.create_task(server.run(devmode=False), name="livekit-worker")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, run.cancel)
    try:
        done, _ = await asyncio.wait({ready, run}, return_when=asyncio.FIRST_EXCEPTION)
        if ready in done:
            ready.result()                       # a model/config error ends the worker
        await run
    except RuntimeError as e:
        if run.done() and not run.cancelled() and run.exception() is e:
            raise RuntimeError(f"cannot register with the LiveKit server at {args.url}: {e}; "
                               "check --url, that the server is running and reachable, and "
                               "the API key/secret") from None
        raise
    except asyncio.CancelledError:
        log.info("livekit-worker stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        ready.cancel()
        run.cancel()
        await server.aclose()
        if worker.engine is not None:    # the jobs (and their sessions) ended with the server
            worker.engine.inference.close()


def run_worker(cfg: Config, args: argparse.Namespace) -> int:
    """``avatar-agent livekit-worker``: returns the exit code (errors raise, the CLI prints them)."""
    check_arguments(args)
    try:
        asyncio.run(serve(cfg, args))
    except KeyboardInterrupt:
        pass
    return 0


__all__ = ["AvatarWorker", "add_arguments", "check_arguments", "run_worker", "serve"]
