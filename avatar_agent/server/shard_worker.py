"""One shard of the session server, in a process of its own.

Started by :class:`~avatar_agent.server.shards.ShardPool` as
``python -m avatar_agent.server.shard_worker --ready-fd N``, never by hand.  The parent writes one
JSON line to the shard's stdin (:class:`Hello`) and keeps stdin open: end of file means the parent
is gone, and the shard then closes its sessions and exits, so no shard outlives its server.

The shard runs an :class:`~avatar_agent.engine.Engine` and the session API on a loopback port of
its own, which only the parent may call (a random bearer token).  Once warm it writes
``{"port": P}`` to the ready pipe.  Its logs go where the parent's go, each line naming the shard.
Rate limits and CORS are the parent's: every request here comes from the parent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import asdict, dataclass

log = logging.getLogger("avatar_agent.server.shard_worker")   # (run as __main__)


@dataclass(frozen=True)
class Hello:
    """What the parent tells a shard (one JSON line on its stdin)."""

    config: str
    """The parent's configuration as TOML (:func:`~avatar_agent.config.to_toml`)."""
    source_path: str
    """The parent's config file (relative paths resolve against it)."""
    index: int
    count: int
    token: str
    """The bearer token the parent sends; no one else can call the shard."""
    log_format: str
    """The parent's resolved log format ("journal" or "plain")."""

    def line(self) -> bytes:
        """The JSON line."""
        return (json.dumps(asdict(self)) + "\n").encode()


class _Named(logging.Filter):
    """Prefixes every record with the shard's name (the journal holds all shards' lines)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.prefix = f"{name}: "

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


class _ReadyPipe:
    """The pipe to the parent: one JSON line, ``{"port": P}`` once serving or ``{"error": msg}``
    when the shard cannot start (the parent reports it as one line, as ``serve`` would)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, msg: dict[str, object]) -> None:
        """Write the line and close the pipe (once)."""
        if self.fd is None:
            return
        os.write(self.fd, json.dumps(msg).encode() + b"\n")
        os.close(self.fd)
        self.fd = None


async def _serve(hello: Hello, ready: _ReadyPipe) -> int:
    import dataclasses

    from ..config import config_from_toml
    from ..engine import Engine, Shard
    from ..memory import freeze_startup_heap
    from .app import serve
    from .control import settings_from_config
    from .sessions import make_session_app

    cfg = config_from_toml(hello.config, hello.source_path)
    engine = Engine(cfg, shard=Shard(hello.index, hello.count))
    await engine.warm_up()
    freeze_startup_heap()
    control, public = settings_from_config(cfg)
    # The parent enforced origins, rate limits and the client's token; here only the parent's
    # token counts, and every route but /healthz needs it.
    security = dataclasses.replace(public, host="127.0.0.1", token=hello.token, cors_origins=(),
                                   rate_limits={}, rate_limited_paths={})
    runner = await serve(make_session_app(engine, control, security, limit_opens=False),
                         "127.0.0.1", 0, page=False, announce=False)
    port = runner.addresses[0][1]
    ready.send({"port": port, "pid": os.getpid()})
    log.info("ready on 127.0.0.1:%d (capacity %d)", port, engine.capacity)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    parent_gone = asyncio.create_task(stdin.read())          # returns at end of file
    parent_gone.add_done_callback(lambda _: stop.set())
    try:
        await stop.wait()
        if parent_gone.done():
            log.warning("the parent server is gone: closing this shard's sessions")
    finally:
        parent_gone.cancel()
        await runner.cleanup()           # drains and closes every session, then the engine
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of a shard process."""
    p = argparse.ArgumentParser(prog="avatar_agent.server.shard_worker")
    p.add_argument("--ready-fd", type=int, required=True)
    args = p.parse_args(argv)
    hello = Hello(**json.loads(sys.stdin.buffer.readline()))

    from ..cli import setup_logging
    from ..config import config_from_toml
    from ..memory import keep_memory_flat

    cfg = config_from_toml(hello.config, hello.source_path)
    setup_logging(cfg, journal=hello.log_format == "journal")
    named = _Named(f"shard {hello.index}")
    for h in logging.getLogger().handlers:
        h.addFilter(named)
    keep_memory_flat()
    ready = _ReadyPipe(args.ready_fd)
    try:
        return asyncio.run(_serve(hello, ready))
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as e:
        # what `serve` reports as one line (a bad portrait, a missing model…): no traceback
        from ..cli import _os_error_line

        msg = _os_error_line(e) if isinstance(e, OSError) and not isinstance(
            e, FileNotFoundError) else str(e)
        try:
            if ready.fd is None:
                raise BrokenPipeError
            ready.send({"error": msg})
        except OSError:                   # serving already, or the parent is gone: log it
            log.error("%s", msg)
        return 1


if __name__ == "__main__":
    sys.exit(main())
