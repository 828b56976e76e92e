"""The web server of ``avatar-agent start``: the viewer page and WebRTC signalling for its one
session, the control API (``/api/…``) driving that session, ``/metrics`` and ``/api/status``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..config import Config
from .app import make_app
from .control import mount, settings_from_config


def make_local_app(cfg: Config, session: Any, webrtc: Any) -> web.Application:
    """The app for one session (``session``: :class:`avatar_agent.session.Session`)."""
    uplink = None
    if session.agent.marks.from_source:             # a peer's uplink audio is spoken like a push
        def uplink(samples: Any, final: bool) -> int:
            return session.push_audio(samples, final=final)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=session.agent.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def healthy() -> bool:
        return bool(session.agent.producing)

    app = make_app(webrtc, extra_routes=[web.get("/metrics", metrics)],
                   on_uplink_audio=uplink, healthy=healthy)
    control, security = settings_from_config(cfg)
    session.stats_providers.append(lambda: {"viewers": webrtc.viewers,
                                            "uplink": webrtc.uplink_stats()})
    mount(app, session, control, security)
    return app
