"""The one HTTP client for melange-sky's own endpoints (a router's /workload and /admin/routes, a replica's
readiness path) and for the OpenAI-compatible servers the profiler measures.

* `parse_endpoint`: a base URL, http or https, with or without the trailing `/v1` that `up` and `status` print; a
  path prefix is kept, credentials (user:password@) are dropped from everything shown, a path into the API
  (`/v1/completions`) is refused with the base URL to give instead.
* `Client`: one endpoint with its key (a Bearer token: never in a URL or a message), timeouts and TLS (the system's
  CAs, or only a given CA or certificate file, as for a router with a self-signed certificate). Synchronous JSON
  calls (`get_json`, `put_json`, `status`) for the CLI, the fleet and the controller, which call from worker
  threads; asynchronous streamed completions (`stream_completion`) for the profiler, which times every token.
* one-line errors: `CallFailed` says what was called and why (the HTTP status and the server's message, or why
  there was no answer); the caller adds what to do about it.

It follows no redirects and uses no proxy from the environment: a key goes only to the host and port named. The
standard library only (http.client, asyncio streams, ssl).
"""
from __future__ import annotations

import asyncio
import functools
import http.client
import json
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from melange_sky.core.tls import client_context
from melange_sky.errors import CallFailed, MelangeError, ProfileError

#: Body bytes kept from an HTTP error response, for the message.
_ERROR_BODY_LIMIT = 4096
#: Body bytes kept from a GET, so a misbehaving server cannot fill memory (a router's /workload is a few KB, a
#: routes document at most 8 MiB).
BODY_LIMIT = 1 << 24
#: The path of OpenAI's (legacy) completions API, which every OpenAI-compatible server serves.
COMPLETIONS_PATH = "/v1/completions"
#: Body bytes kept from an async GET (a model list).
_GET_BODY_LIMIT = 1 << 20
#: How a `CallFailed` reason starts when the server's TLS certificate is not the one trusted (callers add how to
#: give it: --cacert, the router's certfile).
TLS_UNTRUSTED = "TLS certificate not trusted"
#: The response header in which a melange-sky router names the GPU type of the replica that answered.
GPU_HEADER = "x-melange-gpu"
#: Seconds a synchronous call may wait for the connection and then for each read.
DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Endpoint:
    """A server's base URL, split into what the HTTP client needs."""

    url: str  # as given, without credentials (user:password@) and a trailing "/"
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/prefix", without a trailing "/v1"
    origin: str = ""  # scheme://host[:port], without credentials

    @property
    def base_url(self) -> str:
        """scheme://host[:port][/prefix]: where the API paths (/v1/..., /workload) go, for messages."""
        return f"{self.origin}{self.base_path}"

    def path(self, suffix: str) -> str:
        """The request path of an API path ("/v1/models") on this server, behind its prefix."""
        return f"{self.base_path}{suffix}"

    def full_url(self, suffix: str) -> str:
        """The URL of an API path, for messages the user can paste into curl."""
        return f"{self.origin}{self.path(suffix)}"


