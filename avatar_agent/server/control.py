"""The control API a chatbot uses: speak, push audio, interrupt, steer the face, watch events.

All routes live under ``/api/`` and speak JSON (errors: ``{"error": "..."}`` with a 4xx status):

    POST /api/say          {"text", "voice"?, "emotion"?}          → {"utterance": id}
    POST /api/audio        WAV, or raw PCM with ?rate=&channels=&format=  → {"utterance": id, ...}
    GET  /api/audio/ws     WebSocket: first a JSON text {"rate", "channels", "format"}, then binary
                           PCM messages; a text {"final": true} (or closing) ends the utterance
    POST /api/interrupt    drop queued speech now                   → the controller's result
    POST /api/emotion      {"name", "intensity"?}
    POST /api/scales       {"expression"?, "head"?}
    POST /api/gaze         {"x", "y"}
    POST /api/avatar       {"path", "wait"?}   prepared in the background; 202, then an event
    GET  /api/status       the controller's statistics (the one status route; ``/healthz`` of
                           :mod:`avatar_agent.server.app` is the liveness probe)
    GET  /api/events       server-sent events (``?types=a,b`` filters)
    GET  /api/events/ws    the same events over a WebSocket
    GET  /api/openapi.json this API as an OpenAPI 3.1 document

Events are what the controller emits (a session: ``speech_started`` {utterance, frame},
``speech_finished`` {utterance, frame, interrupted, played_s}, ``avatar_swapped`` {path, frame},
``session_ended`` {reason}; see :mod:`avatar_agent.events`) plus the API's own: ``frame_stats``
(the status counters, every ``stats_interval_s``), ``avatar_ready`` {path} / ``avatar_failed``
{path, error} after POST /api/avatar, and ``events_dropped`` {count} when a slow client lost some.

:data:`ENDPOINTS` is the one table of the routes: :class:`ControlApi` serves each with the method
named by its operationId, validates bodies against its JSON schemas (:mod:`.openapi`, the
``jsonschema`` library) and publishes the same schemas as the OpenAPI document.  :func:`mount`
also installs the security middlewares (:mod:`avatar_agent.server.security`); the session server
(:mod:`avatar_agent.server.sessions`) serves one :class:`ControlApi` per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import numpy as np
from aiohttp import WSMsgType, web

from ..audio.queue import QueueFullError, StreamError, TooLongError, pcm_to_array
from ..audio.resample import (PCM_CHANNELS, PCM_FORMATS, PCM_RATES, PCM_WIDTH, AudioFormatError,
                              StreamResampler, to_pipeline)
from ..queues import DropOldest
from ..types import EMOTIONS, SAMPLE_RATE, Interrupted
from .openapi import BadRequest, Endpoint, document, parse_json, validate
from .security import (PathNotAllowedError, RateLimit, SecuritySettings,
                       check_avatar_path, install, json_error, read_body)

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)


class Controller(Protocol):
    """What the API drives (the agent implements it)."""

    def say(self, text: str, voice: str | None = None, emotion: str | None = None) -> int:
        """Speak ``text`` (queued after earlier speech); returns the segment id."""

    # Positional-only samples and keyword-only final: how the handlers call it, and what lets
    # a Session (whose push_audio also takes rate and channels) satisfy the protocol.
    def push_audio(self, samples: np.ndarray, /, *, final: bool = False) -> int:
        """Append 16 kHz mono float32 samples to the open segment (``final`` closes it); returns its id."""

    def interrupt(self) -> Interrupted:
        """Drop all unplayed speech; says what was cut."""

    def set_emotion(self, name: str, intensity: float | None = None) -> None:
        """Emotion (by name) for speech and idle frames from the next chunk on."""

    def set_scales(self, expression: float | None = None, head: float | None = None) -> None:
        """Multipliers on expression and head motion (None: unchanged)."""

    def set_gaze(self, x: float, y: float) -> None:
        """Look direction in [-1, 1]² (right/down positive)."""

    async def swap_avatar(self, path: str) -> None:
        """Switch to the portrait at ``path``."""

    def stats(self) -> dict:
        """Counters for the status API."""

    def subscribe(self, callback: Callable[[str, dict], None]) -> Callable[[], None]:
        """``callback(kind, data)`` on every event; returns the unsubscribe function."""


@dataclass(frozen=True)
class ControlSettings:
    """Limits of the control routes (the lead maps config keys onto them)."""

    avatar_dirs: tuple[str, ...] = ()
    """Directories POST /api/avatar may load from (empty: the route refuses every path)."""
    max_upload_bytes: int = 32 * 1024 * 1024
    """Largest audio upload (POST /api/audio)."""
    max_ws_message_bytes: int = 1024 * 1024
    """Largest single WebSocket message on /api/audio/ws."""
    max_event_streams: int = 64
    """Event subscribers (SSE + WebSocket) at once; more are refused with 503 (each one is a
    queue and a task, and the stats events go to every one of them)."""
    event_queue: int = 256
    """Events buffered per slow subscriber (overflow: drop oldest, the client gets a notice)."""
    heartbeat_s: float = 15.0
    """SSE comment / WebSocket ping interval (keeps proxies from closing idle streams)."""
    stats_interval_s: float = 1.0
    """Period of ``frame_stats`` events while anyone listens (0 = never)."""
    max_audio_s: float = 120.0
    """Most seconds of speech the queue ever holds (audio.max_queued_s): an upload or stream
    block declaring more is refused (413) from its size alone, before anything is decoded."""
    ws_idle_s: float = 2.0
    """An /api/audio/ws stream whose audio has run out for this long is ended (its utterance is
    finished, so queued say() and uploads go on) and the socket closed."""
    ws_first_audio_s: float = 30.0
    """Longest wait for the header and for the first audio of an /api/audio/ws stream."""
    interrupt_coalesce_s: float = 1.0
    """An interrupt this soon after the previous one, with no speech accepted in between, returns
    the previous result instead of interrupting again (a flood costs one interrupt)."""
    decode_concurrency: int = 2
    """Uploads decoded/resampled at once (in worker threads, never on the event loop)."""


def settings_from_config(cfg: Config) -> tuple[ControlSettings, SecuritySettings]:
    """The control API's limits and the security middleware settings from the [server],
    [audio] and [avatar] sections (what ``start`` mounts)."""
    sc = cfg.server
    dirs = tuple(str(cfg.resolve(d)) for d in cfg.avatar.directories)
    control = ControlSettings(avatar_dirs=dirs, max_upload_bytes=int(sc.max_upload_mb * 1024 * 1024),
                              max_audio_s=cfg.audio.max_queued_s, ws_idle_s=sc.audio_idle_s)
    security = security_settings(host=sc.host, token=sc.token, cors_origins=tuple(sc.cors_origins),
                                 max_body_kb=sc.max_body_kb, max_upload_mb=sc.max_upload_mb,
                                 request_timeout_s=sc.request_timeout_s,
                                 rate_say_per_min=sc.rate_say_per_min,
                                 rate_push_per_min=sc.rate_push_per_min,
                                 rate_offer_per_min=sc.rate_offer_per_min,
                                 rate_interrupt_per_min=sc.rate_interrupt_per_min,
                                 avatar_dirs=dirs)
    return control, security


# ------------------------------------------------------------------------------------------------
# The endpoint table: routes, body validation and the OpenAPI document all come from it
# ------------------------------------------------------------------------------------------------

VOICE: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 64,
                         "pattern": r"^[A-Za-z0-9_+\-.]+$"}
"""An espeak-ng voice name (letters, digits, ``_+-.``: it reaches a command line)."""
EMOTION: dict[str, Any] = {"type": "string", "enum": [*EMOTIONS, "none"]}
"""An emotion class of the motion model, or "none"."""

PCM_PARAMS: dict[str, dict[str, Any]] = {
    "rate": {"type": "integer", "minimum": PCM_RATES[0], "maximum": PCM_RATES[1],
             "description": "sample rate of the raw PCM in Hz"},
    "channels": {"type": "integer", "minimum": PCM_CHANNELS[0], "maximum": PCM_CHANNELS[1],
                 "default": 1, "description": "channels of the raw PCM (interleaved)"},
    "format": {"type": "string", "enum": list(PCM_FORMATS), "default": "s16le",
               "description": "sample format of the raw PCM (little-endian)"},
}
"""How raw PCM is described: the upload's query and the audio WebSocket's header."""
PCM_HEADER: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "required": ["rate"], "properties": PCM_PARAMS}
"""The first (text) message of an /api/audio/ws stream."""
PCM_END: dict[str, Any] = {"type": "object", "additionalProperties": False, "required": ["final"],
                           "properties": {"final": {"type": "boolean"}}}
"""A later text message of an /api/audio/ws stream ({"final": true} ends the utterance)."""
_PCM_QUERY: dict[str, Any] = {"type": "object", "properties": PCM_PARAMS}

_UTT = {"type": "object", "properties": {"utterance": {"type": "integer"}}}
_TYPES = ({"type": "string"}, "comma-separated event kinds to receive")

ENDPOINTS: list[Endpoint] = [
    Endpoint("POST", "/api/say", "Speak text with the TTS voice", kind="json",
             body={"type": "object", "additionalProperties": False, "required": ["text"],
                   "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 10000,
                                           "pattern": r"\S"},
                                  "voice": VOICE, "emotion": EMOTION}},
             responses={200: "queued", 400: "invalid body",
                        413: "body too large, or speech longer than the queue ever holds",
                        429: "rate limited", 503: "speech queue full"}, result=_UTT),
    Endpoint("POST", "/api/audio", "Upload speech audio (WAV, or raw PCM with ?rate=)",
             kind="audio",
             query={name: ({k: v for k, v in schema.items() if k != "description"},
                           schema["description"] + (" (ignored for WAV)" if name == "rate" else ""))
                    for name, schema in PCM_PARAMS.items()},
             responses={200: "queued", 400: "not audio", 409: "a WebSocket stream is active",
                        413: "too large (bytes, or seconds beyond the speech queue's size)",
                        429: "rate limited", 503: "speech queue full"},
             result={"type": "object", "properties": {"utterance": {"type": "integer"},
                                                      "duration_s": {"type": "number"},
                                                      "samples": {"type": "integer"}}}),
    Endpoint("GET", "/api/audio/ws", "Stream PCM speech over a WebSocket", kind="websocket",
             description='First message: JSON text {"rate": 48000, "channels": 1, "format": '
                         '"s16le"} (x-websocket-messages.header); then binary PCM. Text '
                         '{"final": true} or closing ends the utterance. The server answers '
                         '{"type": "ready"}, {"type": "accepted", "utterance": id} and '
                         '{"type": "error", "error": "..."} messages. A stream whose audio has run '
                         'out for server.audio_idle_s is ended ({"type": "finished", "reason": '
                         '...}) and closed, so it never holds later speech back.',
             messages={"header": PCM_HEADER, "end": PCM_END},
             responses={101: "upgraded", 409: "another stream is active", 429: "rate limited"}),
    Endpoint("POST", "/api/interrupt", "Drop queued speech and return to idle", kind="none",
             description="Repeated interrupts with no speech accepted in between are coalesced "
                         '(the answer carries "coalesced": true).',
             responses={200: "interrupted", 429: "rate limited"}),
    Endpoint("POST", "/api/emotion", "Set the emotion (8 classes or none) and its intensity",
             kind="json",
             body={"type": "object", "additionalProperties": False, "required": ["name"],
                   "properties": {"name": EMOTION,
                                  "intensity": {"type": "number", "minimum": 0, "maximum": 1}}},
             responses={200: "set", 400: "invalid body"}),
    Endpoint("POST", "/api/scales", "Scale expression and head motion", kind="json",
             body={"type": "object", "additionalProperties": False, "minProperties": 1,
                   "properties": {"expression": {"type": "number", "minimum": 0, "maximum": 3},
                                  "head": {"type": "number", "minimum": 0, "maximum": 3}}},
             responses={200: "set", 400: "invalid body"}),
    Endpoint("POST", "/api/gaze", "Set the gaze direction (-1..1 each axis)", kind="json",
             body={"type": "object", "additionalProperties": False, "required": ["x", "y"],
                   "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1},
                                  "y": {"type": "number", "minimum": -1, "maximum": 1}}},
             responses={200: "set", 400: "invalid body"}),
    Endpoint("POST", "/api/avatar", "Swap the avatar (prepared in the background)", kind="json",
             body={"type": "object", "additionalProperties": False, "required": ["path"],
                   "properties": {"path": {"type": "string", "minLength": 1, "maxLength": 4096},
                                  "wait": {"type": "boolean"}}},
             responses={202: "preparing; an avatar_ready or avatar_failed event follows",
                        200: "swapped (wait: true)", 400: "invalid body",
                        403: "path outside the allowed directories", 404: "no such file",
                        409: "a swap is already in progress", 422: "the image has no usable face"},
             result={"type": "object", "properties": {"path": {"type": "string"},
                                                      "ready": {"type": "boolean"}}}),
    Endpoint("GET", "/api/status", "Agent statistics", kind="none", responses={200: "statistics"}),
    Endpoint("GET", "/api/events", "Events as server-sent events", kind="sse",
             query={"types": _TYPES},
             description="The controller's events (a session's: speech_started {utterance, "
                         "frame}, speech_finished {utterance, frame, interrupted, played_s}, "
                         "avatar_swapped {path, frame}, session_ended {reason}) and the API's "
                         "own: frame_stats {the status counters}, avatar_ready {path}, "
                         "avatar_failed {path, error}, events_dropped {count}.",
             responses={200: "text/event-stream", 503: "too many event streams"}),
    Endpoint("GET", "/api/events/ws", "Events over a WebSocket (JSON text messages)",
             kind="websocket", query={"types": _TYPES},
             description='The events of GET /api/events as {"id", "type", "data"} messages.',
             responses={101: "upgraded", 503: "too many event streams"}),
    Endpoint("GET", "/api/openapi.json", "This document", kind="none",
             responses={200: "OpenAPI 3.1 document"}),
]

LONG_LIVED_PATHS = ("/api/events", "/api/events/ws", "/api/audio/ws")
"""Routes exempt from the per-request time limit."""


def security_settings(*, host: str = "127.0.0.1", token: str = "",
                      cors_origins: tuple[str, ...] | list[str] = (), max_body_kb: int = 64,
                      max_upload_mb: float = 32.0, request_timeout_s: float = 30.0,
                      rate_say_per_min: float = 60.0, rate_push_per_min: float = 120.0,
                      rate_offer_per_min: float = 30.0, rate_interrupt_per_min: float = 120.0,
                      avatar_dirs: tuple[str, ...] | list[str] = (),
                      public_paths: tuple[str, ...] = ("/", "/static/*", "/healthz")
                      ) -> SecuritySettings:
    """:class:`SecuritySettings` for this API from plain config values.

    ``public_paths`` default: the viewer page and its assets (no secrets; the page then sends
    the token it was opened with, ``/?token=...``, on its own API calls) and the health check.

    The say bucket covers POST /api/say; the push bucket covers uploads and WebSocket stream
    openings; the offer bucket covers WebRTC ``POST /offer`` (each offer builds a peer
    connection); the interrupt bucket covers POST /api/interrupt.  Raises InsecureBindError for a
    non-loopback host without a token.
    """
    return SecuritySettings(
        host=host, token=token, cors_origins=tuple(cors_origins),
        max_body_bytes=int(max_body_kb * 1024),
        body_limits={"/api/audio": int(max_upload_mb * 1024 * 1024)},
        request_timeout_s=request_timeout_s,
        rate_limits={"say": RateLimit(rate_say_per_min), "push": RateLimit(rate_push_per_min),
                     # a page reload or a few retries must pass: bursts of ≥ 10 offers
                     "offer": RateLimit(rate_offer_per_min,
                                        burst=max(10, math.ceil(rate_offer_per_min / 6))),
                     "interrupt": RateLimit(rate_interrupt_per_min)},
        rate_limited_paths={"/api/say": "say", "/api/audio": "push", "/api/audio/ws": "push",
                            "/offer": "offer", "/api/interrupt": "interrupt"},
        public_paths=public_paths, long_lived_paths=LONG_LIVED_PATHS,
        avatar_dirs=tuple(avatar_dirs))


# ------------------------------------------------------------------------------------------------
# Events: one hub per route set, fed by the controller (any thread), fanned out to subscribers
# ------------------------------------------------------------------------------------------------

class _Subscriber:
    def __init__(self, size: int, types: frozenset[str] | None) -> None:
        # get() returns None once the server is shutting down (the queue is closed)
        self.queue = DropOldest[tuple[int, str, dict[str, Any]]](size)
        self.types = types
        self.dropped = 0


class EventHub:
    """Fans controller events out to SSE/WebSocket subscribers.

    Subscribes to the controller while at least one client listens; also publishes
    ``frame_stats`` (the controller's stats) every ``stats_interval_s``.  A slow client's queue
    drops its oldest events and the client is told how many (``events_dropped``).
    """

    def __init__(self, ctl: Controller, settings: ControlSettings) -> None:
        self.ctl = ctl
        self.settings = settings
        self._subs: set[_Subscriber] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._seq = 0
        self.closing = False

    @property
    def listeners(self) -> int:
        """Connected event clients."""
        return len(self._subs)

    def open(self, types: frozenset[str] | None) -> _Subscriber:
        """Register a client (on the loop thread)."""
        sub = _Subscriber(self.settings.event_queue, types)
        self._subs.add(sub)
        if self._unsubscribe is None:
            self._loop = asyncio.get_running_loop()
            self._unsubscribe = self.ctl.subscribe(self._from_any_thread)
            if self.settings.stats_interval_s > 0:
                self._stats_task = self._loop.create_task(self._stats_loop())
        return sub

    def close(self, sub: _Subscriber) -> None:
        """Unregister a client; the last one unsubscribes from the controller."""
        self._subs.discard(sub)
        if not self._subs and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
            if self._stats_task is not None:
                self._stats_task.cancel()
                self._stats_task = None

    def shutdown(self) -> None:
        """End every event stream (server shutdown): clients see the stream close."""
        self.closing = True
        for sub in list(self._subs):
            sub.queue.close()

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Deliver an event (loop thread only; see :meth:`_from_any_thread`)."""
        self._seq += 1
        for sub in list(self._subs):
            if sub.types is not None and kind not in sub.types:
                continue
            if self.closing:
                continue
            if sub.queue.put((self._seq, kind, data)):
                sub.dropped += 1                  # told to the client, then reset

    def _from_any_thread(self, kind: str, data: dict[str, Any]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        payload = dict(data)
        try:
            loop.call_soon_threadsafe(self.publish, kind, payload)
        except RuntimeError:          # loop shutting down
            pass

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval_s)
            try:
                stats = self.ctl.stats()
            except Exception:
                log.exception("controller stats failed")
                continue
            self.publish("frame_stats", stats)


def _types(request: web.Request) -> frozenset[str] | None:
    raw = request.query.get("types")
    if not raw:
        return None
    return frozenset(t.strip() for t in raw.split(",")[:32] if t.strip())


def _to_json(data: Any) -> str:
    return json.dumps(data, default=_json_default, allow_nan=False, separators=(",", ":"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _clean(data: Any) -> Any:
    """Replace non-finite floats (not representable in JSON) by None."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {str(k): _clean(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_clean(v) for v in data]
    return data


# ------------------------------------------------------------------------------------------------
# The handlers
# ------------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlApi:
    """The control API over one :class:`Controller`: a handler method per :data:`ENDPOINTS`
    entry, named by its operationId (``post_say`` serves POST /api/say).

    JSON-body endpoints get their body parsed and validated against the table's schema before
    the method runs (``body`` argument); a :class:`BadRequest` anywhere answers 400 with its
    one-line message.  Event streams end when their client leaves; pass a ``hub`` and call
    ``hub.shutdown()`` from ``app.on_shutdown`` to end them when the server stops (:func:`mount`
    does this).

    Attributes:
        ws_busy: an /api/audio/ws stream is open (one at a time; uploads wait for it: 409).
        swap_busy: an avatar is being prepared (one swap at a time: 409).
    """

    def __init__(self, ctl: Controller, settings: ControlSettings | None = None, *,
                 hub: EventHub | None = None) -> None:
        self.ctl = ctl
        self.settings = s = settings or ControlSettings()
        self.hub = hub or EventHub(ctl, s)
        self.ws_busy = False
        self.swap_busy = False
        self._swaps: set[asyncio.Task[None]] = set()    # referenced until done
        self._decoding = asyncio.Semaphore(max(1, s.decode_concurrency))
        self._accepted = 0                             # speech accepted through this API
        self._last_interrupt: tuple[float, int, dict[str, Any]] | None = None
        self._doc = document(ENDPOINTS)

    # ---- the route table --------------------------------------------------------------------

    def handlers(self) -> dict[tuple[str, str], Handler]:
        """``(method, "/api/…" path)`` → its aiohttp handler."""
        return {(ep.method, ep.path): self._handler(ep) for ep in ENDPOINTS}

    def routes(self) -> list[web.RouteDef]:
        """The aiohttp routes (mount with ``app.add_routes``)."""
        return [web.route(m, p, h) for (m, p), h in self.handlers().items()]

    def _handler(self, ep: Endpoint) -> Handler:
        method = getattr(self, ep.operation_id)      # every table entry has its method
        schema = ep.body if ep.kind == "json" else None

        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                if schema is not None:
                    return await method(request, await self._json_body(request, schema))
                return await method(request)
            except BadRequest as e:
                return json_error(400, str(e))

        handler.__name__ = ep.operation_id
        handler.__doc__ = method.__doc__
        return handler

    async def _json_body(self, request: web.Request, schema: dict[str, Any]) -> dict[str, Any]:
        ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if ctype not in ("application/json", ""):
            raise BadRequest(f"Content-Type {ctype!r}: send application/json")
        return validate(parse_json(await read_body(request)), schema)

    def _speech_accepted(self) -> None:
        self._accepted += 1

    # ---- speech -----------------------------------------------------------------------------

    async def post_say(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        """POST /api/say: queue text for the TTS voice."""
        try:
            uid = self.ctl.say(body["text"], body.get("voice"), body.get("emotion"))
        except QueueFullError as e:
            return json_error(503, str(e), headers={"Retry-After": "1"})
        except TooLongError as e:                 # can never fit: waiting would not help
            return json_error(413, str(e))
        except ValueError as e:
            return json_error(400, str(e))
        self._speech_accepted()
        return _ok({"utterance": uid})

    async def post_audio(self, request: web.Request) -> web.Response:
        """POST /api/audio: a WAV or raw PCM upload, decoded off the event loop."""
        s = self.settings
        if self.ws_busy:
            # push_audio continues the open stream's utterance: an upload now would end it.
            return json_error(409, "an audio stream is active on /api/audio/ws; upload after it")
        try:
            # Raw PCM with a Content-Length declares its duration before its body arrives:
            # what cannot fit is refused before the body is even read.
            head = b""
            n = request.content_length
            if n:
                try:
                    head = await request.content.readexactly(min(12, n))
                except asyncio.IncompleteReadError as e:
                    head = e.partial
                if not _is_wav(head):
                    early = _pcm_format(n, request)
                    if early.frames / early.rate > s.max_audio_s:
                        return _too_long(early, s.max_audio_s)
            raw = head + await read_body(request)
        except BadRequest as e:
            return json_error(400, str(e))
        if not raw:
            return json_error(400, "empty body: send a WAV file or raw PCM")
        try:
            # Limits first, from the header/query alone: what cannot fit is refused before a
            # sample is decoded.  The decode and resample then run in a worker thread.
            fmt = _upload_format(raw, request)
            if fmt.frames / fmt.rate > s.max_audio_s:
                return _too_long(fmt, s.max_audio_s)
            if not fmt.frames:
                return json_error(400, "the upload holds no audio samples")
            async with self._decoding:
                x = await asyncio.to_thread(_decode_to_pipeline, raw, fmt)
        except (BadRequest, StreamError, AudioFormatError) as e:
            return json_error(400, str(e))
        if not x.size:
            return json_error(400, "the upload holds no audio samples")
        try:
            uid = self.ctl.push_audio(x, final=True)
        except QueueFullError as e:
            return json_error(503, str(e), headers={"Retry-After": "1"})
        except TooLongError as e:
            return json_error(413, str(e))
        except ValueError as e:
            return json_error(400, str(e))
        self._speech_accepted()
        return _ok({"utterance": uid, "duration_s": round(x.size / SAMPLE_RATE, 4),
                    "samples": int(x.size)})

    async def get_audio_ws(self, request: web.Request) -> web.StreamResponse:
        """GET /api/audio/ws: one utterance streamed as PCM over a WebSocket."""
        if self.ws_busy:
            return json_error(409, "another audio stream is active; one stream at a time")
        ws = web.WebSocketResponse(max_msg_size=self.settings.max_ws_message_bytes,
                                   heartbeat=self.settings.heartbeat_s)
        await ws.prepare(request)
        self.ws_busy = True
        try:
            await _audio_stream(ws, self.ctl, self.settings, self._speech_accepted)
        finally:
            self.ws_busy = False
        return ws

    async def post_interrupt(self, request: web.Request) -> web.Response:
        """POST /api/interrupt: drop queued speech (a flood of them costs one interrupt)."""
        await read_body(request)                      # a body, if any, must respect the limit
        now = time.monotonic()
        last = self._last_interrupt
        if (last is not None and last[1] == self._accepted
                and now - last[0] < self.settings.interrupt_coalesce_s):
            # Nothing was accepted since the last interrupt: this one would only redo its work.
            return _ok({**last[2], "coalesced": True})
        result = dataclasses.asdict(self.ctl.interrupt())
        self._last_interrupt = (now, self._accepted, result)
        return _ok(result)

    # ---- the face ---------------------------------------------------------------------------

    async def post_emotion(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        """POST /api/emotion."""
        self.ctl.set_emotion(body["name"], body.get("intensity"))
        return _ok()

    async def post_scales(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        """POST /api/scales."""
        self.ctl.set_scales(body.get("expression"), body.get("head"))
        return _ok()

    async def post_gaze(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        """POST /api/gaze."""
        self.ctl.set_gaze(float(body["x"]), float(body["y"]))
        return _ok()

    async def post_avatar(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        """POST /api/avatar: prepare another portrait in the background (or wait for it)."""
        try:
            path = check_avatar_path(body["path"], self.settings.avatar_dirs)
        except PathNotAllowedError as e:
            return json_error(403, str(e))
        except FileNotFoundError as e:
            return json_error(404, str(e))
        if self.swap_busy:
            return json_error(409, "an avatar swap is already in progress")
        self.swap_busy = True
        task = asyncio.get_running_loop().create_task(self._swap(str(path)))
        self._swaps.add(task)
        task.add_done_callback(self._swaps.discard)
        if body.get("wait"):
            try:
                await asyncio.shield(task)
            except Exception as e:
                return json_error(422, f"avatar {path.name!r} could not be prepared: {e}")
            return _ok({"path": str(path), "ready": True})
        task.add_done_callback(_log_failure)
        return _ok({"path": str(path), "ready": False}, status=202)

    async def _swap(self, path: str) -> None:
        try:
            await self.ctl.swap_avatar(path)
        except Exception as e:
            self.hub.publish("avatar_failed", {"path": path, "error": str(e)})
            raise
        else:
            self.hub.publish("avatar_ready", {"path": path})
        finally:
            self.swap_busy = False

    # ---- observation ------------------------------------------------------------------------

    async def get_status(self, request: web.Request) -> web.Response:
        """GET /api/status: the controller's counters."""
        st = dict(self.ctl.stats())
        st.setdefault("event_listeners", self.hub.listeners)
        return _ok(st)

    async def get_events(self, request: web.Request) -> web.StreamResponse:
        """GET /api/events: server-sent events."""
        if (full := self._events_full()) is not None:
            return full
        sub = self.hub.open(_types(request))      # counted from now: no await since the check
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        try:
            await resp.prepare(request)
            await resp.write(b"retry: 2000\n: connected\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), self.settings.heartbeat_s)
                except TimeoutError:
                    await resp.write(b": ping\n\n")
                    continue
                if item is None:
                    break
                seq, kind, data = item
                if sub.dropped:
                    n, sub.dropped = sub.dropped, 0
                    await resp.write(_sse(seq, "events_dropped", {"count": n}))
                await resp.write(_sse(seq, kind, data))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.hub.close(sub)
        return resp

    async def get_events_ws(self, request: web.Request) -> web.StreamResponse:
        """GET /api/events/ws: the same events as JSON WebSocket messages."""
        if (full := self._events_full()) is not None:
            return full
        sub = self.hub.open(_types(request))      # counted from now: no await since the check
        ws = web.WebSocketResponse(heartbeat=self.settings.heartbeat_s, max_msg_size=4096)
        try:
            await ws.prepare(request)
        except BaseException:
            self.hub.close(sub)
            raise

        async def drain_incoming() -> None:
            async for _ in ws:                        # clients do not talk; just notice close
                pass

        reader = asyncio.get_running_loop().create_task(drain_incoming())
        try:
            while not reader.done():
                getter = asyncio.ensure_future(sub.queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                item = getter.result()
                if item is None:
                    break
                seq, kind, data = item
                if sub.dropped:
                    n, sub.dropped = sub.dropped, 0
                    await ws.send_str(_to_json({"id": seq, "type": "events_dropped",
                                                "data": {"count": n}}))
                await ws.send_str(_to_json({"id": seq, "type": kind, "data": _clean(data)}))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.hub.close(sub)
            reader.cancel()
            with contextlib.suppress(Exception):
                await ws.close()
        return ws

    def _events_full(self) -> web.Response | None:
        cap = self.settings.max_event_streams
        if self.hub.listeners < cap:
            return None
        return json_error(503, f"{cap} event streams are open already; close one or retry "
                               "later", headers={"Retry-After": "5"})

    async def get_openapi_json(self, request: web.Request) -> web.Response:
        """GET /api/openapi.json."""
        return web.json_response(self._doc)


def control_routes(ctl: Controller, settings: ControlSettings | None = None, *,
                   hub: EventHub | None = None) -> list[web.RouteDef]:
    """aiohttp routes of the control API for ``ctl`` (``ControlApi(ctl, ...).routes()``)."""
    return ControlApi(ctl, settings, hub=hub).routes()


def _ok(data: dict[str, Any] | None = None, status: int = 200) -> web.Response:
    return web.Response(text=_to_json(_clean(data if data is not None else {"ok": True})),
                        status=status, content_type="application/json")


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("avatar swap failed: %s", task.exception())


def _sse(seq: int, kind: str, data: dict[str, Any]) -> bytes:
    # json.dumps never emits raw newlines, so one data: line per event is always well-formed.
    return f"id: {seq}\nevent: {kind}\ndata: {_to_json(_clean(data))}\n\n".encode()


# ------------------------------------------------------------------------------------------------
# Audio uploads
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _UploadFormat:
    """What an upload declares (WAV header or query string), known before decoding."""

    wav: bool
    rate: float
    channels: int
    frames: int
    pcm: str = "s16le"


def _is_wav(head: bytes) -> bool:
    return head[:4] == b"RIFF" and head[8:12] == b"WAVE"


def _too_long(fmt: _UploadFormat, max_s: float) -> web.Response:
    seconds = fmt.frames / fmt.rate
    return json_error(413, f"the upload holds {seconds:.0f} s of audio ({fmt.frames} frames at "
                           f"{fmt.rate:g} Hz); the speech queue holds at most {max_s:g} s "
                           "(audio.max_queued_s): send shorter parts")


def _upload_format(raw: bytes, request: web.Request) -> _UploadFormat:
    """Read an upload's format and length from its WAV header or the query (cheap: no decode)."""
    if _is_wav(raw):
        import soundfile as sf

        try:
            info = sf.info(io.BytesIO(raw))
        except Exception as e:  # libsndfile raises its own types on malformed files
            raise BadRequest(f"WAV could not be decoded: {e}") from None
        if (not PCM_RATES[0] <= info.samplerate <= PCM_RATES[1]
                or not PCM_CHANNELS[0] <= info.channels <= PCM_CHANNELS[1]):
            raise BadRequest(f"WAV with {info.samplerate} Hz, {info.channels} channels is not "
                             f"supported ({PCM_RATES[0]}..{PCM_RATES[1]} Hz, "
                             f"{PCM_CHANNELS[0]}..{PCM_CHANNELS[1]} channels)")
        return _UploadFormat(True, float(info.samplerate), int(info.channels), int(info.frames))
    return _pcm_format(len(raw), request)


def _pcm_query(request: web.Request) -> dict[str, Any]:
    """?rate=&channels=&format= as validated values (PCM_PARAMS; absent ones: defaults)."""
    q: dict[str, Any] = {}
    for name, schema in PCM_PARAMS.items():
        raw = request.query.get(name)
        if raw is None:
            continue
        if schema["type"] == "integer":
            try:
                q[name] = int(raw)
            except ValueError:
                raise BadRequest(f"?{name}={raw[:20]!r} must be an integer") from None
        else:
            q[name] = raw
    validate(q, _PCM_QUERY, "query")
    return {"rate": SAMPLE_RATE, "channels": 1, "format": "s16le", **q}


def _pcm_format(nbytes: int, request: web.Request) -> _UploadFormat:
    """Raw PCM of ``nbytes`` as the query string describes it (?rate=&channels=&format=)."""
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
    if ctype.startswith("audio/") and ctype not in ("audio/l16", "audio/pcm", "audio/raw"):
        raise BadRequest(f"Content-Type {ctype}: send WAV or raw PCM "
                         "(application/octet-stream with ?rate=&channels=&format=)")
    q = _pcm_query(request)
    channels, fmt = q["channels"], q["format"]
    width = PCM_WIDTH[fmt]
    if nbytes % width:
        raise BadRequest(f"{nbytes} bytes is not a whole number of {fmt} samples "
                         f"({width} bytes each)")
    if (nbytes // width) % channels:
        raise BadRequest(f"{nbytes // width} samples is not a whole number of "
                         f"{channels}-channel frames")
    return _UploadFormat(False, float(q["rate"]), channels, nbytes // width // channels, fmt)


def _decode_to_pipeline(raw: bytes, fmt: _UploadFormat) -> np.ndarray:
    """Decode and resample an upload to 16 kHz mono float32 (worker thread: CPU-bound)."""
    if fmt.wav:
        import soundfile as sf

        try:
            x, _ = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
        except Exception as e:
            raise BadRequest(f"WAV could not be decoded: {e}") from None
    else:
        x = pcm_to_array(raw, fmt.pcm)
        if x.dtype.kind == "f":
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if not x.size:
        return np.zeros(0, np.float32)
    return to_pipeline(x, fmt.rate, fmt.channels)


# ------------------------------------------------------------------------------------------------
# The audio WebSocket
# ------------------------------------------------------------------------------------------------

async def _audio_stream(ws: web.WebSocketResponse, ctl: Controller, s: ControlSettings,
                        on_accepted: Callable[[], None] = lambda: None) -> None:
    """Run one WebSocket PCM stream: header, binary blocks, end (final, close, or idle)."""

    async def error(msg: str, close: bool = True) -> None:
        with contextlib.suppress(Exception):
            await ws.send_json({"type": "error", "error": msg})
            if close:
                await ws.close(code=1008, message=msg[:100].encode())

    try:
        first = await ws.receive(timeout=s.ws_first_audio_s)
    except TimeoutError:
        await error(f"no header within {s.ws_first_audio_s:g} s")
        return
    if first.type != WSMsgType.TEXT:
        await error('first message must be JSON text {"rate": 48000, "channels": 1, '
                    '"format": "s16le"}')
        return
    try:
        hdr = validate(parse_json(first.data.encode()), PCM_HEADER, "header")
    except BadRequest as e:
        await error(str(e))
        return
    rate, channels = hdr["rate"], hdr.get("channels", 1)
    fmt = hdr.get("format", PCM_PARAMS["format"]["default"])
    width = PCM_WIDTH[fmt] * channels
    rs = StreamResampler(rate, channels, name="ws-push")
    await ws.send_json({"type": "ready"})
    uid: int | None = None
    total = 0

    finalized = False

    async def push(y: np.ndarray, final: bool) -> bool:
        nonlocal uid, total, finalized
        try:
            got = ctl.push_audio(y, final=final)
            finalized = final
        except QueueFullError as e:
            await error(f"{e}", close=False)        # this block is lost; the client is told
            return True
        except ValueError as e:
            await error(str(e))
            return False
        total += int(y.size)
        if uid is None:
            uid = got
            on_accepted()
            await ws.send_json({"type": "accepted", "utterance": uid})
        return True

    try:
        how = await _pump(ws, rs, fmt, width, rate, s, push, error)
        ended = how in ("final", "idle")
        # Closing the socket ends the utterance as well: what was sent plays out.
        tail = rs.flush()
        if uid is not None or tail.size:
            await push(tail, final=True)
    finally:
        if uid is not None and not finalized:
            # Whatever went wrong, never leave the controller's stream open.
            with contextlib.suppress(Exception):
                ctl.push_audio(np.zeros(0, np.float32), final=True)
    if ended and not ws.closed:
        msg: dict[str, Any] = {"type": "finished", "utterance": uid,
                               "duration_s": round(total / SAMPLE_RATE, 4)}
        if how == "idle":
            msg["reason"] = f"no audio for {s.ws_idle_s:g} s (server.audio_idle_s)"
        with contextlib.suppress(Exception):
            await ws.send_json(msg)
            await ws.close()


def _convert_block(data: bytes, fmt: str, rs: StreamResampler) -> np.ndarray:
    """One binary message → 16 kHz mono float32 (worker thread: CPU-bound)."""
    x = pcm_to_array(data, fmt)
    if x.dtype.kind == "f":
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return rs.process(x)


async def _pump(ws: web.WebSocketResponse, rs: StreamResampler, fmt: str, width: int, rate: int,
                s: ControlSettings, push: Callable[[np.ndarray, bool], Any],
                error: Callable[[str], Any]) -> str:
    """Feed binary PCM messages to ``push`` until the stream ends; returns how it ended:
    "final" ({"final": true}), "idle" (its audio ran out ``ws_idle_s`` ago), "closed" or "error".

    The idle clock runs from when the audio received so far would have finished playing at
    real-time pace (a client sending faster than real time is not idle while its audio plays):
    an open stream holds every later utterance back, so it must not outlive its audio by more
    than that.  Only audio counts: text messages or a drip of a few samples cannot keep it open.
    """
    pending = b""
    opened = time.monotonic()
    t_first: float | None = None                    # when the first audio arrived
    seconds = 0.0                                   # audio received, in seconds
    while True:
        now = time.monotonic()
        if t_first is None:
            deadline = opened + s.ws_first_audio_s
        else:
            deadline = t_first + seconds + s.ws_idle_s
        try:
            msg = await ws.receive(timeout=max(0.0, deadline - now))
        except TimeoutError:
            if t_first is None:
                await error(f"no audio within {s.ws_first_audio_s:g} s")
                return "error"
            return "idle"
        if msg.type == WSMsgType.BINARY:
            data = pending + msg.data
            cut = len(data) - len(data) % width
            pending = data[cut:]
            if not cut:
                continue
            block_s = cut / width / rate
            if block_s > s.max_audio_s:             # refused from its size, before decoding
                await error(f"a message of {block_s:.0f} s of audio is more than the speech "
                            f"queue holds ({s.max_audio_s:g} s); send blocks of a few "
                            "hundred ms")
                return "error"
            if t_first is None:
                t_first = time.monotonic()
            y = await asyncio.to_thread(_convert_block, data[:cut], fmt, rs)
            seconds += block_s
            if y.size and not await push(y, False):
                return "error"
        elif msg.type == WSMsgType.TEXT:
            try:
                cmd = validate(parse_json(msg.data.encode()), PCM_END, "message")
            except BadRequest as e:
                await error(str(e))
                return "error"
            if cmd["final"]:
                return "final"
        else:
            return "closed"


def mount(app: web.Application, ctl: Controller, settings: ControlSettings | None = None,
          security: SecuritySettings | None = None) -> ControlApi:
    """Add the control routes and the security middlewares to ``app`` (before it starts);
    returns the :class:`ControlApi` serving them.

    ``security`` defaults to :func:`security_settings` (loopback, no token).
    """
    s = settings or ControlSettings()
    sec = security or security_settings(avatar_dirs=s.avatar_dirs)
    api = ControlApi(ctl, s)
    app.add_routes(api.routes())
    install(app, sec)

    async def end_streams(app: web.Application) -> None:
        api.hub.shutdown()

    app.on_shutdown.append(end_streams)
    return api


__all__ = ["Controller", "ControlApi", "ControlSettings", "control_routes", "mount",
           "security_settings", "settings_from_config", "ENDPOINTS", "EventHub", "BadRequest",
           "parse_json", "validate", "LONG_LIVED_PATHS", "PCM_HEADER", "VOICE", "EMOTION"]
