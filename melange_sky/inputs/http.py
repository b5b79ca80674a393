"""A small asyncio HTTP/1.1 client for OpenAI-compatible servers (vLLM, SGLang): GET a JSON document, or stream a
completion over server-sent events (SSE) and time every token.

It speaks HTTP/1.1 itself (asyncio streams, standard library only), one connection per request, follows no
redirects and only ever connects to the host and port of the endpoint URL given. Nothing here knows about buckets,
rates or SLOs: the profiler (`melange_sky.inputs.profile`) drives it, and a router can reuse it.
"""
from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from melange_sky.errors import ProfileError

#: Body bytes kept from an HTTP error response, for the message.
_ERROR_BODY_LIMIT = 4096
#: Body bytes kept from a GET (a model list), so a misbehaving server cannot fill memory.
_GET_BODY_LIMIT = 1 << 20
#: The path of OpenAI's (legacy) completions API, which every OpenAI-compatible server serves.
COMPLETIONS_PATH = "/v1/completions"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server's base URL, split into what the HTTP client needs."""

    url: str  # as given, without credentials (user:password@) and a trailing "/"
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/prefix", without a trailing "/v1"
    origin: str = ""  # scheme://host[:port], without credentials

    def path(self, suffix: str) -> str:
        """The request path of an API path ("/v1/models") on this server, behind its prefix."""
        return f"{self.base_path}{suffix}"

    def full_url(self, suffix: str) -> str:
        """The URL of an API path, for messages the user can paste into curl."""
        return f"{self.origin}{self.path(suffix)}"


@dataclass(frozen=True)
class RequestRecord:
    """One streamed request: its timings (seconds) or why it failed."""

    ok: bool
    latency: float
    ttft: float | None = None
    tpot: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the server counted them (usage), when it says
    error: str | None = None
    timed_out: bool = False
    status: int | None = None  # the HTTP status of an error response


class HttpError(Exception):
    """The server's answer is not the HTTP we can read (no status line, a body cut short)."""


def parse_endpoint(url: str) -> Endpoint:
    """http(s)://host[:port][/prefix]; a trailing /v1 is dropped (the client adds /v1/completions itself).

    Credentials in the URL (user:password@) are dropped from everything shown or written; a path into the API
    (/v1/completions, /v1/chat/...) is refused with the base URL to give instead.
    """
    parts = urlsplit(url.strip())
    netloc = parts.netloc.rpartition("@")[2]
    shown = parts._replace(netloc=netloc).geturl()
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProfileError(f"--endpoint {shown!r} is not an http(s) URL; give the server's base URL, e.g. "
                           f"http://10.0.0.5:8000")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ProfileError(f"--endpoint {shown!r} has an invalid port") from None
    origin = f"{parts.scheme}://{netloc}"
    base = parts.path.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    if "/v1/" in f"{base}/":
        prefix = base[:f"{base}/".index("/v1/")]
        raise ProfileError(f"--endpoint {shown!r} points into the API ({parts.path}); give the server's base URL, "
                           f"e.g. {origin}{prefix} (the profiler calls /v1/models and /v1/completions itself)")
    return Endpoint(url=f"{origin}{base}{'/v1' if parts.path.rstrip('/').endswith('/v1') else ''}",
                    scheme=parts.scheme, host=parts.hostname, port=port, base_path=base, origin=origin)


# ---- reading a response --------------------------------------------------------------------------------------------
async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status code and the headers (names in lower case) of a response; HttpError if it is not HTTP."""
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP response: {status_line[:60]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def iter_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body as it arrives: chunked, Content-Length or until the server closes."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise HttpError("connection closed in the middle of the response")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            data = await reader.readexactly(size)
            await reader.readline()
            yield data
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            data = await reader.read(min(remaining, 65536))
            if not data:
                raise HttpError("connection closed in the middle of the response")
            remaining -= len(data)
            yield data
    else:
        while data := await reader.read(65536):
            yield data


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The payload of each `data:` line of a server-sent event stream."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if buffer.startswith(b"data:"):
        yield buffer[5:].strip()


def error_text(status: int, body: bytes) -> str:
    """One line for an error response: "HTTP 404: <the server's message>", from an OpenAI error object if any."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        err = data.get("error", data) if isinstance(data, dict) else data
        text = err.get("message", text) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    text = " ".join(str(text).split())
    return f"HTTP {status}: {text[:200]}" if text else f"HTTP {status}"


