"""Failures on the aiohttp side: what a failed try was, reporting it to the outlier detector (`outliers.py`, which
decides), the answer when every try failed, and the probes that bring replicas back.

A connection-level failure is reported at once (a replica that cannot be reached is down at once). A 5xx answer is
only held (`Failure.reply`): the data path reports it as confirmed when another replica then answers the same
request, and drops it when a second replica answers 5xx too (the request is at fault) or none is tried.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from melange_sky.serve.metrics import Metrics
from melange_sky.serve.openai_errors import error_response, upstream_message
from melange_sky.serve.outliers import Ejection, OutlierDetector
from melange_sky.serve.policy import Replica

__all__ = ["BUDGET_SPENT", "POISON", "Failure", "Failures", "describe"]

#: Why the router stopped trying other replicas before it ran out of them or of --retries (added to the 502).
POISON = ("; two replicas answered it with a 5xx, so the router tried no other (the request itself may be what "
          "fails; it counts against no replica)")
BUDGET_SPENT = "; the retry budget is spent (too many retries in flight at once), so the router tried no other"


@dataclass
class Failure:
    """A try that failed before any byte reached the client. `status` is the upstream's 5xx when it answered one
    (`reply`), else 0; `detail` says what happened, for the log and the client's error."""

    replica: Replica
    detail: str
    kind: str  # the upstream error kind (metrics): connect, disconnect, timeout, empty, status_5xx
    status: int = 0

    @property
    def reply(self) -> bool:
        return self.status > 0


class Failures:
    """Reports failed tries to the outlier detector, logs and counts its ejections, and probes ejected replicas."""

    def __init__(self, outliers: OutlierDetector, metrics: Metrics, log: Callable[[str], None]):
        self.outliers = outliers
        self.metrics = metrics
        self.log = log
        self._probing: set[str] = set()

    # -- tries -------------------------------------------------------------------------------------------------------
    def connection(self, replica: Replica, exc: BaseException | None) -> Failure:
        """A connection-level failure (None: a stream that ended before any data): counted against the replica at
        once, down when it cannot be reached."""
        if exc is None:
            reason, kind = "the stream ended before any data", "empty"
        else:
            reason, kind = describe(exc), _kind(exc)
        self.metrics.upstream_error(replica.name, replica.gpu, kind)
        now = time.monotonic()
        if kind == "connect":  # refused, unreachable, unknown host, or no connection within the connect timeout
            self.record(self.outliers.unreachable(replica, reason, now))
        else:
            self.record(self.outliers.gateway_failure(replica, reason, now))
        return Failure(replica, f"replica {replica.name} ({replica.gpu}) failed: {reason}", kind)

    def answered_5xx(self, replica: Replica, status: int, data: bytes) -> Failure:
        """A 5xx answer: held until the request's other tries judge it (`confirmed`)."""
        self.metrics.upstream_error(replica.name, replica.gpu, "status_5xx")
        return Failure(replica, f"replica {replica.name} ({replica.gpu}) answered HTTP {status}: "
                                f"{upstream_message(data)}", "status_5xx", status)

    def confirmed(self, failures: Iterable[Failure]) -> None:
        """Another replica answered the request these 5xx answers failed: they count against their replicas."""
        now = time.monotonic()
        for failure in failures:
            self.record(self.outliers.confirmed_5xx(failure.replica, failure.detail, now))

    def cut(self, replica: Replica, exc: BaseException) -> str:
        """A stream broken after it began: a connection-level failure of its replica. Returns what happened."""
        reason = describe(exc)
        self.metrics.upstream_error(replica.name, replica.gpu, "stream_cut")
        self.record(self.outliers.gateway_failure(replica, reason, time.monotonic()))
        return reason

    def answered(self, replica: Replica) -> None:
        self.outliers.answered(replica)

    def record(self, ejection: Ejection | None) -> None:
        """Log and count an ejection the outlier detector made (count only one its cap prevented: it may come with
        every failure of a replica while the cap holds)."""
        if ejection is None:
            return
        replica = ejection.replica
        if ejection.capped:
            self.metrics.ejection_capped(replica.gpu, ejection.reason)
            return
        self.metrics.ejection(replica.gpu, ejection.reason)
        self.log(f"ejected {replica.name} ({replica.gpu}, {replica.url}): {ejection.detail} [{ejection.reason}]; "
                 f"probing /health in {ejection.probe_in_s:.3g} s")

    @staticmethod
    def gave_up(failure: Failure, tries: int, why: str, headers: dict[str, str]) -> web.Response:
        """Every try failed: 502 (504 when the last one timed out), naming the last failure and why no other."""
        status = 504 if failure.kind == "timeout" else 502
        message = (f"no replica could serve this request ({tries} tr{'y' if tries == 1 else 'ies'}); the last: "
                   f"{failure.detail}{why}")
        return error_response(status, message, "upstream_error" if status == 502 else "timeout_error",
                              "upstream_failed" if status == 502 else "upstream_timeout", headers=headers)

    @staticmethod
    def stream_error_event(reason: str) -> bytes:
        """The last event of a stream whose replica failed after it began."""
        return orjson.dumps({"error": {"message": f"the replica serving this stream failed: {reason}",
                                       "type": "server_error", "param": None, "code": 502}})

    # -- probes ------------------------------------------------------------------------------------------------------
    def due(self, replicas: Iterable[Replica], now: float) -> list[Replica]:
        """Ejected replicas whose probe is due and not already running, marked as probing (`probe` unmarks)."""
        due = [r for r in replicas if r.ejected and r.retry_at <= now and r.name not in self._probing]
        self._probing.update(r.name for r in due)
        return due

    async def probe(self, replica: Replica, session: aiohttp.ClientSession, headers: dict[str, str],
                    timeout_s: float) -> None:
        """`GET /health`: 200 re-admits the replica; anything else doubles its wait."""
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with session.get(replica.url + "/health", headers=headers, timeout=timeout) as answer:
                ok, reason = answer.status == 200, f"GET /health: HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, reason = False, f"GET /health: {describe(exc)}"
        finally:
            self._probing.discard(replica.name)
        if self.outliers.probed(replica, ok, reason, time.monotonic()):
            self.log(f"re-admitted {replica.name} ({replica.gpu}): /health answered 200")


def describe(exc: BaseException) -> str:
    """A failed upstream call, in a few words."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        return f"cannot connect: {os.strerror(error.errno) if error.errno else error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "cannot connect: no connection within the connect timeout"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _kind(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return "connect"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "disconnect"

