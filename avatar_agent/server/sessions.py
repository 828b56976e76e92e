"""The session API: many faces on one server, one engine.

Routes (JSON; errors ``{"error": "..."}``):

    POST   /v1/sessions              {avatar?, emotion?, voice?} → 201 {id, urls…}; 503 + Retry-After
                                     when the engine is at capacity (running sessions are untouched)
    GET    /v1/sessions              [{id, viewers, avatar}]
    DELETE /v1/sessions/{id}         204 (queued frames drain); 404 unknown id
    POST   /v1/sessions/{id}/whep    SDP offer (raw application/sdp, WHEP; or JSON {sdp, type})
                                     → the session's own video + audio; 201 + Location
    DELETE /v1/sessions/{id}/whep/{peer}
    …      /v1/sessions/{id}/say | audio | audio/ws | interrupt | emotion | scales | gaze |
           avatar | status | events | events/ws   — the control API of
                                     :mod:`avatar_agent.server.control` for that session (one
                                     ControlApi each: same bodies, limits and rate limits)
    GET    /healthz                  {"ok", frozen, sessions, capacity, load, …}; 503 when a
                                     session is frozen
    GET    /readyz                   200 while a new session fits, else 503 (for a load balancer)
    GET    /v1/openapi.json          this API (and every session's control routes) as OpenAPI 3.1

Each WebRTC viewer sees only its own session: every session has its own WebRTC sink.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from aiohttp import web

from ..engine import CapacityError, Engine
from ..session import Session
from ..sinks.webrtc import OfferError, UplinkBusyError, WebRtcError, WebRtcSink
from .control import EMOTION, ENDPOINTS, VOICE, ControlApi, ControlSettings, Handler
from .openapi import BadRequest, Endpoint, document, parse_json, validate
from .security import RateLimit, SecuritySettings, TokenBuckets, install

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", Engine)
_CONTROL_DOC = "/api/openapi.json"

OPEN_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"avatar": {"type": "string", "minLength": 1, "maxLength": 4096},
                   "emotion": EMOTION, "voice": VOICE},
}
"""Body of POST /v1/sessions."""


SESSION_ENDPOINTS = [
    Endpoint("POST", "/v1/sessions", "Open a session (its own face, audio and viewers)",
             body=OPEN_SCHEMA, kind="json",
             responses={201: "opened: id and its URLs", 400: "bad request",
                        403: "avatar outside avatar.directories",
                        503: "at capacity (Retry-After)"},
             result={"type": "object", "properties": {
                 "id": {"type": "string"}, "whep": {"type": "string"},
                 "audio": {"type": "string"}, "audio_ws": {"type": "string"},
                 "say": {"type": "string"}, "events": {"type": "string"},
                 "interrupt": {"type": "string"}, "fps": {"type": "integer"},
                 "size": {"type": "integer"}}}),
    Endpoint("GET", "/v1/sessions", "List the running sessions",
             result={"type": "array", "items": {"type": "object"}}),
    Endpoint("DELETE", "/v1/sessions/{id}", "Close a session (queued frames drain)",
             responses={204: "closed", 404: "no such session"}),
    Endpoint("POST", "/v1/sessions/{id}/whep", "WHEP: an SDP offer → the session's video + audio",
             kind="none", responses={201: "SDP answer (Location: the viewer)", 400: "bad offer",
                                     404: "no such session", 503: "viewer cap reached"}),
    Endpoint("DELETE", "/v1/sessions/{id}/whep/{peer}", "End one viewer",
             responses={204: "ended", 404: "no such viewer"}),
    Endpoint("GET", "/healthz", "Alive, and no session's face is frozen",
             responses={503: "a session is frozen"}),
    Endpoint("GET", "/readyz", "Whether another session fits (for a load balancer)",
             responses={503: "at capacity"}),
]
"""The session server's own routes; each session also has the control API under its id."""


def session_document() -> dict[str, Any]:
    """OpenAPI for the session server: its routes + every control route per session."""
    per_session = [dataclasses.replace(ep, path=ep.path.replace("/api/", "/v1/sessions/{id}/", 1))
                   for ep in ENDPOINTS if ep.path != _CONTROL_DOC]
    return document([*SESSION_ENDPOINTS, *per_session], title="avatar-agent session server")


