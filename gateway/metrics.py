"""The Prometheus metric families (docs/api.md#metrics), and their label children bound
once, so counting costs the hot path one `inc()` or `observe()`, never a label lookup
(HTTP requests, counted on every request, cost less still: `HttpRequests`).

Every process counts its own (`gateway serve` answers `GET /metrics`, `gateway worker`
on `GATEWAY_METRICS_PORT`; `gateway/metrics_http.py` serves them): Prometheus scrapes
each as its own target and PromQL sums across them. Labels are bounded: route
templates, services, backends, status codes and outcomes from fixed lists, never a key,
job id or prompt. This module only counts; nothing here does I/O.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

from gateway.config import BACKENDS

# The `*_created` series (a timestamp per labelled child) would double each scrape for
# nothing a dashboard reads.
disable_created_metrics()

#: `route` of a request no route matched (or answered before routing: a CORS preflight,
#: a body over the limit)
UNMATCHED = "unmatched"
#: `backend` of a job that ended before any backend was tried, or outside one
NO_BACKEND = "none"

#: up to the longest a waiting answer may take (GATEWAY_SYNC_WAIT_SECONDS: 300 by
#: default, 3600 at most)
HTTP_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    *(120, 300, 600, 1800, 3600),
)
#: from the built-in renderer's tenths of a second to well past the default deadline
#: (GATEWAY_JOB_DEADLINE_SECONDS, 900), for one raised to an hour
JOB_BUCKETS = (
    *(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900),
    *(1800, 3600),
)


class HttpRequests:
    """`gateway_http_requests` and `gateway_http_request_duration_seconds`, counted in
    plain numbers by the outermost middleware (`gateway/telemetry_http.py`, on the event
    loop's thread) and made into their families when scraped: a request costs two dict
    lookups and three additions, where prometheus-client's `inc()` and `observe()` take
    a lock for each of their three additions."""

    #: each bucket's `le`, `+Inf` last, as prometheus-client writes them
    LE = [*map(floatToGoString, HTTP_BUCKETS), "+Inf"]

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        #: per route: the observations in each bucket (not cumulative), then their sum
        self.durations: dict[str, list[float]] = {}

    def count(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        observed = self.durations.get(route)
        if observed is None:
            observed = self.durations[route] = [0] * (len(self.LE) + 1)
        observed[bisect.bisect_left(HTTP_BUCKETS, seconds)] += 1
        observed[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gateway_http_requests",
            "HTTP requests answered, by route template and status code.",
            labels=["route", "status"],
        )
        for (route, status), n in list(self.requests.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        duration = HistogramMetricFamily(
            "gateway_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by route template.",
            labels=["route"],
        )
        for route, observed in list(self.durations.items()):
            cumulative = itertools.accumulate(observed[:-1])
            duration.add_metric([route], list(zip(self.LE, cumulative, strict=True)), observed[-1])
        yield duration


HTTP = HttpRequests()
REGISTRY.register(HTTP)

ADMISSIONS = Counter(
    "gateway_admissions",
    "Generation requests by what admission decided.",
    ["outcome"],
)
JOBS = Counter(
    "gateway_jobs",
    "Jobs ended by a worker (or cancelled by their owner), by service, backend and status.",
    ["service", "backend", "status"],
)
JOB_DURATION = Histogram(
    "gateway_job_duration_seconds",
    "Time from a job's admission to its completion, completed jobs, by backend.",
    ["backend"],
    buckets=JOB_BUCKETS,
)
UPSTREAM_REQUESTS = Counter(
    "gateway_upstream_requests",
    "HTTP calls to upstream providers (each retry counts), by backend and outcome.",
    ["backend", "outcome"],
)
CREDITS_CHARGED = Counter(
    "gateway_credits_charged",
    "Credits kept for completed jobs (reservations refunded on failure are not counted).",
)
QUEUE_DEPTH = Gauge(
    "gateway_queue_depth",
    "Jobs admitted and not yet taken by a worker (all shards; the same figure from every "
    "process, read from Redis at most every GATEWAY_METRICS_REFRESH_SECONDS).",
)
JOBS_IN_FLIGHT = Gauge(
    "gateway_jobs_in_flight",
    "Jobs a worker has taken and not finished (all shards; the same figure from every "
    "process, read from Redis at most every GATEWAY_METRICS_REFRESH_SECONDS).",
)
CIRCUIT_OPEN = Gauge(
    "gateway_backend_circuit_open",
    "1 while this process's circuit breaker for the backend is not closed (open, or "
    "half-open awaiting its trial), else 0.",
    ["backend"],
)
WEBHOOK_DELIVERIES = Counter(
    "gateway_webhook_deliveries",
    "Webhook delivery attempts: delivered (2xx), retrying (failed, another attempt "
    "scheduled) or failed (the last attempt failed, or the job's record expired before "
    "one was made).",
    ["outcome"],
)
WORKER_JOBS_RUNNING = Gauge(
    "gateway_worker_jobs_running",
    "Jobs this process's worker is running now (0 where no worker runs).",
)

ADMISSION_OUTCOMES = (
    "accepted",  # admitted to run
    "cache_hit",  # answered from the result cache
    "coalesced",  # joined an identical job in flight
    "duplicate",  # an idempotency key seen before: the earlier job
    "rate_limited",
    "insufficient_credits",
    "invalid",  # the request's input refused (BAD_USER_INPUT and the like)
    "unauthenticated",
    "forbidden",  # a client token's rules
    "unavailable",  # no backend enabled, or the store unreachable
)
UPSTREAM_OUTCOMES = (
    "ok",  # 2xx
    "client_error",  # 4xx other than 429
    "rate_limited",  # 429
    "server_error",  # 5xx, or any other answer that is no 2xx or 4xx
    "timeout",
    "connection_error",  # refused, reset, cut off, or a broken answer
)
WEBHOOK_OUTCOMES = ("delivered", "retrying", "failed")
JOB_STATUSES = ("completed", "failed", "cancelled")


M = TypeVar("M", bound=MetricWrapperBase)


def _bound(family: M, names: tuple[str, ...]) -> dict[str, M]:
    return {name: family.labels(name) for name in names}


#: admission outcome -> its counter
ADMITTED = _bound(ADMISSIONS, ADMISSION_OUTCOMES)
#: a refusal's error code -> its admission counter (any other code: `invalid`)
REFUSED = {
    "RATE_LIMITED": ADMITTED["rate_limited"],
    "INSUFFICIENT_CREDITS": ADMITTED["insufficient_credits"],
    "UNAUTHENTICATED": ADMITTED["unauthenticated"],
    "FORBIDDEN": ADMITTED["forbidden"],
    "SERVICE_UNAVAILABLE": ADMITTED["unavailable"],
}
#: admission mode (`Admitted.mode`) -> its counter
ADMITTED_AS = {
    "run": ADMITTED["accepted"],
    "hit": ADMITTED["cache_hit"],
    "follow": ADMITTED["coalesced"],
}
WEBHOOK = _bound(WEBHOOK_DELIVERIES, WEBHOOK_OUTCOMES)


def refused(code: str) -> None:
    """Count a generation request refused with the error `code`."""
    REFUSED.get(code, ADMITTED["invalid"]).inc()


class UpstreamTally:
    """The upstream counters of one backend, bound once (`HTTPBackend` holds one)."""

    __slots__ = (
        "client_error",
        "connection_error",
        "ok",
        "rate_limited",
        "server_error",
        "timeout",
    )

    def __init__(self, backend: str) -> None:
        self.ok = UPSTREAM_REQUESTS.labels(backend, "ok")
        self.client_error = UPSTREAM_REQUESTS.labels(backend, "client_error")
        self.rate_limited = UPSTREAM_REQUESTS.labels(backend, "rate_limited")
        self.server_error = UPSTREAM_REQUESTS.labels(backend, "server_error")
        self.timeout = UPSTREAM_REQUESTS.labels(backend, "timeout")
        self.connection_error = UPSTREAM_REQUESTS.labels(backend, "connection_error")

    def answered(self, status: int) -> None:
        """Count an answer with HTTP `status`."""
        if 200 <= status < 300:
            self.ok.inc()
        elif status == 429:
            self.rate_limited.inc()
        elif 400 <= status < 500:
            self.client_error.inc()
        else:
            self.server_error.inc()


_TALLIES: dict[str, UpstreamTally] = {}


def upstream(backend: str) -> UpstreamTally:
    """The counters of `backend`'s upstream calls (one set per backend and process)."""
    tally = _TALLIES.get(backend)
    if tally is None:
        tally = _TALLIES[backend] = UpstreamTally(backend)
    return tally


for _backend in BACKENDS:  # every backend's series exist from the start, at 0
    if _backend != "local":  # no upstream: the picture is drawn here
        upstream(_backend)

_JOBS: dict[tuple[str, str, str], Counter] = {}
_JOB_DURATIONS: dict[str, Histogram] = {}


def job_ended(service: str, backend: str, status: str) -> None:
    """Count a job that ended (`status`: completed, failed or cancelled) on `backend`
    (`NO_BACKEND` when it ended before or outside one)."""
    key = (service, backend, status)
    child = _JOBS.get(key)
    if child is None:
        child = _JOBS[key] = JOBS.labels(service, backend, status)
    child.inc()


def job_completed(service: str, backend: str, seconds: float, credits: int) -> None:
    """A job completed: counted, its duration observed, its credits charged for good."""
    job_ended(service, backend, "completed")
    child = _JOB_DURATIONS.get(backend)
    if child is None:
        child = _JOB_DURATIONS[backend] = JOB_DURATION.labels(backend)
    child.observe(seconds)
    if credits > 0:
        CREDITS_CHARGED.inc(credits)
