"""Security for the local web server: who may call it, how much, how big, how long, and from where.

:func:`install` adds these middlewares to an aiohttp application (outermost first):

1. **limits** — a body whose Content-Length exceeds the route's limit is refused with 413 before a
   byte is read (handlers read bodies through :func:`read_body`, which also stops chunked bodies at
   the limit); each request must finish within ``request_timeout_s`` (408), except long-lived
   streams (SSE, WebSockets); unexpected handler errors become a JSON 500 without a traceback.
2. **host** — bound to loopback, the Host header must name loopback too: a web page that DNS-rebinds
   its own name to 127.0.0.1 is refused (421).
3. **origin / CORS** — a browser request from an origin that is neither the page itself nor in
   ``cors_origins`` is refused (403; this is what stops a random web page from POSTing to the local
   agent); allowed origins get CORS headers and preflights are answered (204).  Unconfigured origins
   never see a CORS header.
4. **auth** — with a token configured every route but ``public_paths`` needs
   ``Authorization: Bearer <token>`` (or ``?token=`` for EventSource/WebSocket clients, which cannot
   set headers); compared in constant time.  Binding a non-loopback host without a token is refused
   when the settings are built.
5. **rate limits** — token buckets per client IP for say and push routes (429 + Retry-After).

Avatar paths from the API go through :func:`check_avatar_path` (inside a configured directory after
resolving symlinks and ``..``, else 403).
"""

from __future__ import annotations

import asyncio
import re
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LIMIT_KEY = web.RequestKey("avatar_agent.body_limit", int)
"""Request key holding the body limit (bytes) the limits middleware chose for this route."""
_CORS_KEY = web.RequestKey("avatar_agent.cors_origin", str)


class InsecureBindError(ValueError):
    """A non-loopback bind without a token: the API would be open to the network."""


class PathNotAllowedError(PermissionError):
    """An avatar path outside the configured directories (or an invalid path)."""


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (the only binds that need no token)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``per_min`` requests a minute on average, bursts up to ``burst``."""

    per_min: float
    burst: int = 0
    """0 = ten seconds' worth (at least 1)."""

    @property
    def capacity(self) -> float:
        """Bucket size."""
        return float(self.burst) if self.burst > 0 else max(1.0, self.per_min / 6)


@dataclass(frozen=True)
class SecuritySettings:
    """Plain values (the lead maps the [server] config keys onto them).

    Raises:
        InsecureBindError: ``host`` is not loopback and ``token`` is empty.
        ValueError: a value out of range.
    """

    host: str = "127.0.0.1"
    """The address the server binds (decides whether a token is mandatory)."""
    token: str = ""
    """Bearer token; empty = no authentication (loopback only)."""
    cors_origins: tuple[str, ...] = ()
    """Origins (scheme://host[:port]) allowed to call the API from a browser page."""
    max_body_bytes: int = 64 * 1024
    """Default request body limit (JSON endpoints)."""
    body_limits: Mapping[str, int] = field(default_factory=dict)
    """Per-path body limits, e.g. {"/api/audio": 32 MiB} for uploads."""
    request_timeout_s: float = 30.0
    """Longest a (not long-lived) request may take."""
    rate_limits: Mapping[str, RateLimit] = field(default_factory=dict)
    """Bucket name → limit, e.g. {"say": RateLimit(60), "push": RateLimit(120)}."""
    rate_limited_paths: Mapping[str, str] = field(default_factory=dict)
    """Path → bucket name, e.g. {"/api/say": "say", "/api/audio": "push"}."""
    public_paths: tuple[str, ...] = ("/healthz",)
    """Paths that need no token."""
    long_lived_paths: tuple[str, ...] = ()
    """Paths exempt from the request time limit (event streams, WebSockets)."""
    avatar_dirs: tuple[str, ...] = ()
    """Directories avatars may be loaded from through the API."""
    trust_host_header: bool = False
    """True disables the loopback Host check (behind a reverse proxy that rewrites Host)."""

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise InsecureBindError(
                f"server host {self.host!r} is not loopback: set server.token (a long random string, "
                "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`) or bind "
                "127.0.0.1")
        if self.token and len(self.token) < 16:
            raise ValueError("server.token must be at least 16 characters (use a random string)")
        if self.max_body_bytes <= 0 or any(v <= 0 for v in self.body_limits.values()):
            raise ValueError("body limits must be positive byte counts")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s={self.request_timeout_s} must be > 0")
        for o in self.cors_origins:
            if o == "*" or "://" not in o or o.endswith("/"):
                raise ValueError(f"cors origin {o!r}: give exact origins like "
                                 "'https://app.example.com' (no '*', no trailing slash)")
        for path, bucket in self.rate_limited_paths.items():
            if bucket not in self.rate_limits:
                raise ValueError(f"rate-limited path {path} names unknown bucket {bucket!r}")


