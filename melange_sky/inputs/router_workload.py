"""A running router's observed workload (`workload --from URL`, `watch --autoscale`): its `GET /workload` document
fetched, and read as a `WorkloadResult` like a trace's histogram.

The URL is the router's base URL as `up` and `status` print it, with or without the trailing `/v1`, or the full
`.../workload` URL; http or https (a router with `deployment.router.tls`, verified against `cafile`).
"""
from __future__ import annotations

from typing import Any

from melange_sky.core.buckets import check_edges
from melange_sky.errors import BucketEdgesError, CallFailed, TraceError
from melange_sky.inputs.http import TLS_UNTRUSTED, Client, parse_endpoint
from melange_sky.inputs.trace_rates import observed_rates
from melange_sky.inputs.workload import RateSource, WorkloadResult

#: The router's path for its observed workload.
WORKLOAD_PATH = "/workload"


def fetch_observed(url: str, api_key: str | None = None, timeout: float = 10.0,
                   cafile: str | None = None) -> tuple[str, dict[str, Any]]:
    """GET the observed workload of a `melange-sky serve` router: (the URL read, without credentials, and its JSON).

    `url` is the router's base URL, with or without `/v1` (`/workload` is added), or the full `.../workload` URL;
    `api_key` goes as a Bearer token; `cafile` is the certificate an https router must present. Every failure is a
    one-line `TraceError`."""
    text = url.strip().rstrip("/")
    if text.endswith(WORKLOAD_PATH):
        text = text[:-len(WORKLOAD_PATH)]
    endpoint = parse_endpoint(text, "--from", TraceError, "http://127.0.0.1:8080")
    shown = endpoint.full_url(WORKLOAD_PATH)
    client = Client(endpoint, api_key=api_key, timeout=timeout, cafile=cafile)
    try:
        return shown, client.get_json(WORKLOAD_PATH)
    except CallFailed as exc:
        if exc.status is None:
            untrusted = exc.reason.startswith(TLS_UNTRUSTED) and cafile is None
            raise TraceError(f"{shown}: cannot reach the router ({exc.reason})"
                             + ("; give the router's certificate (workload --cacert FILE)" if untrusted else "")) \
                from None
        hint = {401: ": pass the router's key with --api-key or MELANGE_SKY_API_KEY",
                404: ": is this a melange-sky router (`melange-sky serve`)?"}.get(exc.status)
        if hint is not None:
            raise TraceError(f"{shown}: HTTP {exc.status}{hint}") from None
        if 200 <= exc.status < 300:
            raise TraceError(f"{shown}: {exc.reason}: is this a melange-sky router?") from None
        raise TraceError(f"{shown}: {exc.reason}") from None


