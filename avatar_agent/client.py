"""Python client for a running agent's control API (see :mod:`avatar_agent.server.control`).

Two flavours with the same methods:

* :class:`AvatarClient` — synchronous, standard library only (urllib); good for scripts and bots::

      c = AvatarClient("http://127.0.0.1:8080", token=None)
      uid = c.say("Hello! I am your avatar.")
      for ev in c.events(types=["speech_finished"]):
          if ev.data["utterance"] == uid:
              break

* :class:`AsyncAvatarClient` — asyncio (aiohttp), adds WebSocket streaming of PCM::

      async with AsyncAvatarClient(url) as c:
          async with c.audio_stream(rate=48000) as s:
              await s.send(pcm_bytes)          # as the audio is produced
          print(s.utterance)

Errors from the server raise :class:`ApiError` (status, message, retry_after).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator

import numpy as np


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
        kinds = {np.dtype(np.int16): ("s16le", "<i2"), np.dtype(np.int32): ("s32le", "<i4"),
                 np.dtype(np.uint8): ("u8", "u1")}
        format, dt = kinds.get(a.dtype, ("f32le", "<f4"))
        audio = np.ascontiguousarray(a, dtype=dt).tobytes()
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


class _SseParser:
    """Incremental text/event-stream parser (lines in, events out)."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.data: list[str] = []
        self.id: str | None = None

    def line(self, line: str) -> Event | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self.data and self.kind is None:
                return None
            ev = _event_body(self.kind, "\n".join(self.data), self.id)
            self.kind, self.data = None, []
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.kind = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = value
        return None