# ------------------------------------------------------------------------------------------------
# Helpers used by handlers
# ------------------------------------------------------------------------------------------------

def json_error(status: int, message: str, headers: Mapping[str, str] | None = None
               ) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return web.json_response({"error": message}, status=status, headers=headers)


async def read_body(request: web.Request, limit: int | None = None) -> bytes:
    """The request body, refusing more than ``limit`` bytes (default: the route's limit).

    Raises:
        web.HTTPRequestEntityTooLarge: the body is larger (also when sent chunked).
    """
    if limit is None:
        limit = int(request.get(LIMIT_KEY, 64 * 1024))
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit, request.content_length)
    buf = bytearray()
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise _too_large(limit, len(buf))


def _too_large(limit: int, got: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(
        max_size=limit, actual_size=got, content_type="application/json",
        text=json.dumps({"error": f"request body larger than {limit} bytes"}))


def check_avatar_path(path: Any, dirs: Iterable[str | Path]) -> Path:
    """Resolve an avatar path from the API; it must lie inside one of ``dirs``.

    Symlinks and ``..`` are resolved first, so neither can lead outside.  Relative paths are
    taken relative to each directory in turn.

    Raises:
        PathNotAllowedError: not a string, NUL bytes, no directories configured, or outside them.
        FileNotFoundError: inside a directory but missing (only then: existence outside is not
            revealed).
    """
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
        raise PathNotAllowedError("path must be a non-empty string without NUL bytes")
    roots = [Path(d).expanduser().resolve() for d in dirs]
    if not roots:
        raise PathNotAllowedError("no avatar directories are configured (avatar.directories): "
                                  "the API may not load avatars")
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [root / p for root in roots]
    for cand in candidates:
        resolved = cand.resolve()
        for root in roots:
            if resolved == root or root in resolved.parents:
                if not resolved.is_file():
                    raise FileNotFoundError(f"avatar {path!r} does not exist")
                return resolved
    raise PathNotAllowedError(f"avatar path {path!r} is outside the allowed directories")


# ------------------------------------------------------------------------------------------------
# Rate limiting
# ------------------------------------------------------------------------------------------------

class TokenBuckets:
    """Per-key token buckets (one per client IP).  Keys are forgotten once their bucket is full
    again, and the table never holds more than ``max_keys`` (full buckets are evicted first)."""

    def __init__(self, limit: RateLimit, now: Callable[[], float] = time.monotonic,
                 max_keys: int = 4096) -> None:
        if limit.per_min <= 0:
            raise ValueError(f"rate limit {limit.per_min}/min must be > 0")
        self.limit = limit
        self.rate = limit.per_min / 60.0
        self.capacity = limit.capacity
        self._now = now
        self._max_keys = max_keys
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Consume one token; returns 0.0 if allowed, else the seconds until one is available."""
        now = self._now()
        tokens, last = self._state.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            if len(self._state) > self._max_keys:
                self._evict(now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _evict(self, now: float) -> None:
        full = [k for k, (t, last) in self._state.items()
                if t + (now - last) * self.rate >= self.capacity]
        for k in full:
            del self._state[k]
        while len(self._state) > self._max_keys:            # all busy: drop the stalest
            del self._state[min(self._state, key=lambda k: self._state[k][1])]


# ------------------------------------------------------------------------------------------------
# Middlewares
# ------------------------------------------------------------------------------------------------

def _token_ok(given: str, token: str) -> bool:
    # Compare fixed-length digests: compare_digest is constant time for equal lengths, and this
    # way the token's length does not leak either.
    a = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(token.encode("utf-8")).digest()
    return hmac.compare_digest(a, b)


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    q = request.query.get("token")
    return q if q else None


def _path_match(path: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if p.endswith("/*"):
            if path.startswith(p[:-1]):
                return True
        elif path == p:
            return True
    return False


def _same_origin(request: web.Request, origin: str) -> bool:
    host = request.headers.get("Host", "")
    return bool(host) and origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower())


def _cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Expose-Headers": "Retry-After, Location"}


_SESSION_ROUTE = re.compile(r"^/v1/sessions/[^/]+/(?!whep\b)(.+)$")
_WHEP_ROUTE = re.compile(r"^/v1/sessions/[^/]+/whep$")


def canonical_path(path: str) -> str:
    """A session's control route ``/v1/sessions/<id>/say`` is limited like ``/api/say``, and
    its WHEP offer ``/v1/sessions/<id>/whep`` like ``/offer`` (each builds a peer connection)."""
    if _WHEP_ROUTE.match(path):
        return "/offer"
    m = _SESSION_ROUTE.match(path)
    return f"/api/{m.group(1)}" if m else path


class SecurityState:
    """The settings the middlewares enforce now.  :meth:`replace` swaps them at once (a config
    reload: a rotated token is enforced from the next request on)."""

    def __init__(self, settings: SecuritySettings, now: Callable[[], float] = time.monotonic
                 ) -> None:
        self._now = now
        self.buckets: dict[str, TokenBuckets] = {}
        self.replace(settings)

    def replace(self, settings: SecuritySettings) -> None:
        """Enforce ``settings`` from now on (rate-limit buckets kept where a limit is unchanged)."""
        old = getattr(self, "settings", None)
        self.buckets = {name: (self.buckets[name] if old is not None
                               and old.rate_limits.get(name) == lim else TokenBuckets(lim, self._now))
                        for name, lim in settings.rate_limits.items()}
        self.origins = set(settings.cors_origins)
        self.host_check = is_loopback(settings.host) and not settings.trust_host_header
        self.settings = settings


def middlewares(settings: SecuritySettings | SecurityState,
                now: Callable[[], float] = time.monotonic) -> list[Callable[..., Any]]:
    """The middleware chain (outermost first) enforcing ``settings`` — or a live
    :class:`SecurityState`, read at every request; :func:`install` adds them."""
    st = settings if isinstance(settings, SecurityState) else SecurityState(settings, now)

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        limit = st.settings.body_limits.get(canonical_path(request.path), st.settings.max_body_bytes)
        request[LIMIT_KEY] = limit
        if request.content_length is not None and request.content_length > limit:
            return json_error(413, f"request body of {request.content_length} bytes is larger "
                                   f"than the {limit}-byte limit of {request.path}")
        if _path_match(canonical_path(request.path), st.settings.long_lived_paths):
            return await handler(request)
        try:
            async with asyncio.timeout(st.settings.request_timeout_s):
                return await handler(request)
        except TimeoutError:
            return json_error(408, f"request took longer than {st.settings.request_timeout_s:g} s")
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return json_error(500, "internal error (see the agent's log)")

    @web.middleware
    async def host(request: web.Request, handler: Handler) -> web.StreamResponse:
        if st.host_check:
            name = request.host.rsplit(":", 1)[0] if not request.host.startswith("[") \
                else request.host.split("]")[0] + "]"
            if not is_loopback(name):
                return json_error(421, f"Host {request.host!r} is not this loopback server "
                                       "(DNS rebinding?); use http://127.0.0.1:<port>/")
        return await handler(request)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:                     # not a browser cross-origin request
            return await handler(request)
        allowed = origin in st.origins
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not allowed:
                return json_error(403, "origin not allowed")
            return web.Response(status=204, headers={
                **_cors_headers(origin),
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": "600"})
        if not allowed and not _same_origin(request, origin):
            # Browsers attach Origin to cross-site POSTs and WebSocket handshakes: refusing them
            # here is what keeps other web pages from driving the local agent.
            return json_error(403, f"origin {origin!r} is not allowed (server.cors_origins)")
        if allowed:
            request[_CORS_KEY] = origin
        return await handler(request)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if st.settings.token and not _path_match(request.path, st.settings.public_paths):
            given = _bearer(request)
            if given is None or not _token_ok(given, st.settings.token):
                return json_error(401, "missing or wrong bearer token "
                                       "(Authorization: Bearer <server.token>)",
                                  headers={"WWW-Authenticate": 'Bearer realm="avatar-agent"'})
        return await handler(request)

    @web.middleware
    async def rate(request: web.Request, handler: Handler) -> web.StreamResponse:
        bucket = st.settings.rate_limited_paths.get(canonical_path(request.path))
        if bucket is not None and request.method != "OPTIONS":
            wait = st.buckets[bucket].take(request.remote or "?")
            if wait > 0:
                return json_error(429, f"rate limit for {bucket} exceeded "
                                       f"({st.settings.rate_limits[bucket].per_min:g}/min); "
                                       f"retry in {wait:.1f} s",
                                  headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return await handler(request)

    return [limits, host, cors, auth, rate]


class MalformedRequestLogFilter(logging.Filter):
    """Turns aiohttp's traceback for a malformed request (no Host header, bad request line, ...)
    into one warning line, at most one per ``every_s`` (with a count of the ones in between).

    Such requests are answered 400 by aiohttp before any handler runs; a traceback per request
    would let any client fill the journal with noise.
    """

    def __init__(self, every_s: float = 60.0, now: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self._now = now
        self._last = -math.inf
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass other records; turn a malformed-request traceback into one rate-limited warning."""
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        t = self._now()
        if t - self._last < self.every_s:
            self.suppressed += 1
            return False
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        self._last, self.suppressed = t, 0
        reason = " ".join(str(getattr(exc, "message", "") or exc).split()) or type(exc).__name__
        record.msg = "malformed HTTP request from %s answered 400: %s%s"
        record.args = (record.args[0] if isinstance(record.args, tuple) and record.args else "?",
                       reason, more)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


_MALFORMED_FILTER = MalformedRequestLogFilter()


SECURITY_KEY = web.AppKey("security", SecurityState)


def install(app: web.Application, settings: SecuritySettings,
            now: Callable[[], float] = time.monotonic) -> SecurityState:
    """Add the security middlewares and CORS response headers to ``app`` (before it starts).

    Returns the live state (also ``app[SECURITY_KEY]``): ``replace()`` it on a config reload."""
    state = SecurityState(settings, now)
    app[SECURITY_KEY] = state
    app.middlewares.extend(middlewares(state, now))
    server_log = logging.getLogger("aiohttp.server")
    if _MALFORMED_FILTER not in server_log.filters:
        server_log.addFilter(_MALFORMED_FILTER)

    async def add_cors(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.get(_CORS_KEY)
        if origin:
            response.headers.update(_cors_headers(origin))

    app.on_response_prepare.append(add_cors)
    return state


__all__ = ["SecuritySettings", "RateLimit", "TokenBuckets", "InsecureBindError",
           "PathNotAllowedError", "check_avatar_path", "read_body", "json_error", "install",
           "middlewares", "is_loopback", "LIMIT_KEY", "MalformedRequestLogFilter", "SecurityState",
           "SECURITY_KEY", "canonical_path"]
