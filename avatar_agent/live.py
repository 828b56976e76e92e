"""``avatar-agent start``: one session plus its sinks, the local web server, signals and sd_notify.

Signals: SIGTERM/SIGINT stop (drain, finalise sinks).  SIGHUP reloads the config when the agent
runs as a service (no terminal); in a terminal SIGHUP means the terminal closed, so it stops.

Reload is all-or-nothing: the new config is read and validated and the new portrait decoded
before anything changes; then every section that can change live is applied (avatar, emotion,
motion scales, log level) and the others are named as needing a restart.  Command-line overrides
(``--set``, ``--avatar``) are re-applied on every reload, and an avatar swapped through the API is
kept unless the config's portrait itself changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from .config import Config, load_config

if TYPE_CHECKING:
    from .server.control import ControlSettings
    from .server.security import SecuritySettings
    from .service import Notifier

log = logging.getLogger("avatar_agent")

LIVE_SECTIONS = ("avatar", "motion.expression_scale", "motion.head_scale", "service.log_level",
                 "server.token", "server.cors_origins", "server.max_body_kb",
                 "server.max_upload_mb", "server.request_timeout_s", "server.rate_say_per_min",
                 "server.rate_push_per_min", "server.rate_offer_per_min",
                 "server.rate_interrupt_per_min")
"""What a reload applies without a restart (everything else is named as needing one)."""


async def run_start(cfg: Config, config_path: str | None, overrides: list[str]) -> int:
    """Run the live agent until stopped; returns the exit code (non-zero if a task failed)."""
    from .agent import Agent
    from .clock import SystemClock
    from .memory import freeze_startup_heap
    from .service import Notifier
    from .session import Session
    from .wiring import (make_motion, make_phones, make_renderer, make_sinks, make_source,
                         make_vad)

    if "file" in cfg.sinks.enabled:      # refuse before harm: never overwrite an input
        from .offline import check_output

        inputs = [cfg.avatar_path(), *([cfg.resolve(cfg.audio.file)] if cfg.audio.file else [])]
        check_output(cfg.resolve(cfg.sinks.file), inputs, name="sinks.file =")
    clock = SystemClock()
    notifier = Notifier()
    notifier.status("warming up")
    source = make_source(cfg, clock)
    sinks, webrtc = make_sinks(cfg)
    agent = Agent(cfg, source=source, vad=make_vad(cfg), motion=make_motion(cfg),
                  renderer=make_renderer(cfg), sinks=sinks, clock=clock, notifier=notifier,
                  phones=make_phones(cfg, shared=False))
    session = Session(agent)
    runner = security = None
    if webrtc is not None:
        from .server.app import serve
        from .server.local import make_local_app
        from .server.security import SECURITY_KEY

        app = make_local_app(cfg, session, webrtc)
        security = app[SECURITY_KEY]
        runner = await serve(app, cfg.server.host, cfg.server.port)   # prints the page's URL
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, agent.stop)
    loop.add_signal_handler(signal.SIGINT, agent.stop)
    reloader = Reloader(session, cfg, config_path, overrides, notifier, security)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    loop.add_signal_handler(signal.SIGHUP, agent.stop if interactive else reloader.request)
    try:
        await agent.warm_up()             # (what session.run would do first)
        freeze_startup_heap()             # libraries, models, the portrait: out of full GCs
        async with asyncio.TaskGroup() as tg:
            reloader.tasks = tg
            stdin = None
            if session.agent.marks.from_source and sys.stdin is not None \
                    and not sys.stdin.closed:
                stdin = tg.create_task(_read_stdin(session), name="stdin")
            await session.run()
            if stdin is not None:
                stdin.cancel()
    except BaseException as e:  # a task crashed: the session is over, systemd restarts us
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        log.error("session ended by a failure: %s", _describe(e))
        return 1
    finally:
        if runner is not None:
            await runner.cleanup()
    log.info("stopped: %s", session.agent.player.status_line())
    return 0


class Reloader:
    """SIGHUP → reload the config, all or nothing (see the module docstring)."""

    def __init__(self, session: Any, cfg: Config, config_path: str | None,
                 overrides: list[str], notifier: Any, security: Any = None) -> None:
        self.session, self.cfg, self.security = session, cfg, security
        self.config_path, self.overrides, self.notifier = config_path, overrides, notifier
        self.tasks: asyncio.TaskGroup | None = None
        self._busy = False

    def request(self) -> None:
        """Signal handler: start one reload (a second SIGHUP during it is ignored)."""
        if self._busy or self.tasks is None:
            return
        self._busy = True
        self.tasks.create_task(self.reload(), name="reload")

    async def reload(self) -> list[str]:
        """Apply a reload; returns the changed sections that need a restart."""
        from .face.landmarks import load_portrait

        self.notifier.reloading()
        try:
            new = load_config(self.config_path, self.overrides)
            image = None
            if new.avatar_path() != self.cfg.avatar_path():        # decode before changing anything
                image = await asyncio.to_thread(load_portrait, new.avatar_path())
            from .motion.emotion import emotion_label
            from .server.control import settings_from_config

            emotion_label(new.avatar.emotion)
            _, security = settings_from_config(new)      # e.g. a LAN bind without a token fails
        except Exception as e:
            log.error("reload failed, nothing changed (keeping the running config): %s", e)
            self.notifier.ready("reload failed")
            self._busy = False
            return []
        try:
            s = self.session
            if image is not None:
                await s.agent.set_avatar(image)
                s.avatar_path = str(new.avatar_path())
            s.set_emotion(new.avatar.emotion, new.avatar.intensity)
            s.set_scales(new.motion.expression_scale, new.motion.head_scale)
            if self.security is not None and (new.server.host, new.server.port) == \
                    (self.cfg.server.host, self.cfg.server.port):
                self.security.replace(security)         # a rotated token holds from now on
            logging.getLogger().setLevel(new.service.log_level.upper())
            restart = _needs_restart(self.cfg, new)
            self.cfg = new
            log.info("reloaded config%s", "; these changes need a restart: " + ", ".join(restart)
                     if restart else "")
            return restart
        finally:
            self.notifier.ready("reloaded")
            self._busy = False


def _needs_restart(old: Config, new: Config) -> list[str]:
    out = []
    for f in dataclasses.fields(Config):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name in ("avatar", "source_path") or a == b:
            continue
        if dataclasses.is_dataclass(a):
            for g in dataclasses.fields(a):
                key = f"{f.name}.{g.name}"
                if getattr(a, g.name) != getattr(b, g.name) and key not in LIVE_SECTIONS:
                    out.append(key)
    return out


def _describe(e: BaseException) -> str:
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(_describe(x) for x in e.exceptions)
    return f"{type(e).__name__}: {e}"


async def _read_stdin(session: Any) -> None:
    """Each line typed on stdin is spoken.

    A daemon thread reads stdin: a blocked readline() must never hold up shutdown.
    """
    import threading

    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue(64)   # a person types; 64 lines is plenty

    def put(line: str | None) -> None:
        if not lines.full():                                  # overflow: drop the newest line
            lines.put_nowait(line)

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(put, line)
        loop.call_soon_threadsafe(put, None)

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    print("avatar-agent: type text and press Enter to make the avatar speak it", flush=True)
    while (line := await lines.get()) is not None:
        if line.strip():
            try:
                session.say(line.strip())
            except Exception as e:  # a bad line must not end the reader
                log.error("cannot speak %r: %s", line.strip()[:40], e)


async def run_serve(cfg: Config) -> int:
    """``avatar-agent serve``: the session server until SIGTERM — one engine in this process, or
    with ``server.shards`` > 1 (the embedded profile's default on several cores) the sessions
    spread over that many shard processes behind this one."""
    from .engine import Engine, shard_count
    from .memory import freeze_startup_heap
    from .server.app import serve
    from .server.control import settings_from_config
    from .server.sessions import make_session_app
    from .service import Notifier

    notifier = Notifier()
    notifier.status("warming up")
    control, security = settings_from_config(cfg)
    security = dataclasses.replace(security, public_paths=(*security.public_paths, "/readyz"))
    shards = shard_count(cfg)
    if shards > 1:
        return await _run_sharded(cfg, shards, control, security, notifier)
    engine = Engine(cfg)
    await engine.warm_up()
    freeze_startup_heap()                 # (no full GC pause of ~0.1 s across all sessions)
    runner = await serve(make_session_app(engine, control, security), cfg.server.host,
                         cfg.server.port, page=False)
    stop = _stop_on_signals()
    notifier.ready(f"serving sessions (capacity {engine.capacity})")
    log.info("session server ready: capacity %d sessions (measured %.3f of a core each)",
             engine.capacity, engine.per_session_load)
    try:
        await _serve_until(stop, notifier)
    finally:
        notifier.stopping()
        await runner.cleanup()
        notifier.close()
    return 0


async def _run_sharded(cfg: Config, shards: int, control: ControlSettings,
                       security: SecuritySettings, notifier: Notifier) -> int:
    """The sharded session server: start the shards, serve the public API, restart shards that
    die; exit 1 when a shard cannot be started at all."""
    from .cli import journal_logs
    from .server.app import serve
    from .server.shards import ShardError, ShardPool, make_sharded_app

    pool = ShardPool(cfg, shards, journal=journal_logs(cfg))
    log.info("starting %d shard processes", shards)
    try:
        await pool.start()            # ShardError (a RuntimeError): the CLI prints it, exits 1
    except BaseException:
        notifier.close()
        raise
    runner = await serve(make_sharded_app(pool, control, security), cfg.server.host,
                         cfg.server.port, page=False)
    stop = _stop_on_signals()
    stop_waiter = asyncio.create_task(stop.wait())
    stop_waiter.add_done_callback(lambda _: pool.stopping.set())   # shard exits are expected now
    notifier.ready(f"serving sessions on {shards} shards")
    log.info("session server ready on %d shards (pids %s)", shards,
             ", ".join(str(s.pid) for s in pool.shards))
    code = 0
    try:
        async with asyncio.TaskGroup() as tg:
            supervisor = tg.create_task(pool.supervise(), name="shard-supervisor")
            await _serve_until(stop, notifier, supervisor)
            supervisor.cancel()
    except* ShardError as eg:
        first: BaseException = eg
        while isinstance(first, BaseExceptionGroup):       # (task groups nest)
            first = first.exceptions[0]
        log.error("%s", first)
        code = 1
    finally:
        stop_waiter.cancel()
        notifier.stopping()
        await runner.cleanup()
        await pool.stop()
        notifier.close()
    return code


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve_until(stop: asyncio.Event, notifier: Notifier,
                       task: asyncio.Task[None] | None = None) -> None:
    """Feed the watchdog every second until ``stop`` is set (or ``task`` ends)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set() and (task is None or not task.done()):
        await _tick(stop)
        notifier.watchdog(loop.time())


async def _tick(stop: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=1.0)
    except TimeoutError:
        pass