def is_client_error(status: int | None) -> bool:
    """An HTTP 4xx that says the request itself is wrong (not 408 timeout or 429 rate limit, which are load)."""
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def os_reason(exc: BaseException) -> str:
    """A short reason for a failed connection or read ("connection refused", "timed out")."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# ---- the client ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Client:
    """Requests to one endpoint. Holds no connection: each request opens its own and closes it when done."""

    endpoint: Endpoint
    connect_timeout: float = 5.0
    api_key: str | None = None  # sent as a Bearer token
    user_agent: str = "melange-sky-profile"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A fresh connection to the endpoint (TLS for https); OSError or TimeoutError if there is none."""
        ep = self.endpoint
        ctx = ssl.create_default_context() if ep.scheme == "https" else None
        return await asyncio.wait_for(asyncio.open_connection(ep.host, ep.port, ssl=ctx), self.connect_timeout)

    def request_bytes(self, method: str, path: str, body: bytes | None) -> bytes:
        """The bytes of one request for an API path; a body is JSON and asks for an event stream back."""
        ep = self.endpoint
        host = ep.host if ":" not in ep.host else f"[{ep.host}]"
        default_port = 443 if ep.scheme == "https" else 80
        lines = [f"{method} {ep.path(path)} HTTP/1.1",
                 f"Host: {host}" + ("" if ep.port == default_port else f":{ep.port}"),
                 f"User-Agent: {self.user_agent}", "Connection: close"]
        if body is not None:
            lines += ["Content-Type: application/json", "Accept: text/event-stream", f"Content-Length: {len(body)}"]
        if self.api_key:
            lines.append(f"Authorization: Bearer {self.api_key}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET an API path: (status, body, at most about 1 MB). Raises what connecting and reading raise."""
        reader, writer = await self.connect()
        try:
            writer.write(self.request_bytes("GET", path, None))
            await writer.drain()
            status, headers = await read_head(reader)
            body = b""
            async for data in iter_body(reader, headers):
                body += data
                if len(body) > _GET_BODY_LIMIT:
                    break
            return status, body
        finally:
            writer.close()

    async def stream_completion(self, payload: bytes, path: str = COMPLETIONS_PATH) -> RequestRecord:
        """POST a streaming completion and time it: time to the first token, and per output token after it.

        Never raises for what the server does: a refused connection, an error status, a broken or empty stream
        come back as a failed record saying why.
        """
        clock = time.perf_counter
        start = clock()
        first = last = None
        chunks = 0
        usage: dict[str, Any] | None = None
        try:
            reader, writer = await self.connect()
        except (OSError, TimeoutError) as exc:
            return RequestRecord(ok=False, latency=clock() - start, error=f"cannot connect: {os_reason(exc)}")
        try:
            writer.write(self.request_bytes("POST", path, payload))
            await writer.drain()
            status, headers = await read_head(reader)
            if status != 200:
                body = b""
                async for data in iter_body(reader, headers):
                    body += data
                    if len(body) > _ERROR_BODY_LIMIT:
                        break
                return RequestRecord(ok=False, latency=clock() - start, error=error_text(status, body),
                                     status=status)
            async for data in sse_data(iter_body(reader, headers)):
                if data == b"[DONE]":
                    break
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    return RequestRecord(ok=False, latency=clock() - start, error=error_text(200, data))
                choices = event.get("choices") or []
                if choices and isinstance(choices[0], dict) and choices[0].get("text"):
                    now = clock()
                    if first is None:
                        first = now
                    last = now
                    chunks += 1
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
        except (OSError, asyncio.IncompleteReadError, HttpError, ValueError) as exc:
            return RequestRecord(ok=False, latency=clock() - start, error=f"broken response: {os_reason(exc)}")
        finally:
            writer.close()
        end = clock()
        if first is None or last is None:
            return RequestRecord(ok=False, latency=end - start, error="the stream ended without any token")
        tokens = chunks
        prompt_tokens = None
        if usage:
            try:
                tokens = int(usage.get("completion_tokens") or chunks)
            except (TypeError, ValueError):  # a server's odd usage object does not lose the timings
                tokens = chunks
            prompt_tokens = usage.get("prompt_tokens")
        tpot = (last - first) / (tokens - 1) if tokens > 1 else None
        return RequestRecord(ok=True, latency=end - start, ttft=first - start, tpot=tpot, output_tokens=tokens,
                             prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None)

    async def timed_completion(self, payload: bytes, timeout: float, path: str = COMPLETIONS_PATH) -> RequestRecord:
        """`stream_completion` bounded by `timeout` seconds in all; past it, a record marked `timed_out`."""
        start = time.perf_counter()
        try:
            return await asyncio.wait_for(self.stream_completion(payload, path), timeout)
        except TimeoutError:
            return RequestRecord(ok=False, latency=time.perf_counter() - start, timed_out=True,
                                 error=f"timed out after {timeout:g} s")


__all__ = [
    "COMPLETIONS_PATH", "Client", "Endpoint", "HttpError", "RequestRecord", "error_text", "is_client_error",
    "iter_body", "os_reason", "parse_endpoint", "read_head", "sse_data",
]
