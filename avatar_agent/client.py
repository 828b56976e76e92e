"""Python client for a running agent's control API (see :mod:`avatar_agent.server.control`).

:class:`AsyncAvatarClient` is the client (asyncio, aiohttp; server-sent events parsed by
``aiohttp-sse-client2``); :class:`AvatarClient` offers the same calls blocking, for scripts and
bots, by running them on a private event loop in a background thread::

      c = AvatarClient("http://127.0.0.1:8080", token=None)
      uid = c.say("Hello! I am your avatar.")
      for ev in c.events(types=["speech_finished"]):
          if ev.data["utterance"] == uid:
              break

Only the async client streams PCM over a WebSocket::

      async with AsyncAvatarClient(url) as c:
          async with c.audio_stream(rate=48000) as s:
              await s.send(pcm_bytes)          # as the audio is produced
          print(s.utterance)

Errors from the server raise :class:`ApiError` (status, message, retry_after).
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import (Any, AsyncGenerator, AsyncIterator, Callable, Concatenate, Coroutine, Generic, Iterable,
                    Iterator, ParamSpec, TypeVar)

import numpy as np

from .audio.resample import PCM_FORMATS

P = ParamSpec("P")
R = TypeVar("R")


class ApiError(RuntimeError):
    """The server refused a request.

    Attributes:
        status: HTTP status (400 bad input, 401 token, 403 forbidden, 413 too large,
            429 rate limited, 503 queue full, ...).
        message: the server's error text.
        retry_after: seconds to wait before retrying (429/503), when the server said so.
    """

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Event:
    """One server event.

    Attributes:
        kind: speech_started, speech_finished, frame_stats, avatar_ready, ...
        data: its fields.
        id: the server's sequence number (None if not given).
    """

    kind: str
    data: dict[str, Any]
    id: int | None = None


def audio_payload(audio: np.ndarray | bytes | str | Path, rate: int = 16000, channels: int = 1,
                  format: str = "s16le") -> tuple[bytes, dict[str, str], str]:
    """Body, query and content type for POST /api/audio.

    ``audio`` may be a WAV/PCM file path, WAV bytes, raw PCM bytes (described by rate, channels,
    format) or a numpy array ([n] or [n, channels]; int16 → s16le, int32 → s32le, uint8 → u8,
    floats → f32le).
    """
    if isinstance(audio, (str, Path)):
        audio = Path(audio).read_bytes()
    if isinstance(audio, np.ndarray):
        a = audio
        if a.ndim == 2:
            channels = a.shape[1]
        elif a.ndim != 1:
            raise ValueError(f"audio array shape {a.shape}: expected [n] or [n, channels]")
        # The wire format of the array's own dtype; other dtypes (float64, ...) go as f32le.
        format = next((f for f, dt in PCM_FORMATS.items()
                       if np.dtype(dt).newbyteorder("=") == a.dtype.newbyteorder("=")), "f32le")
        audio = np.ascontiguousarray(a, dtype=PCM_FORMATS[format]).tobytes()
    if not isinstance(audio, (bytes, bytearray)):
        raise TypeError("audio must be a numpy array, bytes or a file path")
    if bytes(audio[:4]) == b"RIFF" and bytes(audio[8:12]) == b"WAVE":
        return bytes(audio), {}, "audio/wav"
    return bytes(audio), {"rate": str(int(rate)), "channels": str(int(channels)),
                          "format": format}, "application/octet-stream"


def _error_of(status: int, body: bytes, headers: Any) -> ApiError:
    try:
        msg = json.loads(body.decode("utf-8", "replace")).get("error", "")
    except (ValueError, AttributeError):
        msg = ""
    msg = msg or body.decode("utf-8", "replace")[:200] or f"HTTP {status}"
    ra = headers.get("Retry-After") if headers is not None else None
    try:
        retry = float(ra) if ra is not None else None
    except ValueError:
        retry = None
    return ApiError(status, msg, retry)


async def _raise_api_error(r: Any) -> None:
    """aiohttp ``raise_for_status`` hook: a 4xx/5xx answer becomes :class:`ApiError`."""
    if r.status >= 400:
        raise _error_of(r.status, await r.read(), r.headers)


def _event_body(kind: str | None, data: str, id_: str | None) -> Event:
    try:
        payload = json.loads(data) if data else {}
    except ValueError:
        payload = {"raw": data}
    try:
        ident = int(id_) if id_ else None
    except ValueError:
        ident = None
    return Event(kind or "message", payload if isinstance(payload, dict) else {"value": payload},
                 ident)


class AudioStream:
    """An open WebSocket PCM stream (from :meth:`AsyncAvatarClient.audio_stream`)."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self.utterance: int | None = None
        self.errors: list[str] = []
        self.duration_s: float | None = None
        # One reader task takes the server's messages (accepted id, errors, finished) as they
        # come, so send() never waits on them.
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        import aiohttp

        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            m = json.loads(msg.data)
            if m.get("type") == "accepted":
                self.utterance = m["utterance"]
            elif m.get("type") == "error":
                self.errors.append(m.get("error", ""))
            elif m.get("type") == "finished":
                self.duration_s = m.get("duration_s")
                if m.get("utterance") is not None:
                    self.utterance = m["utterance"]

    async def send(self, pcm: bytes | np.ndarray) -> None:
        """Send PCM in the format declared when the stream was opened (arrays are converted:
        float → f32le, int16 → s16le; declare the matching format)."""
        if self._ws.closed:
            raise ApiError(400, "; ".join(self.errors) or "the audio stream is closed")
        if isinstance(pcm, np.ndarray):
            pcm = pcm.astype(pcm.dtype.newbyteorder("<"), copy=False).tobytes()
        await self._ws.send_bytes(bytes(pcm))

    # A bound on the wait for the server's closing reply, not a deadline for the caller's
    # work: on expiry the reader is cancelled and whatever arrived is returned.
    async def finish(self, timeout: float = 30.0) -> int | None:  # noqa: ASYNC109
        """End the utterance (what was sent plays out); returns its id."""
        if not self._ws.closed:
            await self._ws.send_str(json.dumps({"final": True}))
        try:
            await asyncio.wait_for(self._reader, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            self._reader.cancel()
        if self.errors and self.utterance is None:
            raise ApiError(400, "; ".join(self.errors))
        return self.utterance


class AsyncAvatarClient:
    """asyncio client (aiohttp).  Use as ``async with AsyncAvatarClient(url) as c: ...``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None,
                 timeout: float = 30.0, prefix: str = "/api") -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.prefix = prefix
        """Path of the control routes: "/api" (``start``) or "/v1/sessions/<id>" (a session)."""
        self._session: Any = None
        self._shared = False
        self.session: dict[str, Any] = {}
        """For a session's client: the server's answer to POST /v1/sessions."""

    async def __aenter__(self) -> "AsyncAvatarClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (not one borrowed from the client that opened this session)."""
        if self._session is not None and not self._shared:
            await self._session.close()
            self._session = None

    def _get_session(self) -> Any:
        import aiohttp

        if self._session is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=None,
                                                               sock_connect=self.timeout))
        return self._session

    async def request(self, method: str, path: str, body: Any = None, *,
                      data: bytes | None = None, content_type: str | None = None,
                      query: dict[str, str] | None = None) -> Any:
        """One API call; JSON in (``body``) or raw bytes (``data``), JSON out."""
        import aiohttp

        headers = {"Content-Type": content_type} if content_type else {}
        kw: dict[str, Any] = {"json": body} if body is not None else {"data": data}
        async with self._get_session().request(
                method, self.base_url + path, params=query, headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                raise_for_status=_raise_api_error, **kw) as r:
            raw = await r.read()
            return json.loads(raw) if raw else {}

    async def open_session(self, avatar: str | None = None, emotion: str | None = None,
                           voice: str | None = None) -> "AsyncAvatarClient":
        """Open a session on a session server (``avatar-agent serve``); returns its client
        (sharing this one's HTTP connection pool; ``.session`` holds the server's answer).

        Raises ApiError 503 (``retry_after`` set) when the server is at capacity."""
        body = {k: v for k, v in (("avatar", avatar), ("emotion", emotion), ("voice", voice)) if v}
        info = await self.request("POST", "/v1/sessions", body)
        c = AsyncAvatarClient(self.base_url, self.token, self.timeout,
                              f"/v1/sessions/{info['id']}")
        c._session, c._shared, c.session = self._get_session(), True, info
        return c

    async def close_session(self) -> None:
        """Close the session this client drives (a client from :meth:`open_session`)."""
        await self.request("DELETE", self.prefix)

    async def say(self, text: str, voice: str | None = None, emotion: str | None = None) -> int:
        """Speak ``text``; returns the utterance id."""
        body: dict[str, Any] = {"text": text}
        if voice:
            body["voice"] = voice
        if emotion:
            body["emotion"] = emotion
        return int((await self.request("POST", self.prefix + "/say", body))["utterance"])

    async def push_audio(self, audio: np.ndarray | bytes | str | Path, rate: int = 16000,
                         channels: int = 1, format: str = "s16le") -> dict[str, Any]:
        """Upload speech (see :func:`audio_payload`)."""
        data, query, ctype = audio_payload(audio, rate, channels, format)
        return await self.request("POST", self.prefix + "/audio", data=data, content_type=ctype,
                                  query=query)

    async def interrupt(self) -> dict[str, Any]:
        """Drop queued speech now."""
        return await self.request("POST", self.prefix + "/interrupt", data=b"")

    async def set_emotion(self, name: str, intensity: float | None = None) -> None:
        """Set the emotion class (and intensity 0..1)."""
        body: dict[str, Any] = {"name": name}
        if intensity is not None:
            body["intensity"] = intensity
        await self.request("POST", self.prefix + "/emotion", body)

    async def set_scales(self, expression: float | None = None, head: float | None = None
                         ) -> None:
        """Multiply expression / head motion."""
        body = {k: v for k, v in (("expression", expression), ("head", head)) if v is not None}
        await self.request("POST", self.prefix + "/scales", body)

    async def set_gaze(self, x: float, y: float) -> None:
        """Gaze direction, each axis -1..1."""
        await self.request("POST", self.prefix + "/gaze", {"x": x, "y": y})

    async def swap_avatar(self, path: str, wait: bool = False) -> dict[str, Any]:
        """Switch to another portrait."""
        return await self.request("POST", self.prefix + "/avatar", {"path": str(path), "wait": wait})

    async def status(self) -> dict[str, Any]:
        """The agent's statistics."""
        return await self.request("GET", self.prefix + "/status")

    async def openapi(self) -> dict[str, Any]:
        """The API's OpenAPI document."""
        doc = "/v1/openapi.json" if self.prefix.startswith("/v1/") else self.prefix + "/openapi.json"
        return await self.request("GET", doc)

    def audio_stream(self, rate: int = 16000, channels: int = 1, format: str = "s16le"
                     ) -> "_StreamContext":
        """``async with c.audio_stream(48000) as s: await s.send(pcm)`` — one utterance streamed
        over a WebSocket; leaving the block finishes it."""
        return _StreamContext(self, rate, channels, format)

    async def stream_audio(self, blocks: Iterable[bytes | np.ndarray], rate: int = 16000,
                           channels: int = 1, format: str = "s16le") -> int | None:
        """Stream all ``blocks`` as one utterance; returns its id."""
        async with self.audio_stream(rate, channels, format) as s:
            for b in blocks:
                await s.send(b)
        return s.utterance

    async def events(self, types: Iterable[str] | None = None, websocket: bool = False,
                     read_timeout: float | None = None) -> AsyncGenerator[Event, None]:
        """Events as they come, over SSE (default) or the WebSocket endpoint.

        Args:
            types: only these kinds (e.g. ["speech_finished"]).
            websocket: use /events/ws instead of server-sent events.
            read_timeout: seconds without a byte from the server before ``TimeoutError`` (the
                server pings every 15 s, so keep it above that; None: wait for ever).

        Server-sent events follow EventSource rules: a stream the server closes is reopened
        after the server's ``retry`` hint; the iteration ends when it cannot be (the server is
        gone).  A refusal raises :class:`ApiError`.
        """
        import aiohttp
        from aiohttp_sse_client2.client import EventSource

        params = {"types": ",".join(types)} if types else None
        session = self._get_session()
        if websocket:
            async with session.ws_connect(self.base_url + self.prefix + "/events/ws",
                                          params=params, receive_timeout=read_timeout) as ws:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    m = json.loads(msg.data)
                    yield Event(m.get("type", "message"), m.get("data") or {}, m.get("id"))
            return
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                        sock_read=read_timeout)
        # max_connect_retry=0: a server that cannot be reached is an error now, not after
        # minutes of backed-off retries.
        async with EventSource(self.base_url + self.prefix + "/events", session=session,
                               max_connect_retry=0, params=params, timeout=timeout,
                               raise_for_status=_raise_api_error) as source:
            try:
                async for msg in source:
                    yield _event_body(msg.type, msg.data, msg.last_event_id)
            except TimeoutError:                  # (aiohttp's is a ClientConnectionError too)
                raise
            except aiohttp.ClientConnectionError:
                return                            # closed, and the server is gone


