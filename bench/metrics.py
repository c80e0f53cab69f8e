"""What the Prometheus metrics and the request log lines cost the request path
(docs/api.md#metrics, docs/api.md#logs-and-traces).

Scenario `metrics` (`python -m bench metrics`): two `gateway serve` processes on the
runner's private Redis, identical but for `GATEWAY_METRICS_ENABLED` and
`GATEWAY_ACCESS_LOG` (on: both, the defaults; off: both `0`, which drops the counting,
`GET /metrics` and the `request` line; the request id stays, and the admission counter's
one `inc()`), each in turn alone on the last CPU (`taskset`; the bench, wrk and
redis-server on the others; each server's stdout a file, as in `bench/http.py`). Three
cases, sent to both, interleaved in each round (the order of on and off alternates from
round to round), wrk `-t2 -c64` as in `bench/http.py`:
- REST        `POST /v1/text_to_image` (admission, enqueue),
- generate    Doitong's `generate` mutation (README's first request) (prepared GraphQL path),
- job         the `job` poll `gateway generate` sends.
Per case: server CPU per request (utime + stime from /proc/PID/stat over the requests it
handled), on against off: the ratio of the medians and the median of each round's own
ratio. Target (the issue): at most 5% more CPU per request with metrics and logs on.

On a shared 2-core machine those ratios move a few percent from run to run either way,
so the scenario also times what metrics and the log line add to a request in-process,
without the noise: the outermost middleware (`gateway/telemetry_http.py`) around an ASGI
app that answers at once, counting and logging (its line written to a file on its own:
under load one write carries the lines of several requests) against neither, plus the
admission counter's `inc()`; that sum, in µs, is set against the REST case's CPU per
request. What the middleware costs with both off (the request id alone) is shown too.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import structlog

from bench import Context, free_port, scenario
from bench.http import (
    GENERATE,
    GENERATE_VARIABLES,
    POLL,
    TEXT_TO_IMAGE,
    Case,
    HttpRow,
    create_key,
    fresh_redis,
    gateway_binary,
    gateway_env,
    measure,
    warmed_rows,
)
from bench.serving import Server, one_core_for_the_server, spawn
from gateway import metrics
from gateway.errors import GatewayError
from gateway.rest import error_response
from gateway.telemetry_http import RequestTelemetry

TARGET = 1.05  # metrics and logs on may cost at most 5% more CPU per request
KINDS = ("REST", "generate", "job")
ON, OFF = "metrics and logs on", "metrics and logs off"


def start(name: str, redis_url: str, workdir: Path, prefix: list[str], enabled: bool) -> Server:
    port = free_port()
    env = gateway_env(redis_url, port, workdir / "outputs")
    env["GATEWAY_METRICS_ENABLED"] = env["GATEWAY_ACCESS_LOG"] = "1" if enabled else "0"
    return spawn(name, [*prefix, gateway_binary(), "serve"], env, port, workdir)


class _Route:
    path = "/v1/text_to_image"  # as Starlette's router leaves it in the scope


#: what a client sends (the middleware looks for `X-Request-Id` among them)
_HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"content-type", b"application/json"),
    (b"authorization", b"Bearer gk_x"),
    (b"content-length", b"86"),
]


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _sent(message: Any) -> None:
    return None


def _refuse(path: str, exc: GatewayError) -> Any:
    return error_response(exc)


async def _per_request(app: Any, n: int) -> float:
    """Seconds per call of the ASGI `app` (the best of 5 runs of `n`), the event loop
    turned after each (so that each request's log line is written on its own)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            scope = {
                "type": "http",
                "method": "POST",
                "path": _Route.path,
                "headers": _HEADERS,
                "route": _Route(),
            }
            await app(scope, None, _sent)
            await asyncio.sleep(0)
        best = min(best, (time.perf_counter() - started) / n)
    return best


async def added_per_request(n: int = 50_000) -> tuple[float, float, float]:
    """µs that metrics and the log line add to a request, µs of one pre-bound counter's
    inc(), and µs of the middleware with both off (the request id alone)."""
    with tempfile.TemporaryFile() as out:  # the line's destination: a file, as a server's
        structlog.configure(logger_factory=structlog.BytesLoggerFactory(file=out))
        try:
            bare = await _per_request(_answer, n)
            off = await _per_request(RequestTelemetry(_answer, _refuse, None, log=False), n)
            on = await _per_request(
                RequestTelemetry(_answer, _refuse, metrics.HTTP.count, log=True), n
            )
        finally:
            structlog.reset_defaults()
    child = metrics.ADMITTED["accepted"]
    started = time.perf_counter()
    for _ in range(n):
        child.inc()
    inc = (time.perf_counter() - started) / n
    return (on - off) * 1e6, inc * 1e6, (off - bare) * 1e6