class AvatarClient:
    """Synchronous client (urllib only).

    Args:
        base_url: the agent's server, e.g. "http://127.0.0.1:8080".
        token: bearer token when the server requires one (server.token).
        timeout: seconds per request.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None,
                 timeout: float = 30.0, prefix: str = "/api") -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.prefix = prefix
        """Path of the control routes: "/api" (``start``) or "/v1/sessions/<id>" (a session)."""
        self.session: dict[str, Any] = {}

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        h.update(extra or {})
        return h

    def _url(self, path: str, query: dict[str, str] | None = None) -> str:
        q = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"{self.base_url}{path}{q}"

    def request(self, method: str, path: str, body: Any = None, *, data: bytes | None = None,
                content_type: str | None = None, query: dict[str, str] | None = None) -> Any:
        """One API call; JSON in (``body``) or raw bytes (``data``), JSON out."""
        headers = self._headers()
        if body is not None:
            data = json.dumps(body).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self._url(path, query), data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise _error_of(e.code, e.read(), e.headers) from None
        return json.loads(raw) if raw else {}

    def open_session(self, avatar: str | None = None, emotion: str | None = None,
                     voice: str | None = None) -> "AvatarClient":
        """Open a session on a session server (``avatar-agent serve``); returns its client
        (``.session`` holds the server's answer: id, WHEP and audio URLs).

        Raises ApiError 503 (``retry_after`` set) when the server is at capacity."""
        body = {k: v for k, v in (("avatar", avatar), ("emotion", emotion), ("voice", voice)) if v}
        info = self.request("POST", "/v1/sessions", body)
        c = AvatarClient(self.base_url, self.token, self.timeout, f"/v1/sessions/{info['id']}")
        c.session = info
        return c

    def close_session(self) -> None:
        """Close the session this client drives (a client from :meth:`open_session`)."""
        self.request("DELETE", self.prefix)

    def say(self, text: str, voice: str | None = None, emotion: str | None = None) -> int:
        """Speak ``text``; returns the utterance id (watch events for its end)."""
        body: dict[str, Any] = {"text": text}
        if voice:
            body["voice"] = voice
        if emotion:
            body["emotion"] = emotion
        return int(self.request("POST", self.prefix + "/say", body)["utterance"])

    def push_audio(self, audio: np.ndarray | bytes | str | Path, rate: int = 16000,
                   channels: int = 1, format: str = "s16le") -> dict[str, Any]:
        """Upload speech (WAV file/bytes, raw PCM, or an array); returns {utterance, duration_s}."""
        data, query, ctype = audio_payload(audio, rate, channels, format)
        return self.request("POST", self.prefix + "/audio", data=data, content_type=ctype, query=query)

    def interrupt(self) -> dict[str, Any]:
        """Drop queued speech now."""
        return self.request("POST", self.prefix + "/interrupt", data=b"")

    def set_emotion(self, name: str, intensity: float | None = None) -> None:
        """One of anger, contempt, disgust, fear, happiness, neutral, sadness, surprise, none."""
        body: dict[str, Any] = {"name": name}
        if intensity is not None:
            body["intensity"] = intensity
        self.request("POST", self.prefix + "/emotion", body)

    def set_scales(self, expression: float | None = None, head: float | None = None) -> None:
        """Multiply expression / head motion (1 = as generated)."""
        body = {k: v for k, v in (("expression", expression), ("head", head)) if v is not None}
        self.request("POST", self.prefix + "/scales", body)

    def set_gaze(self, x: float, y: float) -> None:
        """Gaze direction, each axis -1..1."""
        self.request("POST", self.prefix + "/gaze", {"x": x, "y": y})

    def swap_avatar(self, path: str, wait: bool = False) -> dict[str, Any]:
        """Switch to another portrait (inside the server's avatar directories)."""
        return self.request("POST", self.prefix + "/avatar", {"path": str(path), "wait": wait})

    def status(self) -> dict[str, Any]:
        """The agent's statistics."""
        return self.request("GET", self.prefix + "/status")

    def openapi(self) -> dict[str, Any]:
        """The API's OpenAPI document."""
        return self.request("GET", self.prefix + "/openapi.json")

    def events(self, types: Iterable[str] | None = None, timeout: float | None = None
               ) -> Iterator[Event]:
        """Server-sent events, as they come (stop iterating to disconnect).

        Args:
            types: only these kinds (e.g. ["speech_finished"]).
            timeout: socket read timeout in seconds (None: the client's timeout; the server
                pings every 15 s, so keep it above that).
        """
        query = {"types": ",".join(types)} if types else None
        req = urllib.request.Request(self._url(self.prefix + "/events", query),
                                     headers=self._headers({"Accept": "text/event-stream"}))
        try:
            resp = urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raise _error_of(e.code, e.read(), e.headers) from None
        parser = _SseParser()
        with resp:
            for raw in resp:
                ev = parser.line(raw.decode("utf-8", "replace"))
                if ev is not None:
                    yield ev


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
                timeout=aiohttp.ClientTimeout(total=self.timeout), **kw) as r:
            raw = await r.read()
            if r.status >= 400:
                raise _error_of(r.status, raw, r.headers)
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

    async def events(self, types: Iterable[str] | None = None, websocket: bool = False
                     ) -> AsyncIterator[Event]:
        """Events as they come, over SSE (default) or the WebSocket endpoint."""
        import aiohttp

        params = {"types": ",".join(types)} if types else None
        session = self._get_session()
        if websocket:
            async with session.ws_connect(self.base_url + self.prefix + "/events/ws", params=params) as ws:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    m = json.loads(msg.data)
                    yield Event(m.get("type", "message"), m.get("data") or {}, m.get("id"))
            return
        async with session.get(self.base_url + self.prefix + "/events", params=params,
                               headers={"Accept": "text/event-stream"}) as r:
            if r.status >= 400:
                raise _error_of(r.status, await r.read(), r.headers)
            parser = _SseParser()
            async for raw in r.content:
                ev = parser.line(raw.decode("utf-8", "replace"))
                if ev is not None:
                    yield ev


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


__all__ = ["AvatarClient", "AsyncAvatarClient", "AudioStream", "ApiError", "Event",
           "audio_payload"]