class _StreamContext:
    def __init__(self, client: AsyncAvatarClient, rate: int, channels: int, format: str) -> None:
        self.client, self.header = client, {"rate": int(rate), "channels": int(channels),
                                            "format": format}
        self.ws: Any = None
        self.stream: AudioStream | None = None

    async def __aenter__(self) -> AudioStream:
        import aiohttp

        try:
            self.ws = await self.client._get_session().ws_connect(
                self.client.base_url + self.client.prefix + "/audio/ws")
        except aiohttp.WSServerHandshakeError as e:
            raise ApiError(e.status, e.message or "WebSocket refused") from None
        await self.ws.send_str(json.dumps(self.header))
        msg = await self.ws.receive(timeout=self.client.timeout)
        m = json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else {}
        if m.get("type") != "ready":
            await self.ws.close()
            raise ApiError(400, m.get("error", "audio stream refused"))
        self.stream = AudioStream(self.ws)
        return self.stream

    async def __aexit__(self, *exc: Any) -> None:
        assert self.stream is not None
        try:
            if exc[0] is None:
                await self.stream.finish()
        finally:
            await self.ws.close()
            self.stream._reader.cancel()


# ------------------------------------------------------------------------------------------------
# The blocking client: the async one on a private event loop
# ------------------------------------------------------------------------------------------------