def parse_endpoint(url: str, what: str = "--endpoint", error: type[Exception] = ProfileError,
                   example: str = "http://10.0.0.5:8000") -> Endpoint:
    """http(s)://host[:port][/prefix][/v1]: the trailing /v1 is dropped (the client adds the API paths itself).

    Credentials in the URL (user:password@) are dropped from everything shown or written; a path into the API
    (/v1/completions, /v1/chat/...) is refused with the base URL to give instead. `error` (a MelangeError class) is
    raised, naming `what` (the option or source the URL came from), with `example` as the form to give.
    """
    parts = urlsplit(url.strip())
    netloc = parts.netloc.rpartition("@")[2]
    shown = parts._replace(netloc=netloc).geturl()
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise error(f"{what} {shown!r} is not an http(s) URL; give the server's base URL, e.g. {example}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise error(f"{what} {shown!r} has an invalid port") from None
    origin = f"{parts.scheme}://{netloc}"
    base = parts.path.rstrip("/")
    with_v1 = base.endswith("/v1")
    if with_v1:
        base = base[:-3]
    if "/v1/" in f"{base}/":
        prefix = base[:f"{base}/".index("/v1/")]
        raise error(f"{what} {shown!r} points into the API ({parts.path}); give the server's base URL, e.g. "
                    f"{origin}{prefix} (the API paths are added to it)")
    return Endpoint(url=f"{origin}{base}{'/v1' if with_v1 else ''}", scheme=parts.scheme, host=parts.hostname,
                    port=port, base_path=base, origin=origin)


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
    gpu: str | None = None  # the GPU type that answered, when a melange-sky router says (its X-Melange-Gpu header)


class HttpError(Exception):
    """The server's answer is not the HTTP we can read (no status line, a body cut short)."""


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


def first_line(data: bytes, limit: int = 300) -> str:
    """The first line of an answer's body, cut at `limit` characters, for a one-line message."""
    text = data.decode("utf-8", "replace").strip()
    line = text.splitlines()[0] if text else "(empty answer)"
    return line if len(line) <= limit else line[:limit] + "..."


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
    return first_line(str(exc).encode(), 200) if str(exc).strip() else type(exc).__name__



# ---- the client ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """An HTTP answer of a synchronous call, whatever its status."""

    status: int
    body: bytes


@dataclass(frozen=True)
class Client:
    """Calls to one endpoint. Holds no connection: each call opens its own and closes it when done.

    `cafile` (PEM): an https endpoint must present this certificate (a router's own, self-signed or not; see
    `core.tls`); without it, the system's CAs and the host name are checked as by any HTTPS client.
    """

    endpoint: Endpoint
    connect_timeout: float = 5.0  # streamed completions: the connection (the request has its own time limit)
    api_key: str | None = None  # sent as a Bearer token
    user_agent: str = "melange-sky"
    timeout: float = DEFAULT_TIMEOUT_S  # synchronous calls: the connection, then each read
    cafile: str | None = None

    # -- shared by both kinds of call ---------------------------------------------------------------------------
    def tls(self) -> ssl.SSLContext | None:
        """The TLS context for an https endpoint (None for http); `CallFailed` when `cafile` is not usable."""
        if self.endpoint.scheme != "https":
            return None
        if self.cafile is None:
            return _system_tls()
        try:  # read each time: a long-running controller sees a renewed certificate
            return client_context(self.cafile)
        except MelangeError as exc:
            raise CallFailed(self.endpoint.base_url, f"cannot verify its TLS certificate: {exc}") from None

    def headers(self, json_body: bool = False, stream: bool = False) -> dict[str, str]:
        """The request headers: the key as a Bearer token, JSON in and out."""
        headers = {"User-Agent": self.user_agent, "Accept": "text/event-stream" if stream else "application/json"}
        if json_body:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def clean(self, text: str) -> str:
        """`text` without the key, whatever echoed it (a proxy, a server quoting the request)."""
        return text.replace(self.api_key, "[key]") if self.api_key else text

    # -- synchronous JSON calls (the CLI, the fleet, the controller) ---------------------------------------------
    def call(self, method: str, path: str, body: bytes | None = None, limit: int = BODY_LIMIT) -> Answer:
        """One request for an API path and its answer, whatever the status (at most `limit` body bytes kept).
        `CallFailed` (status None) when there is no answer: its reason is why ("connection refused", "timed out",
        a TLS certificate not trusted, an answer that is not HTTP)."""
        ep = self.endpoint
        target = f"{method} {ep.full_url(path)}"
        context = self.tls()
        connection = (http.client.HTTPSConnection(ep.host, ep.port, timeout=self.timeout, context=context)
                      if context is not None else http.client.HTTPConnection(ep.host, ep.port, timeout=self.timeout))
        try:
            connection.request(method, ep.path(path), body=body, headers=self.headers(json_body=body is not None))
            response = connection.getresponse()
            return Answer(response.status, response.read(limit))
        except ssl.SSLCertVerificationError as exc:
            raise CallFailed(target, self.clean(f"{TLS_UNTRUSTED}: {exc.verify_message}")) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise CallFailed(target, self.clean(os_reason(exc))) from None
        finally:
            connection.close()

    def json_call(self, method: str, path: str, doc: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A call with a JSON body (or none) whose 2xx answer is a JSON object; `CallFailed` otherwise: an error
        status with the server's message (OpenAI's `error.message`, or its first line), or an answer that is not
        a JSON object."""
        body = json.dumps(doc, separators=(",", ":")).encode() if doc is not None else None
        answer = self.call(method, path, body)
        target = f"{method} {self.endpoint.full_url(path)}"
        if not 200 <= answer.status < 300:
            raise CallFailed(target, self.clean(error_text(answer.status, answer.body)), answer.status)
        try:
            data = json.loads(answer.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            raise CallFailed(target, self.clean(f"the answer is not a JSON object: {first_line(answer.body)}"),
                             answer.status)
        return data

    def get_json(self, path: str) -> dict[str, Any]:
        """GET an API path whose answer is a JSON object (see `json_call`)."""
        return self.json_call("GET", path)

    def put_json(self, path: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        """PUT a JSON document to an API path; the answer is a JSON object (see `json_call`)."""
        return self.json_call("PUT", path, doc)

    def status(self, path: str) -> int:
        """GET an API path for its status alone (a readiness probe); `CallFailed` without an answer."""
        return self.call("GET", path, limit=_ERROR_BODY_LIMIT).status

    # -- streamed completions (the profiler; asyncio) -------------------------------------------------------------
    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A fresh connection to the endpoint (TLS for https); OSError or TimeoutError if there is none."""
        ep = self.endpoint
        return await asyncio.wait_for(asyncio.open_connection(ep.host, ep.port, ssl=self.tls()),
                                      self.connect_timeout)

    def request_bytes(self, method: str, path: str, body: bytes | None) -> bytes:
        """The bytes of one request for an API path; a body is JSON and asks for an event stream back."""
        ep = self.endpoint
        host = ep.host if ":" not in ep.host else f"[{ep.host}]"
        default_port = 443 if ep.scheme == "https" else 80
        lines = [f"{method} {ep.path(path)} HTTP/1.1",
                 f"Host: {host}" + ("" if ep.port == default_port else f":{ep.port}"), "Connection: close"]
        headers = self.headers(json_body=body is not None, stream=body is not None)
        if body is not None:
            headers["Content-Length"] = str(len(body))
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET an API path: (status, body, at most about 1 MB). Raises what connecting and reading raise."""
        status, _, body = await self.get_with_headers(path)
        return status, body

    async def get_with_headers(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """GET an API path: (status, headers with lower-case names, body, at most about 1 MB)."""
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
            return status, headers, body
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
        gpu: str | None = None
        try:
            reader, writer = await self.connect()
        except (OSError, TimeoutError) as exc:
            return RequestRecord(ok=False, latency=clock() - start, error=f"cannot connect: {os_reason(exc)}")
        try:
            writer.write(self.request_bytes("POST", path, payload))
            await writer.drain()
            status, headers = await read_head(reader)
            gpu = headers.get(GPU_HEADER)
            if status != 200:
                body = b""
                async for data in iter_body(reader, headers):
                    body += data
                    if len(body) > _ERROR_BODY_LIMIT:
                        break
                return RequestRecord(ok=False, latency=clock() - start, error=error_text(status, body),
                                     status=status, gpu=gpu)
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
                    return RequestRecord(ok=False, latency=clock() - start, error=error_text(200, data), gpu=gpu)
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
            return RequestRecord(ok=False, latency=clock() - start, error=f"broken response: {os_reason(exc)}",
                                 gpu=gpu)
        finally:
            writer.close()
        end = clock()
        if first is None or last is None:
            return RequestRecord(ok=False, latency=end - start, error="the stream ended without any token",
                                 gpu=gpu)
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
                             prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None, gpu=gpu)

    async def timed_completion(self, payload: bytes, timeout: float, path: str = COMPLETIONS_PATH) -> RequestRecord:
        """`stream_completion` bounded by `timeout` seconds in all; past it, a record marked `timed_out`."""
        start = time.perf_counter()
        try:
            return await asyncio.wait_for(self.stream_completion(payload, path), timeout)
        except TimeoutError:
            return RequestRecord(ok=False, latency=time.perf_counter() - start, timed_out=True,
                                 error=f"timed out after {timeout:g} s")


@functools.cache
def _system_tls() -> ssl.SSLContext:
    """One context trusting the system's CAs: building one loads them (milliseconds), and a profile makes a
    connection per request."""
    return client_context(None)


__all__ = [
    "BODY_LIMIT", "COMPLETIONS_PATH", "DEFAULT_TIMEOUT_S", "GPU_HEADER", "TLS_UNTRUSTED", "Answer", "Client",
    "Endpoint", "HttpError",
    "RequestRecord", "error_text", "first_line", "is_client_error", "iter_body", "os_reason", "parse_endpoint",
    "read_head", "sse_data",
]
