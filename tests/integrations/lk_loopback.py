"""Two LiveKit rooms joined back to back in memory: the network boundary of the remote-avatar tests.

No LiveKit server can run here.  These stand-ins implement just the room surface that
livekit-agents' data-stream audio path uses (RPC, byte streams, participants, track publishing),
so the agent side's real ``DataStreamAudioOutput`` talks to the worker side's real
``DataStreamAudioReceiver`` + ``AvatarRunner`` + our generator, with bytes and RPC payloads
passing exactly as they would through the SFU (minus the network).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, Awaitable, Callable

from livekit import rtc
from livekit.rtc.data_stream import ByteStreamInfo

_ids = itertools.count(1)


class Peer:
    """How one room sees the other's participant."""

    def __init__(self, identity: str, kind: int, attributes: dict[str, str] | None = None) -> None:
        self.identity, self.kind = identity, kind
        self.attributes = dict(attributes or {})
        self.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self.track_publications: dict[str, Any] = {}
        self.sid = f"PA_{identity}"


class LoopbackRoom(rtc.EventEmitter):
    """One side; :func:`pair` connects two."""

    def __init__(self, name: str, identity: str, kind: int, attributes: dict | None = None) -> None:
        super().__init__()
        self.name = name
        self.local_participant = _Local(self, identity, kind, attributes)
        self.remote_participants: dict[str, Peer] = {}
        self.peer: LoopbackRoom | None = None
        self._byte_handlers: dict[str, Callable[[Any, str], None]] = {}

    def isconnected(self) -> bool:
        return True

    def register_byte_stream_handler(self, topic: str, handler: Callable[[Any, str], None]) -> None:
        self._byte_handlers[topic] = handler

    def leave(self) -> None:
        """This side's participant leaves: the other room sees it disconnect."""
        other = self.peer
        assert other is not None
        p = other.remote_participants.pop(self.local_participant.identity)
        other.emit("participant_disconnected", p)


def pair(a: LoopbackRoom, b: LoopbackRoom) -> None:
    """Put each room's local participant into the other room."""
    for x, y in ((a, b), (b, a)):
        x.peer = y
        lp = y.local_participant
        x.remote_participants[lp.identity] = Peer(lp.identity, lp.kind, lp.attributes)


class _Local:
    def __init__(self, room: LoopbackRoom, identity: str, kind: int, attributes: dict | None
                 ) -> None:
        self.room, self.identity, self.kind = room, identity, kind
        self.attributes = dict(attributes or {})
        self._rpc_handlers: dict[str, Callable[[rtc.RpcInvocationData], Any]] = {}
        self.published: list[str] = []

    def register_rpc_method(self, method: str, handler: Callable[..., Any]) -> None:
        self._rpc_handlers[method] = handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float = 10.0) -> str:
        peer = self.room.peer
        assert peer is not None and peer.local_participant.identity == destination_identity
        handler = peer.local_participant._rpc_handlers.get(method)
        if handler is None:                     # what the SFU answers for an unknown method
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, "Method not supported")
        out = handler(rtc.RpcInvocationData(request_id=str(next(_ids)),
                                            caller_identity=self.identity, payload=payload,
                                            response_timeout=response_timeout, method=method))
        if isinstance(out, Awaitable):
            out = await out
        return out

    async def stream_bytes(self, *, name: str, topic: str, destination_identities: list[str],
                           attributes: dict[str, str], **_: Any) -> "_Writer":
        peer = self.room.peer
        assert peer is not None
        reader = _Reader(ByteStreamInfo(stream_id=f"ST_{next(_ids)}", mime_type="", topic=topic,
                                        timestamp=int(time.time() * 1000), size=None,
                                        attributes=attributes, name=name))
        peer._byte_handlers[topic](reader, self.identity)
        return _Writer(reader)

    async def publish_track(self, track: Any, options: Any) -> "_Publication":
        self.published.append(track.name)
        peer = self.room.peer
        assert peer is not None
        me = peer.remote_participants[self.identity]
        pub = _Publication(track.kind, track.name)
        me.track_publications[pub.sid] = pub
        peer.emit("track_published", pub, me)
        return pub


class _Reader:
    def __init__(self, info: ByteStreamInfo) -> None:
        self.info = info
        self._q: asyncio.Queue[bytes | None] = asyncio.Queue()

    def __aiter__(self) -> "_Reader":
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._q.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _Writer:
    def __init__(self, reader: _Reader) -> None:
        self._reader = reader

    async def write(self, data: bytes) -> None:
        self._reader._q.put_nowait(bytes(data))

    async def aclose(self) -> None:
        self._reader._q.put_nowait(None)


class _Publication:
    def __init__(self, kind: int, name: str) -> None:
        self.kind, self.name, self.sid = kind, name, f"TR_{next(_ids)}"
        self.subscribed, self.track = True, None

    async def wait_for_subscription(self) -> None:
        return None


class JobContextStandIn:
    """The part of ``livekit.agents.JobContext`` the worker's entrypoint uses."""

    def __init__(self, room: LoopbackRoom, metadata: str) -> None:
        from livekit.protocol import agent

        self.room = room
        self.job = agent.Job(id="AJ_loopback", metadata=metadata)
        self._callbacks: list[Callable[[], Awaitable[None]]] = []
        self.shutdown_reason: str | None = None
        self.closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def connect(self, **_: Any) -> None:
        return None

    def add_shutdown_callback(self, cb: Callable[[], Awaitable[None]]) -> None:
        self._callbacks.append(cb)

    def shutdown(self, reason: str = "") -> None:
        self.shutdown_reason = reason

        async def run() -> None:
            for cb in self._callbacks:
                await cb()
            self.closed.set()

        self._task = asyncio.get_running_loop().create_task(run())