def observed_workload(doc: dict[str, Any], source: str, rate: float | None = None,
                      rate_percentile: float | None = None) -> WorkloadResult:
    """The histogram a router counted (its `GET /workload` document) as a `WorkloadResult`, like a trace's: counts
    per bucket by reported sizes, its edges, and its arrival rate unless `rate` is given.

    `rate_percentile` takes that percentile of the router's per-minute arrivals (`minute_arrivals`, or its
    `rate_percentiles`) instead of its mean rate; a router too old to send them makes that a `TraceError`."""
    if rate is not None and rate_percentile is not None:
        raise TraceError("give --rate or --rate-percentile, not both")
    try:
        in_edges = check_edges(doc.get("input_buckets") or [], "input_buckets")
        out_edges = check_edges(doc.get("output_buckets") or [], "output_buckets")
    except BucketEdgesError as exc:
        raise TraceError(f"{source}: not a workload document: {exc}") from None
    counts = doc.get("counts")
    shape = (len(in_edges) - 1, len(out_edges) - 1)
    if (not isinstance(counts, list) or len(counts) != shape[0]
            or not all(isinstance(row, list) and len(row) == shape[1] for row in counts)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for row in counts for c in row)):
        raise TraceError(f"{source}: not a workload document: counts must be a {shape[0]}x{shape[1]} matrix of "
                         f"request counts")
    rows = sum(sum(row) for row in counts)
    span = doc.get("span_s")
    if rows == 0:
        raise TraceError(f"{source}: the router has counted no answered requests in its window yet"
                         + (f" ({span:.0f} s)" if isinstance(span, (int, float)) else "")
                         + "; send traffic through it first")
    warnings = []
    observed = doc.get("total_request_rate")
    mean_rate = (float(observed) if isinstance(observed, (int, float)) and not isinstance(observed, bool)
                 and observed > 0 else None)
    minutes, shown = observed_rates(doc)
    rate_source = RateSource.GIVEN
    if rate is None and rate_percentile is not None:
        picked = shown.get(rate_percentile) if shown is not None else None
        if picked is None and minutes is not None:
            picked = minutes.percentile(rate_percentile)
        if picked is None and isinstance(doc.get("minute_arrivals"), list) and not doc["minute_arrivals"]:
            counted = f" (it has counted for {span:.0f} s)" if isinstance(span, (int, float)) else ""
            raise TraceError(f"{source}: the router has no complete minute of arrivals yet{counted}, so "
                             f"--rate-percentile cannot be read from it: ask again later, or pass --rate")
        if picked is None:
            which = ("no per-minute arrivals (minute_arrivals)" if shown is None
                     else f"no per-minute arrivals (minute_arrivals) and no p{rate_percentile:g} in rate_percentiles")
            raise TraceError(f"{source}: the router reports {which}, so --rate-percentile cannot be read from it "
                             f"(a melange-sky router older than this command?). Drop --rate-percentile, or pass "
                             f"--rate")
        rate, rate_source = picked, RateSource.OBSERVED
    elif rate is None:
        if mean_rate is not None:
            rate, rate_source = mean_rate, RateSource.OBSERVED
        else:
            rate_source = RateSource.NONE
            warnings.append("the router reported no arrival rate, so total_request_rate is not known: pass --rate")
    window = doc.get("window_s")
    if isinstance(span, (int, float)) and isinstance(window, (int, float)) and span < window:
        warnings.append(f"the router has counted for {span:.0f} s of its {window:.0f} s window: a short sample")
    usage = doc.get("usage_source")
    estimated = usage.get("estimated", 0) if isinstance(usage, dict) else 0
    if isinstance(estimated, int) and estimated > 0:
        warnings.append(f"{estimated} of {rows} request(s) were counted from the router's estimates (streams "
                        f"without usage); clients that send stream_options.include_usage give exact sizes")
    clamped: dict[str, int] = {}
    for key in ("input_overflow", "output_overflow", "input_underflow", "output_underflow"):
        value = doc.get(key)
        clamped[key] = value if isinstance(value, int) and value >= 0 else 0
    for axis, edges in (("input", in_edges), ("output", out_edges)):
        if clamped[f"{axis}_overflow"]:
            warnings.append(f"{clamped[f'{axis}_overflow']} request(s) have {axis} lengths above the last {axis} "
                            f"edge ({edges[-1]} tokens) and were counted in the last {axis} bucket")
    return WorkloadResult(
        source=source, format="router", input_edges=in_edges, output_edges=out_edges,
        counts=tuple(tuple(row) for row in counts), rows=rows, skipped=0, skipped_examples=(),
        input_overflow=clamped["input_overflow"], output_overflow=clamped["output_overflow"],
        input_underflow=clamped["input_underflow"], output_underflow=clamped["output_underflow"],
        timestamped_rows=0, first_timestamp=None, last_timestamp=None, rate=rate, rate_source=rate_source,
        warnings=tuple(warnings), mean_rate=mean_rate, rate_percentiles=shown,
        rate_percentile=rate_percentile if rate_source is RateSource.OBSERVED else None)


__all__ = ["WORKLOAD_PATH", "fetch_observed", "observed_workload"]