class _Loop:
    """One event loop on a daemon thread, shared by every :class:`AvatarClient` (started on
    first use; it idles between calls)."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, coro: Coroutine[Any, Any, R], timeout: float | None = None) -> R:
        """Run ``coro`` on the loop and wait for its result (its exception is raised here)."""
        with cls._lock:
            if cls._loop is None:
                cls._loop = asyncio.new_event_loop()
                threading.Thread(target=cls._loop.run_forever, name="avatar-client",
                                 daemon=True).start()
            loop = cls._loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


class _Blocking(Generic[P, R]):
    """``AsyncAvatarClient.<name>`` as a blocking method of :class:`AvatarClient` (same
    arguments, result and docstring)."""

    def __init__(self, fn: Callable[Concatenate[AsyncAvatarClient, P], Coroutine[Any, Any, R]]
                 ) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj: AvatarClient | None, owner: type) -> Callable[P, R]:
        if obj is None:
            return self                           # type: ignore[return-value]  # class access
        fn, client = self.fn, obj.aio

        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            return _Loop.run(fn(client, *args, **kwargs))

        return call


async def _anext(it: AsyncIterator[Event]) -> Event:
    return await it.__anext__()


class AvatarClient:
    """Blocking client: each call runs :class:`AsyncAvatarClient`'s on a private event loop.

    Safe to use from several threads at once (e.g. one following :meth:`events` while another
    speaks).  Close it (or use ``with``) to release its connections; a forgotten one is closed
    when it is garbage-collected or the program exits.

    Args:
        base_url: the agent's server, e.g. "http://127.0.0.1:8080".
        token: bearer token when the server requires one (server.token).
        timeout: seconds per request.
        prefix: path of the control routes: "/api" (``start``) or "/v1/sessions/<id>".
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None,
                 timeout: float = 30.0, prefix: str = "/api", *,
                 aio: AsyncAvatarClient | None = None) -> None:
        self.aio = aio or AsyncAvatarClient(base_url, token, timeout, prefix)
        """The async client doing the work (its HTTP session lives on the private loop)."""
        self._parent: AvatarClient | None = None
        weakref.finalize(self, _close_quietly, self.aio)

    def __enter__(self) -> AvatarClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        """The server's URL."""
        return self.aio.base_url

    @property
    def prefix(self) -> str:
        """Path of the control routes."""
        return self.aio.prefix

    @property
    def session(self) -> dict[str, Any]:
        """For a session's client: the server's answer to POST /v1/sessions."""
        return self.aio.session

    def close(self) -> None:
        """Close the HTTP connections (not ones shared with the client that opened a session)."""
        _Loop.run(self.aio.close())

    request = _Blocking(AsyncAvatarClient.request)
    close_session = _Blocking(AsyncAvatarClient.close_session)
    say = _Blocking(AsyncAvatarClient.say)
    push_audio = _Blocking(AsyncAvatarClient.push_audio)
    interrupt = _Blocking(AsyncAvatarClient.interrupt)
    set_emotion = _Blocking(AsyncAvatarClient.set_emotion)
    set_scales = _Blocking(AsyncAvatarClient.set_scales)
    set_gaze = _Blocking(AsyncAvatarClient.set_gaze)
    swap_avatar = _Blocking(AsyncAvatarClient.swap_avatar)
    status = _Blocking(AsyncAvatarClient.status)
    openapi = _Blocking(AsyncAvatarClient.openapi)

    def open_session(self, avatar: str | None = None, emotion: str | None = None,
                     voice: str | None = None) -> AvatarClient:
        """Open a session on a session server (``avatar-agent serve``); returns its client
        (``.session`` holds the server's answer: id, WHEP and audio URLs).

        Raises ApiError 503 (``retry_after`` set) when the server is at capacity."""
        child = AvatarClient(aio=_Loop.run(self.aio.open_session(avatar, emotion, voice)))
        child._parent = self                      # it borrows our connections: keep them open
        return child

    def events(self, types: Iterable[str] | None = None, timeout: float | None = None
               ) -> Iterator[Event]:
        """Server-sent events, as they come (close the iterator to disconnect).

        Args:
            types: only these kinds (e.g. ["speech_finished"]).
            timeout: seconds without a byte from the server before ``TimeoutError`` (None: the
                client's timeout; the server pings every 15 s, so keep it above that).
        """
        it = self.aio.events(types, read_timeout=timeout or self.aio.timeout)
        try:
            while True:
                try:
                    ev = _Loop.run(_anext(it))
                except StopAsyncIteration:
                    return
                yield ev
        finally:
            _Loop.run(it.aclose())


def _close_quietly(client: AsyncAvatarClient) -> None:
    try:
        _Loop.run(client.close(), timeout=5)
    except Exception:  # the loop may be gone at interpreter exit; nothing is left to release
        pass


__all__ = ["AvatarClient", "AsyncAvatarClient", "AudioStream", "ApiError", "Event",
           "audio_payload"]
