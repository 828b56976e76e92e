"""Pipe source: raw s16le PCM from stdin, a Unix socket we listen on, or a connected socket.

The producer sets the pace; the rate and channel count come from configuration because raw PCM
carries no header.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import sys
from pathlib import Path
from typing import AsyncIterator, BinaryIO

import numpy as np

from avatar_agent.audio.resample import Framer, StreamResampler
from avatar_agent.types import AudioFrame

log = logging.getLogger(__name__)

_READ = 8192


class PipeSource:
    """Raw little-endian int16 PCM → 16 kHz mono frames (implements AudioSource).

    Input modes (``path``):
      * None or ``"-"``: standard input; the source ends at EOF.
      * a filesystem path: a Unix stream socket is created there and listened on; producers may
        connect one after another (the timeline simply continues); ends only on close().
      * a connected ``socket.socket`` (e.g. one end of ``socket.socketpair()``); ends at EOF.
      * a binary file object (read in a worker thread); ends at EOF.

    Attributes:
        bytes_in: bytes received so far.
        connections: producers that connected (socket-path mode).
    """

    def __init__(self, rate: int = 16000, channels: int = 1,
                 path: str | os.PathLike[str] | socket.socket | BinaryIO | None = None, *,
                 clock: object | None = None) -> None:
        """
        Args:
            rate: sample rate of the incoming PCM (raw PCM has no header).
            channels: interleaved channel count of the incoming PCM (downmixed to mono).
            path: where the PCM comes from (see the class docstring).
            clock: accepted for a uniform source interface; unused, the producer sets the pace.
        """
        del clock
        if not isinstance(rate, int) or rate <= 0:
            raise ValueError(f"pipe sample rate {rate!r} must be a positive integer (Hz); raw PCM "
                             "has no header, so set audio.pipe_rate to the producer's rate")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"pipe channel count {channels!r} must be ≥ 1 (audio.pipe_channels)")
        self.rate = rate
        self.channels = channels
        self.path = path
        self.bytes_in = 0
        self.connections = 0
        self._closed = False
        self._server: asyncio.AbstractServer | None = None
        self._conns: asyncio.Queue[asyncio.StreamReader | None] = asyncio.Queue()
        self._writers: list[asyncio.StreamWriter] = []
        self._socket_path: Path | None = None
        self._transport: asyncio.BaseTransport | None = None

    # ------------------------------------------------------------------ byte sources

    async def _chunks(self) -> AsyncIterator[bytes]:
        s = self.path
        if s is None or s == "-":
            async for b in self._from_file_like(sys.stdin.buffer):
                yield b
        elif isinstance(s, socket.socket):
            reader, writer = await asyncio.open_connection(sock=s)
            self._writers.append(writer)
            async for b in self._from_reader(reader):
                yield b
        elif isinstance(s, (str, os.PathLike)):
            await self._listen(Path(s))
            while not self._closed:
                conn = await self._conns.get()
                if conn is None:
                    break
                async for b in self._from_reader(conn):
                    yield b
                log.info("pipe: producer disconnected from %s; waiting for the next one", s)
        else:
            async for b in self._from_file_like(s):
                yield b

    async def _from_reader(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while not self._closed:
            b = await reader.read(_READ)
            if not b:
                return
            yield b

    async def _from_file_like(self, f: BinaryIO) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        try:
            mode = os.fstat(f.fileno()).st_mode
            pollable = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)
        except (OSError, ValueError, AttributeError):
            pollable = False
        if pollable:
            # Pipes, sockets, ttys: event-driven reads, so close() never waits on a blocked thread.
            reader = asyncio.StreamReader()
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), f)
            self._transport = transport
            try:
                async for b in self._from_reader(reader):
                    yield b
            finally:
                transport.close()
        else:
            # Regular files cannot be polled, but their reads never block for long.
            read = getattr(f, "read1", f.read)
            while not self._closed:
                b = await asyncio.to_thread(read, _READ)
                if not b:
                    return
                yield b

    async def _listen(self, path: Path) -> None:
        _remove_stale_socket(path)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)
            await self._conns.put(reader)

        self._server = await asyncio.start_unix_server(on_connect, path=str(path))
        self._socket_path = path
        log.info("pipe: listening for s16le PCM (%d Hz, %d ch) on %s", self.rate, self.channels,
                 path)

    # ------------------------------------------------------------------ AudioSource

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Yield frames as PCM arrives; ends at EOF (stdin / socket object) or on close()."""
        framer = Framer()
        resampler = StreamResampler(self.rate, self.channels, name="pipe")
        frame_bytes = 2 * self.channels
        rest = b""
        try:
            async for b in self._chunks():
                self.bytes_in += len(b)
                data = rest + b
                usable = len(data) - len(data) % frame_bytes
                rest = data[usable:]
                if not usable:
                    continue
                pcm = np.frombuffer(data[:usable], dtype="<i2")
                for f in framer.push(resampler.process(pcm)):
                    yield f
            if rest:
                log.warning("pipe: %d trailing byte(s) did not form a whole sample; dropped",
                            len(rest))
            for f in framer.push(resampler.flush()) + framer.flush(pad=True):
                yield f
        finally:
            await self._cleanup()

    async def close(self) -> None:
        """Stop reading; a running ``frames()`` ends."""
        self._closed = True
        self._conns.put_nowait(None)
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for w in self._writers:
            w.close()
        self._writers.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._socket_path is not None:
            try:
                self._socket_path.unlink()
            except FileNotFoundError:
                pass
            self._socket_path = None


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket left at ``path`` by an earlier run; refuse to touch anything else.

    Synchronous on purpose: a few stat calls on a local path, once at start-up.
    """
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ValueError(f"pipe socket path {str(path)!r} exists and is not a socket; "
                             "choose another audio.pipe_path")
        path.unlink()  # a stale socket from an earlier run