class _Routes:
    """One session's control API (handlers keyed by (method, "/api/…" path)) and its sink."""

    def __init__(self, session: Session, settings: ControlSettings, sink: WebRtcSink) -> None:
        self.session, self.sink = session, sink
        api = ControlApi(session, settings)
        self.hub = api.hub
        # Not /api/openapi.json: the session's routes are described by /v1/openapi.json.
        self.handlers: dict[tuple[str, str], Handler] = {
            route: h for route, h in api.handlers().items() if route[1] != _CONTROL_DOC}


class SessionApi:
    """The /v1 routes over an :class:`Engine` (handlers are methods; state lives here)."""

    def __init__(self, engine: Engine, settings: ControlSettings, *,
                 limit_opens: bool = True) -> None:
        self.engine, self.settings = engine, settings
        self.routes: dict[str, _Routes] = {}
        # A session the engine ended by itself (idle, failure) must not stay reachable from
        # here until someone asks for its id: its avatar and buffers would never be freed.
        engine.closed_listeners.append(self._forget)
        sv = engine.cfg.server
        # Opening a session costs a warm-up: per client, no faster than WebRTC offers.  (A shard
        # behind `serve`'s parent sees every client as the parent: the parent limits instead.)
        self._opens = TokenBuckets(RateLimit(sv.rate_offer_per_min, burst=10)) if limit_opens \
            else None
        self.max_viewers = sv.max_viewers

    def route_table(self) -> list[web.RouteDef]:
        """The aiohttp routes."""
        return [web.post("/v1/sessions", self.open), web.get("/v1/sessions", self.list),
                web.delete("/v1/sessions/{id}", self.close),
                web.post("/v1/sessions/{id}/whep", self.whep),
                web.delete("/v1/sessions/{id}/whep/{peer}", self.whep_close),
                web.route("*", "/v1/sessions/{id}/{op:.+}", self.control),
                web.get("/healthz", self.healthz), web.get("/readyz", self.readyz),
                web.get("/v1/openapi.json", self.openapi)]

    async def open(self, request: web.Request) -> web.Response:
        """POST /v1/sessions."""
        if self._opens is not None and (refused := opens_refused(self._opens, request)):
            return refused
        try:
            raw = await request.read()
            body = validate(parse_json(raw), OPEN_SCHEMA) if raw.strip() else {}
        except BadRequest as e:
            return _error(400, f"bad session request: {e}")
        avatar = body.get("avatar")
        if avatar is not None:
            from .security import PathNotAllowedError, check_avatar_path

            try:
                avatar = str(check_avatar_path(avatar, self.settings.avatar_dirs))
            except (PathNotAllowedError, ValueError) as e:
                return _error(403, str(e))
        sink = WebRtcSink(name="webrtc", max_viewers=self.max_viewers)
        try:
            session = await self.engine.open_session(avatar=avatar, emotion=body.get("emotion"),
                                                     voice=body.get("voice"), sinks=[sink])
        except CapacityError as e:
            return web.json_response({"error": str(e), **self.engine.status()}, status=503,
                                     headers={"Retry-After": f"{e.retry_after_s:.0f}"})
        except (ValueError, OSError) as e:
            return _error(400, f"cannot open a session: {e}")
        session.viewers = lambda: sink.viewers
        session.stats_providers.append(lambda: {"viewers": sink.viewers})
        self.routes[session.id] = _Routes(session, self.settings, sink)
        base = f"/v1/sessions/{session.id}"
        return web.json_response(
            {"id": session.id, "whep": f"{base}/whep", "audio": f"{base}/audio",
             "audio_ws": f"{base}/audio/ws", "say": f"{base}/say", "events": f"{base}/events",
             "interrupt": f"{base}/interrupt", "fps": session.fps, "size": session.size},
            status=201, headers={"Location": base})

    async def list(self, request: web.Request) -> web.Response:
        """GET /v1/sessions."""
        return web.json_response([{"id": sid, "viewers": r.session.viewers(),
                                   "avatar": r.session.avatar_path}
                                  for sid, r in self.routes.items() if self.engine.get(sid)])

    async def close(self, request: web.Request) -> web.Response:
        """DELETE /v1/sessions/{id}."""
        sid = request.match_info["id"]
        r = self.routes.pop(sid, None)
        if r is None or not await self.engine.close_session(sid):
            return _error(404, "no such session (it ended already, or the id is wrong)")
        r.hub.shutdown()
        return web.Response(status=204)

    def _forget(self, session_id: str) -> None:
        r = self.routes.pop(session_id, None)
        if r is not None:
            r.hub.shutdown()

    def _get(self, request: web.Request) -> _Routes | None:
        sid = request.match_info["id"]
        r = self.routes.get(sid)
        if r is not None and self.engine.get(sid) is None:   # ended by itself (idle, failure)
            self.routes.pop(sid, None)
            r.hub.shutdown()
            return None
        return r

    async def whep(self, request: web.Request) -> web.Response:
        """POST /v1/sessions/{id}/whep: a viewer of that session only."""
        r = self._get(request)
        if r is None:
            return _error(404, "no such session")
        raw = request.content_type == "application/sdp"
        try:
            text = await request.text()
            body = {"sdp": text, "type": "offer"} if raw else json.loads(text)
            sdp, kind = body["sdp"], body.get("type", "offer")
            if not isinstance(sdp, str) or not isinstance(kind, str):
                raise ValueError("sdp and type must be strings")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            return _error(400, f'body must be SDP or JSON {{"sdp": "...", "type": "offer"}}: {e}')
        try:
            answer = await r.sink.accept(sdp, kind)
        except OfferError as e:
            return _error(400, str(e))
        except UplinkBusyError as e:
            return _error(409, str(e))
        except WebRtcError as e:
            return _error(503, str(e))
        r.session.last_activity = r.session.agent.clock.now()
        loc = f"/v1/sessions/{request.match_info['id']}/whep/{answer.session}"
        if raw:
            return web.Response(status=201, text=answer.sdp, content_type="application/sdp",
                                headers={"Location": loc})
        return web.json_response({"sdp": answer.sdp, "type": answer.type,
                                  "session": answer.session}, status=201, headers={"Location": loc})

    async def whep_close(self, request: web.Request) -> web.Response:
        """DELETE /v1/sessions/{id}/whep/{peer}."""
        r = self._get(request)
        if r is None or not await r.sink.close_session(request.match_info["peer"]):
            return _error(404, "no such viewer")
        return web.Response(status=204)

    async def control(self, request: web.Request) -> web.StreamResponse:
        """/v1/sessions/{id}/<op>: the control API route /api/<op> for that session."""
        r = self._get(request)
        if r is None:
            return _error(404, "no such session (it ended already, or the id is wrong)")
        handler = r.handlers.get((request.method, f"/api/{request.match_info['op']}"))
        if handler is None:
            return _error(404, f"no route {request.method} {request.path}")
        return await handler(request)

    async def healthz(self, request: web.Request) -> web.Response:
        """Alive, and no session's face is frozen."""
        frozen = [sid for sid, r in self.routes.items()
                  if self.engine.get(sid) is not None and not r.session.agent.producing]
        ok = not frozen
        return web.json_response({"ok": ok, "frozen": frozen, **self.engine.status()},
                                 status=200 if ok else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        """200 while another session fits (a load balancer sends new sessions here)."""
        st = self.engine.status()
        ready = st["sessions"] < st["capacity"]
        return web.json_response({"ready": ready, **st}, status=200 if ready else 503)

    async def openapi(self, request: web.Request) -> web.Response:
        """GET /v1/openapi.json."""
        return web.json_response(session_document())

    async def shutdown(self, app: web.Application) -> None:
        """Close every session (the app is stopping)."""
        for r in self.routes.values():
            r.hub.shutdown()
            await r.sink.close_viewers()
        await self.engine.aclose()


def opens_refused(buckets: TokenBuckets, request: web.Request) -> web.Response | None:
    """429 + Retry-After when this client opens sessions faster than its bucket allows."""
    wait = buckets.take(request.remote or "?")
    if wait <= 0:
        return None
    return web.json_response({"error": f"opening sessions too fast; retry in {wait:.1f} s"},
                             status=429, headers={"Retry-After": str(max(1, round(wait)))})


def make_session_app(engine: Engine, control: ControlSettings, security: SecuritySettings, *,
                     limit_opens: bool = True) -> web.Application:
    """The session server's application (``avatar-agent serve``; ``limit_opens=False`` for a
    shard, whose parent rate-limits the clients it cannot see)."""
    app = web.Application(client_max_size=1024 * 1024)
    app[ENGINE_KEY] = engine
    api = SessionApi(engine, control, limit_opens=limit_opens)
    app.add_routes(api.route_table())
    install(app, security)
    app.on_shutdown.append(api.shutdown)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
