"""Errors in OpenAI's shape, so a client's SDK shows the message: the router's own, and the replicas' it relays.

The shape is OpenAI's and vLLM's, `{"error": {"message", "type", "param", "code"}}` (vLLM sets `code` to the HTTP
status; so does the router when it has no more specific code). An upstream error already in that shape passes
as it is; any other (plain text, FastAPI's `{"detail": ...}`, vLLM's older top-level `{"message", "type", ...}`) is
wrapped, its text kept as the message. The shaping functions take and give bytes; `error_response` makes the
router's own answers.
"""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

__all__ = ["JSON", "MAX_MESSAGE_CHARS", "error_body", "error_response", "error_type", "shaped", "upstream_message"]

JSON = "application/json"

#: An upstream message is cut to this many characters (an HTML error page, a traceback).
MAX_MESSAGE_CHARS = 500

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 409: "conflict_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          502: "upstream_error", 503: "service_unavailable", 504: "timeout_error"}


def error_type(status: int) -> str:
    """The error `type` the router gives a status (OpenAI's names where it has one)."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, kind: str, code: str | int | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def error_response(status: int, message: str, kind: str, code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """One of the router's own errors (`code` None: the status, as vLLM does)."""
    body = error_body(message, kind, code if code is not None else status)
    return web.Response(body=body, status=status, headers={"Content-Type": JSON, **(headers or {})})


def _parse(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _is_shaped(doc: Any) -> bool:
    error = doc.get("error") if isinstance(doc, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and bool(error["message"])


def upstream_message(data: bytes) -> str:
    """The human part of an upstream's error body, on one line: its error message if it has one, else its text."""
    doc = _parse(data)
    message: Any = None
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        if not message:
            message = doc.get("message") or doc.get("detail")
        if message is not None and not isinstance(message, str):
            message = orjson.dumps(message).decode()
    if not message:
        message = data.decode("utf-8", "replace")
    line = " ".join(message.split())
    if len(line) > MAX_MESSAGE_CHARS:
        line = line[:MAX_MESSAGE_CHARS - 1] + "…"
    return line or "(no body)"


def shaped(status: int, data: bytes) -> bytes | None:
    """An upstream's error body in OpenAI's shape: None when it already is (relay it as it is), else the wrapped
    body (keeping a top-level `type`, `param` and `code` when the upstream gave them)."""
    doc = _parse(data)
    if _is_shaped(doc):
        return None
    fields: dict[str, Any] = doc if isinstance(doc, dict) else {}
    kind, code, param = fields.get("type"), fields.get("code"), fields.get("param")
    return error_body(upstream_message(data), kind if isinstance(kind, str) and kind else error_type(status),
                      code if isinstance(code, str | int) and not isinstance(code, bool) else status,
                      param if isinstance(param, str) else None)
