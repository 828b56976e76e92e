"""The local web server: a page that plays the live avatar, and the WebRTC offer/answer endpoint.

Routes:
    GET    /              the viewer page (static/index.html + static/app.js)
    GET    /static/*      the page's assets
    POST   /offer         {"sdp": ..., "type": "offer"} → {"sdp": ..., "type": "answer",
                          "session": id} and ``Location: /session/<id>``; or, WHIP/WHEP style, a
                          raw SDP body with ``Content-Type: application/sdp`` → 201 with the raw
                          SDP answer and the same Location header
    DELETE /session/<id>  end that session (204; unknown id: 404); the agent and the other
                          peers go on
    GET    /healthz       {"ok": true, "viewers": n}; 503 with "ok": false while the face is
                          frozen (no new frame for service.frozen_s)

Offer statuses: 400 unusable offer, 409 the offer sends audio while another peer already does
(only one uplink speaker at a time; offer audio as recvonly to watch), 503 stream not started or
full.  A chatbot sends its TTS audio as the offer's audio track (sendrecv); see
:mod:`avatar_agent.sinks.webrtc` and ``make_app(on_uplink_audio=...)``.

The lead mounts more (``/metrics``, the control API, auth middleware) through ``extra_routes`` or by
adding routes to the returned application before it starts.  The server binds 127.0.0.1 by default:
exposing it on a LAN is an explicit choice (``host="0.0.0.0"``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable

from aiohttp import web

from avatar_agent.audio.uplink import Uplink, UplinkCallback
from avatar_agent.sinks.webrtc import OfferError, UplinkBusyError, WebRtcError, WebRtcSink

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SINK_KEY = web.AppKey("webrtc_sink", WebRtcSink)
HEALTHY_KEY = web.AppKey[Callable[[], bool]]("healthy")  # aiohttp: non-class types go in []
MAX_OFFER_BYTES = 256 * 1024  # an SDP offer is a few kB; anything larger is not one


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _healthz(request: web.Request) -> web.Response:
    sink = request.app[SINK_KEY]
    ok = request.app[HEALTHY_KEY]()
    return web.json_response({"ok": ok, "viewers": sink.viewers}, status=200 if ok else 503)


async def _offer(request: web.Request) -> web.Response:
    if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
        return _error(413, f"offer larger than {MAX_OFFER_BYTES} bytes")
    raw_sdp = request.content_type == "application/sdp"  # WHIP/WHEP clients post bare SDP
    if raw_sdp:
        try:
            body = {"sdp": await request.text(), "type": "offer"}
        except UnicodeDecodeError as e:
            return _error(400, f"the SDP body must be UTF-8 text: {e}")
    else:
        try:
            body = json.loads(await request.text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f'body must be JSON {{"sdp": "...", "type": "offer"}}: {e}')
    if (not isinstance(body, dict) or not isinstance(body.get("sdp"), str)
            or not isinstance(body.get("type"), str)):
        return _error(400, 'body must be a JSON object with string fields "sdp" and "type"')
    try:
        answer = await request.app[SINK_KEY].accept(body["sdp"], body["type"])
    except OfferError as e:
        return _error(400, str(e))
    except UplinkBusyError as e:
        return _error(409, str(e))
    except WebRtcError as e:  # not started yet, or full: the client may retry later
        return _error(503, str(e))
    headers = {"Location": f"/session/{answer.session}"}
    if raw_sdp:
        return web.Response(status=201, text=answer.sdp, content_type="application/sdp",
                            headers=headers)
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session": answer.session},
                             headers=headers)


async def _delete_session(request: web.Request) -> web.Response:
    if await request.app[SINK_KEY].close_session(request.match_info["session"]):
        return web.Response(status=204)
    return _error(404, "no such session (it ended already, or the id is wrong)")


def make_app(webrtc_sink: WebRtcSink, extra_routes: Iterable[web.AbstractRouteDef] | None = None,
             *, on_uplink_audio: UplinkCallback | None = None,
             healthy: Callable[[], bool] = lambda: True) -> web.Application:
    """Build the aiohttp application serving the viewer page and WebRTC signalling.

    Args:
        webrtc_sink: the sink whose stream viewers receive (started by the agent).
        extra_routes: more routes to mount, e.g. ``[web.get("/metrics", handler)]``.
        on_uplink_audio: ``callback(samples16k_float32, final)`` for the audio a speaking peer
            sends (the agent passes ``agent.push_audio``); set on the sink.  None keeps the
            sink's own setting.
        healthy: False while the face is frozen (``/healthz`` then answers 503).
    """
    app = web.Application(client_max_size=MAX_OFFER_BYTES)
    app[SINK_KEY] = webrtc_sink
    app[HEALTHY_KEY] = healthy
    if on_uplink_audio is not None:  # the peer's audio → the agent's speech (audio/uplink.py)
        webrtc_sink.uplink = Uplink(on_uplink_audio, name=f"{webrtc_sink.name} uplink")
    app.add_routes([
        web.get("/", _index),
        web.post("/offer", _offer),
        web.delete("/session/{session}", _delete_session),
        web.get("/healthz", _healthz),
        web.static("/static", STATIC_DIR),
    ])
    if extra_routes:
        app.add_routes(list(extra_routes))

    async def _on_shutdown(app: web.Application) -> None:
        await app[SINK_KEY].close_viewers()

    app.on_shutdown.append(_on_shutdown)
    return app


def runner_urls(runner: web.AppRunner) -> list[str]:
    """The http:// URLs a started runner listens on (resolves port 0 to the real port)."""
    urls = []
    for addr in runner.addresses:
        host, port = addr[0], addr[1]
        urls.append(f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/")
    return urls


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 8080, *,
                page: bool = True, announce: bool = True) -> web.AppRunner:
    """Start ``app`` on host:port (port 0: any free port), print the URL, return the runner.

    ``page``: the app serves the viewer page (the printed line says to open it).
    ``announce``: print the URL (not for a ``serve`` shard's internal port).

    Stop it with ``await runner.cleanup()``.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(e.errno, f"cannot listen on {host}:{port} ({e.strerror}); "
                               "pick another port or stop the program using it") from e
    for url in runner_urls(runner) if announce else ():
        print(f"avatar-agent: open {url} to watch the avatar" if page else
              f"avatar-agent: session server on {url} (POST {url}v1/sessions)", flush=True)
        log.info("serving on %s", url)
    return runner
