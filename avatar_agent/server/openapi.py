"""OpenAPI 3.1 document for the control API, built from the same endpoint table the routes use.

Each :class:`Endpoint` states its method, path, JSON body schema and responses; the control module
registers one aiohttp route per endpoint and validates bodies against the same schema, so the
document cannot drift from what the server accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["json", "audio", "sse", "websocket", "none"]


@dataclass(frozen=True)
class Endpoint:
    """One route of the control API.

    Attributes:
        method: "GET" or "POST".
        path: URL path (e.g. "/api/say").
        summary: one line for the document.
        body: JSON schema of the request body (kind "json"), or None.
        kind: what the request carries / the response is: a JSON body, an audio upload, an
            event stream (SSE), a WebSocket, or nothing.
        query: query parameters: name → (JSON schema, description).
        responses: status → description.
        result: JSON schema of the 200/202 response body.
    """

    method: str
    path: str
    summary: str
    body: dict[str, Any] | None = None
    kind: Kind = "none"
    query: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    responses: dict[int, str] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    description: str = ""


_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}


def document(endpoints: list[Endpoint], *, title: str = "avatar-agent control API",
             version: str = "0.1.0", bearer: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a JSON-serialisable dict) for ``endpoints``."""
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        op: dict[str, Any] = {"summary": ep.summary,
                              "operationId": _operation_id(ep)}
        if ep.description:
            op["description"] = ep.description
        if ep.query:
            op["parameters"] = [{"name": name, "in": "query", "required": False,
                                 "schema": schema, "description": desc}
                                for name, (schema, desc) in ep.query.items()]
        if ep.kind == "json" and ep.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": ep.body}}}
        elif ep.kind == "audio":
            op["requestBody"] = {"required": True, "content": {
                "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                             "description": "raw PCM; see rate/channels/format"}}}
        responses: dict[str, Any] = {}
        ok = "202" if 202 in ep.responses else "200"
        if ep.kind == "sse":
            responses["200"] = {"description": ep.responses.get(200, "event stream"),
                                "content": {"text/event-stream": {"schema": {"type": "string"}}}}
        elif ep.kind == "websocket":
            responses["101"] = {"description": ep.responses.get(101, "WebSocket upgrade")}
        else:
            body = {"application/json": {"schema": ep.result or {"type": "object"}}}
            responses[ok] = {"description": ep.responses.get(int(ok), "OK"), "content": body}
        for status, desc in sorted(ep.responses.items()):
            if str(status) in responses:
                continue
            responses[str(status)] = {"description": desc,
                                      "content": {"application/json": {"schema": _ERROR}}}
        op["responses"] = responses
        if ep.kind == "websocket":
            op["x-websocket"] = True
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    doc: dict[str, Any] = {"openapi": "3.1.0",
                           "info": {"title": title, "version": version},
                           "paths": paths}
    if bearer:
        doc["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
        doc["security"] = [{"bearer": []}]
    return doc


def _operation_id(ep: Endpoint) -> str:
    name = ep.path.removeprefix("/api/").replace("/", "_").replace(".", "_") or "root"
    return f"{ep.method.lower()}_{name}"


__all__ = ["Endpoint", "document"]