def summary(
    rows: dict[str, HttpRow], placement: str, added: tuple[float, float, float]
) -> list[str]:
    lines = [placement]
    for kind in KINDS:
        on, off = rows[f"{ON}: {kind}"], rows[f"{OFF}: {kind}"]
        on_cpu, off_cpu = statistics.median(on.cpu_ms), statistics.median(off.cpu_ms)
        paired = statistics.median(a / b for a, b in zip(on.cpu_ms, off.cpu_ms, strict=True))
        ratio = on_cpu / off_cpu
        lines.append(
            f"{kind}: {on_cpu:.4f} ms CPU/req with metrics and logs on, {off_cpu:.4f} off: "
            f"{ratio - 1:+.1%} (each round's own ratio, median: {paired - 1:+.1%}); "
            f"req/s {on.median / off.median:.0%} of off; target at most "
            f"{TARGET - 1:+.0%}: " + ("met" if max(ratio, paired) <= TARGET else "NOT met")
        )
    telemetry, inc, request_id = added
    rest_cpu_us = statistics.median(rows[f"{OFF}: REST"].cpu_ms) * 1000
    share = (telemetry + inc) / rest_cpu_us
    lines.append(
        f"in-process: metrics and the log line add {telemetry:.2f} µs to a request and the "
        f"admission counter's inc() {inc:.2f} µs: {share:.1%} of the REST request's "
        f"{rest_cpu_us:.0f} µs of CPU; target at most {TARGET - 1:.0%}: "
        + ("met" if share <= TARGET - 1 else "NOT met")
        + f" (the middleware with both off, the request id alone: {request_id:.2f} µs)"
    )
    return lines


@scenario("metrics")
async def metrics_cost(ctx: Context) -> list[HttpRow]:
    """The request path's CPU with metrics and logs on and off (`python -m bench metrics`)."""
    rounds, seconds = ctx.timed()
    admin, redis_pid = await fresh_redis(ctx)
    servers: list[Server] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp,
            one_core_for_the_server(redis_pid) as (prefix, placement),
            httpx.Client(timeout=30) as client,
        ):
            workdir = Path(tmp)
            made = create_key(ctx.redis_url, workdir / "outputs")
            on = start(f"gateway {ON}", ctx.redis_url, workdir, prefix, True)
            servers.append(on)
            off = start(f"gateway {OFF}", ctx.redis_url, workdir, prefix, False)
            servers.append(off)
            if client.get(off.url("/metrics")).status_code != 404:
                raise SystemExit("GATEWAY_METRICS_ENABLED=0 still serves /metrics")
            if "gateway_http_requests_total" not in client.get(on.url("/metrics")).text:
                raise SystemExit("the gateway with metrics on serves no metrics")
            auth = {"Content-Type": "application/json", "Authorization": f"Bearer {made['key']}"}
            generate = json.dumps({"query": GENERATE, "variables": GENERATE_VARIABLES}).encode()
            rest = json.dumps(TEXT_TO_IMAGE).encode()
            pairs: list[tuple[Case, Case]] = []
            for kind in KINDS:
                both = []
                for state, server in ((ON, on), (OFF, off)):
                    name = f"{state}: {kind}"
                    if kind == "REST":
                        case = Case(name, server, "/v1/text_to_image", rest, auth, 202)
                    elif kind == "generate":
                        case = Case(name, server, "/graphql", generate, auth, 200)
                    else:
                        made_job = Case(name, server, "/graphql", generate, auth, 200)
                        job_id = made_job.check(client)["data"]["generate"]["id"]
                        poll = json.dumps({"query": POLL, "variables": {"id": job_id}}).encode()
                        case = Case(name, server, "/graphql", poll, auth, 200)
                    case.write_script(workdir)
                    case.check(client)
                    both.append(case)
                pairs.append((both[0], both[1]))
            cases = [case for pair in pairs for case in pair]
            rows = await warmed_rows(cases, workdir)
            for n in range(rounds):
                for first, second in pairs:
                    for case in (first, second) if n % 2 == 0 else (second, first):
                        await measure(case, rows[case.name], admin, redis_pid, seconds)
            for case in cases:
                rows[case.name].rss_mb = case.server.rss_mb()
            time.sleep(0.1)  # the last lines written
            logged = (on.log.read_bytes().count(b'"event":"request"'), off.log.read_bytes())
            if not logged[0] or b'"event":"request"' in logged[1]:
                raise SystemExit("request lines: none with logs on, or some with logs off")
    finally:
        for server in servers:
            server.stop()
        await admin.flushall()
        await admin.aclose()
    added = await added_per_request(5_000 if ctx.quick else 50_000)
    out = list(rows.values())
    out[-1].summary = summary(rows, placement, added)
    return out
