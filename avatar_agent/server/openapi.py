"""The API's endpoint table type, its JSON Schema validation, and its OpenAPI 3.1 document.

One set of definitions serves both sides: each :class:`Endpoint` states its method, path, JSON
Schema of the body (and of its query parameters or WebSocket messages) and its responses.  The
server validates every body with :func:`validate` (the ``jsonschema`` library, JSON Schema 2020-12,
the dialect OpenAPI 3.1 uses) against exactly the schema :func:`document` publishes, so the
document cannot drift from what the server accepts.  Validation errors become one line naming the
field and what it must be (``body.text must be a string, got a number``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from jsonschema import Draft202012Validator, ValidationError, validators

Kind = Literal["json", "audio", "sse", "websocket", "none"]


@dataclass(frozen=True)
class Endpoint:
    """One route of an API.

    Attributes:
        method: "GET", "POST" or "DELETE".
        path: URL path (e.g. "/api/say").
        summary: one line for the document.
        body: JSON schema of the request body (kind "json"), or None.
        kind: what the request carries / the response is: a JSON body, an audio upload, an
            event stream (SSE), a WebSocket, or nothing.
        query: query parameters: name → (JSON schema, description).
        responses: status → description.
        result: JSON schema of the 200/202 response body.
        description: longer text for the document.
        messages: a WebSocket's JSON text messages from the client: name → JSON schema
            (published as ``x-websocket-messages``; the server validates them with these).
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
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def operation_id(self) -> str:
        """``<method>_<path words>`` (``post_say``, ``get_events_ws``): the document's
        operationId, and the name of the handler method that serves it."""
        name = re.sub(r"[/.{}]+", "_", self.path.removeprefix("/api/")).strip("_") or "root"
        return f"{self.method.lower()}_{name}"


# ------------------------------------------------------------------------------------------------
# Parsing and validation
# ------------------------------------------------------------------------------------------------

class BadRequest(ValueError):
    """The request does not match the endpoint's schema (the message names the field)."""


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):              # 1e999 parses to inf: not representable in JSON
        raise BadRequest(f"number {text[:20]} is out of range (numbers must be finite)")
    return v


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, finite numbers only, bounded nesting (hostile input → BadRequest)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8 text") from None
    if not text.strip():
        raise BadRequest("body is empty; send a JSON object")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadRequest("JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"body is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _is_integer(checker: Any, instance: Any) -> bool:
    # JSON Schema counts 3.0 as an integer; a sample rate or channel count given as a float is
    # a client bug worth naming, and the handlers index bytes with these numbers.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
             ) -> Iterator[ValidationError]:
    # JSON Schema patterns are ECMA-262, where "$" ends the text; Python's "$" also matches
    # before a final newline, which would let "en\n" through a voice name pattern.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    if isinstance(instance, str) and not re.search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = validators.extend(
    Draft202012Validator, {"pattern": _pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))

# Which error to report when several apply: the outermost first, then in this order.
_ORDER = ("type", "additionalProperties", "required", "minProperties", "enum", "minLength",
          "pattern", "maxLength", "minimum", "maximum")


def validate(value: Any, schema: dict[str, Any], where: str = "body") -> Any:
    """Check ``value`` against ``schema`` (JSON Schema 2020-12); returns it unchanged.

    Raises BadRequest with one line naming the first problem (``where`` names the value:
    "body", "header", "query", ...).
    """
    errors = list(_Validator(schema).iter_errors(value))
    if not errors:
        return value
    rank = {k: i for i, k in enumerate(_ORDER)}
    e = min(errors, key=lambda e: (len(e.absolute_path), rank.get(str(e.validator), len(rank))))
    raise BadRequest(_message(e, where + "".join(f".{p}" for p in e.absolute_path)))


def _message(e: ValidationError, name: str) -> str:
    v, x, s = e.validator, e.instance, e.schema if isinstance(e.schema, dict) else {}
    if v == "type":
        want = {"object": "a JSON object", "string": "a string", "number": "a number",
                "integer": "an integer", "boolean": "true or false", "array": "an array"}
        return f"{name} must be {want.get(str(e.validator_value), e.validator_value)}, got {_json_type(x)}"
    if v == "additionalProperties":
        props = s.get("properties", {})
        extra = sorted(set(x) - set(props))
        return (f"{name}: unknown field(s) {', '.join(map(repr, extra[:5]))}; "
                f"allowed: {', '.join(props)}")
    if v == "required":
        missing = [k for k in e.validator_value if k not in x]
        return f"{name}: missing required field {missing[0]!r}"
    if v == "minProperties":
        return f"{name}: give at least one of {', '.join(s.get('properties', {}))}"
    if v == "enum":
        return (f"{name} = {str(x)[:40]!r} is not one of "
                f"{', '.join(map(str, e.validator_value))}")
    if v == "minLength" or (v == "pattern" and isinstance(x, str) and not x.strip()):
        return f"{name} must not be empty"
    if v == "pattern":
        return f"{name} {x[:40]!r} has characters outside {e.validator_value}"
    if v == "maxLength":
        return f"{name} is longer than {e.validator_value} characters"
    if v == "minimum":
        return f"{name} = {x} is below the minimum {e.validator_value}"
    if v == "maximum":
        return f"{name} = {x} is above the maximum {e.validator_value}"
    return f"{name}: {e.message}"


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


# ------------------------------------------------------------------------------------------------
# The document
# ------------------------------------------------------------------------------------------------

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}


def document(endpoints: list[Endpoint], *, title: str = "avatar-agent control API",
             version: str = "0.1.0", bearer: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a JSON-serialisable dict) for ``endpoints``."""
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        op: dict[str, Any] = {"summary": ep.summary, "operationId": ep.operation_id}
        if ep.description:
            op["description"] = ep.description
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"{(\w+)}", ep.path)]
        params += [{"name": name, "in": "query", "required": False, "schema": schema,
                    "description": desc} for name, (schema, desc) in ep.query.items()]
        if params:
            op["parameters"] = params
        if ep.kind == "json" and ep.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": ep.body}}}
        elif ep.kind == "audio":
            op["requestBody"] = {"required": True, "content": {
                "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                             "description": "raw PCM; see rate/channels/format"}}}
        responses: dict[str, Any] = {}
        if ep.kind == "sse":
            responses["200"] = {"description": ep.responses.get(200, "event stream"),
                                "content": {"text/event-stream": {"schema": {"type": "string"}}}}
        elif ep.kind == "websocket":
            responses["101"] = {"description": ep.responses.get(101, "WebSocket upgrade")}
        elif not any(200 <= status < 300 for status in ep.responses):
            responses["200"] = {"description": "OK", "content": {
                "application/json": {"schema": ep.result or {"type": "object"}}}}
        for status, desc in sorted(ep.responses.items()):
            if str(status) in responses:
                continue
            if status == 204:
                responses["204"] = {"description": desc}
            elif 200 <= status < 300:
                responses[str(status)] = {"description": desc, "content": {
                    "application/json": {"schema": ep.result or {"type": "object"}}}}
            else:
                responses[str(status)] = {"description": desc,
                                          "content": {"application/json": {"schema": _ERROR}}}
        op["responses"] = responses
        if ep.kind == "websocket":
            op["x-websocket"] = True
            if ep.messages:
                op["x-websocket-messages"] = ep.messages
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    doc: dict[str, Any] = {"openapi": "3.1.0",
                           "info": {"title": title, "version": version},
                           "paths": paths}
    if bearer:
        doc["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
        doc["security"] = [{"bearer": []}]
    return doc


__all__ = ["Endpoint", "BadRequest", "document", "parse_json", "validate"]
