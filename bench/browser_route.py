"""A page's request against a backend's: what CORS and client tokens cost the hot path
(docs/api.md#browsers).

The measured gateway runs alone on one core (`taskset -c LAST gateway serve`, as in
`bench/openai_route.py`); the bench, wrk and redis-server share the others. Three
gateway processes on that core, one key, one Redis: `plain` and its `twin` with no CORS
configured, and `cors` with `GATEWAY_CORS_ORIGINS=https://app.example`. They are loaded
one at a time, never together: the others are idle meanwhile (their CPU over the other's
rounds is read too, and reported). The twin is a control: the same configuration as
`plain` in another process, so its difference from `plain` is what comparing two
processes shows when nothing differs. Figures are ratios and CPU per request from /proc.

Scenario `browser` (`python -m bench browser`): five cases interleaved in each round,
wrk `-t2 -c64` as in `bench/http.py`, each the seeded GraphQL `generate` of
`bench/http.py` answered from the cache (a worker ran it once before the rounds), so
admission (one Lua call) is the measured path and no job runs:
1. no CORS: key            `plain`, the API key, no `Origin`: the baseline;
1b. no CORS: key, twin     the same, sent to `twin` (the control);
2. CORS: key, no Origin    `cors`, the API key, no `Origin` (a backend's request, which
                           the CORS wrapper passes untouched);
3. CORS: key + Origin      `cors`, `Origin: https://app.example`, the API key;
4. CORS: token + Origin    `cors`, `Origin: https://app.example`, a client token with a
                           large budget, minted once by `POST /v1/client_tokens` with
                           `origins: ["https://app.example"]` (its rules and budget are
                           checked in the same admission call).
The order of the five is reversed every other round (no case always runs first). Each
answer is checked before and after the rounds: 200, no errors, `metadata.cached`,
`Access-Control-Allow-Origin: https://app.example` for 3 and 4 and none for 1, 1b, 2;
and the token refused (FORBIDDEN) without `Origin`: case 4's admission does check its
rules. wrk counts any other status as an error.
Target: case 2 within 2% of case 1's CPU per request; cases 3 and 4 report their cost.
Served, both the ratio of the medians and the median of each round's own ratio must be
within 2% ("met"); when not, the verdict is "not resolved" if the run cannot tell 2%
apart (two standard errors of the median of the twin's per-round ratios exceed it),
else "NOT met". Measured directly, the one code that case 2's request runs otherwise
than case 1's, the CORS wrapper (below), must add under 2% of case 1's CPU per request.

Before the rounds, in the bench process: the CORS wrapper (`gateway.cors.CORS`, which
every gateway process runs, CORS configured or not) alone around a no-op app, 100,000
`POST /graphql` per case and round, 7 rounds: not configured / configured without
`Origin` / configured with it, the µs each adds to the app alone (the median); a figure
far finer than the served cases' noise.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from bench import Context, free_port, scenario
from bench.http import (
    CACHEABLE_VARIABLES,
    GENERATE,
    Case,
    HttpRow,
    Server,
    complete_one,
    cpu_seconds,
    fresh_redis,
    gateway_binary,
    gateway_env,
    measure,
    spawn,
    warmed_rows,
)
from bench.openai_route import start_gateway
from bench.serving import one_core_for_the_server
from gateway.cors import CORS

ORIGIN = "https://app.example"
PLAIN_CASE = "1 no CORS: key"
TWIN_CASE = "1b no CORS: key, twin"
BACKEND_CASE = "2 CORS: key, no Origin"
ORIGIN_CASE = "3 CORS: key + Origin"
TOKEN_CASE = "4 CORS: token + Origin"
BACKEND_TARGET = 0.02  # case 2's CPU per request within 2% of case 1's
TOKEN_BUDGET = 1_000_000_000  # tokens.MAX_CREDITS
TOKEN_TTL = 86_400  # tokens.TTL_MAX: it outlives any run


# -- the CORS wrapper alone, in this process ----------------------------------------------

WRAPPER_CALLS, WRAPPER_ROUNDS = 100_000, 7
NOT_CONFIGURED, CONFIGURED, WITH_ORIGIN = (
    "not configured, no Origin",
    "configured, no Origin",
    "configured, Origin",
)
WRAPPER_CASES = [  # (label, GATEWAY_CORS_ORIGINS as the wrapper gets it, Origin sent)
    (NOT_CONFIGURED, (), False),
    (CONFIGURED, (ORIGIN,), False),
    (WITH_ORIGIN, (ORIGIN,), True),
]


async def wrapper_cost(calls: int, rounds: int) -> dict[str, float]:
    """µs a `POST /graphql` spends in `gateway.cors.CORS` (the wrapper every gateway
    process runs, configured or not) more than its app alone: the app a no-op that
    answers 200 with two headers; the request's headers as a browser's `fetch` sends
    them. The median of `rounds`; each case and the bare app interleaved."""
    body_message: Message = {"type": "http.response.body", "body": b"{}"}
    answer_headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": list(answer_headers)}
        await send(start)
        await send(body_message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    def scope(origin: bool) -> Scope:
        headers = [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"authorization", b"Bearer gct_" + b"x" * 60),
            (b"content-length", b"300"),
            (b"accept", b"*/*"),
            (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0"),
        ]
        if origin:
            headers.append((b"origin", ORIGIN.encode()))
        return {"type": "http", "method": "POST", "path": "/graphql", "headers": headers}

    def refuse(path: str, error: Exception) -> Response:
        raise AssertionError("no preflight here")

    runs: list[tuple[str, Any, Scope]] = [("app alone", app, scope(False))]
    for label, origins, origin in WRAPPER_CASES:
        runs.append((label, CORS(app, origins, refuse), scope(origin)))
    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for _ in range(rounds):
        for label, asgi, sent in runs:
            t0 = time.perf_counter()
            for _ in range(calls):
                await asgi(sent, receive, send)
            times[label].append((time.perf_counter() - t0) / calls * 1e6)
    bare = statistics.median(times["app alone"])
    return {label: statistics.median(times[label]) - bare for label, _, _ in WRAPPER_CASES}


# -- the served cases ----------------------------------------------------------------------


def mint_token(client: httpx.Client, gateway: Server, key: str) -> str:
    """A client token of the key's account, usable from ORIGIN only, a large budget."""
    response = client.post(
        gateway.url("/v1/client_tokens"),
        json={"maxCredits": TOKEN_BUDGET, "ttlSeconds": TOKEN_TTL, "origins": [ORIGIN]},
        headers={"Authorization": f"Bearer {key}"},
    )
    if response.status_code != 201 or not response.json().get("token", "").startswith("gct_"):
        raise SystemExit(f"minting a client token: {response.status_code} {response.text[:500]}")
    token: str = response.json()["token"]
    return token


def check_answer(client: httpx.Client, case: Case) -> None:
    """200, no errors, answered from the cache; the CORS header exactly when `Origin` was
    sent (a request without it passes the CORS wrapper untouched)."""
    response = client.post(case.server.url(case.path), content=case.body, headers=case.headers)
    try:
        body: dict[str, Any] = response.json()
        cached = bool(body["data"]["generate"]["metadata"].get("cached"))
    except (ValueError, KeyError, TypeError, AttributeError):
        body, cached = {}, False
    allowed = response.headers.get("access-control-allow-origin")
    expected = ORIGIN if "Origin" in case.headers else None
    if response.status_code != 200 or body.get("errors") or not cached or allowed != expected:
        raise SystemExit(
            f"{case.name}: {response.status_code}, access-control-allow-origin {allowed!r} "
            f"(expected {expected!r}): {response.text[:500]}"
        )


def check_token_needs_origin(client: httpx.Client, case: Case) -> None:
    """The token without `Origin` is refused: its origins are checked in admission."""
    headers = {k: v for k, v in case.headers.items() if k != "Origin"}
    response = client.post(case.server.url(case.path), content=case.body, headers=headers)
    errors = response.json().get("errors") or [{}]
    code = (errors[0].get("extensions") or {}).get("code")
    if code != "FORBIDDEN":
        raise SystemExit(f"{case.name} without Origin: not refused: {response.text[:500]}")


@scenario("browser")
async def browser(ctx: Context) -> list[HttpRow]:
    """The `generate` cache hit with and without CORS configured, with `Origin`, with a
    client token: interleaved in each round, each gateway alone on one core when
    measured (`python -m bench browser`)."""
    rounds, seconds = ctx.timed()
    wrapper = await (
        wrapper_cost(WRAPPER_CALLS // 10, 3)
        if ctx.quick
        else wrapper_cost(WRAPPER_CALLS, WRAPPER_ROUNDS)
    )
    admin, redis_pid = await fresh_redis(ctx)
    started: list[Server] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-browser-") as tmp,
            one_core_for_the_server(redis_pid) as (prefix, placement),
            httpx.Client(timeout=60) as client,
        ):
            workdir = Path(tmp)
            plain, made = start_gateway(ctx.redis_url, workdir, prefix)
            started.append(plain)
            port = free_port()
            env = gateway_env(ctx.redis_url, port, workdir / "outputs")
            env["GATEWAY_CORS_ORIGINS"] = ORIGIN
            cors = spawn("gateway-cors", [*prefix, gateway_binary(), "serve"], env, port, workdir)
            started.append(cors)
            port = free_port()
            env = gateway_env(ctx.redis_url, port, workdir / "outputs")
            twin = spawn("gateway-twin", [*prefix, gateway_binary(), "serve"], env, port, workdir)
            started.append(twin)

            json_type = {"Content-Type": "application/json"}
            auth = {**json_type, "Authorization": f"Bearer {made['key']}"}
            body = json.dumps({"query": GENERATE, "variables": CACHEABLE_VARIABLES}).encode()
            complete_one(ctx.redis_url, workdir / "outputs", client, plain, body, auth)
            token = mint_token(client, cors, made["key"])
            page = {"Origin": ORIGIN}
            cases = [
                Case(PLAIN_CASE, plain, "/graphql", body, auth, 200),
                Case(TWIN_CASE, twin, "/graphql", body, auth, 200),
                Case(BACKEND_CASE, cors, "/graphql", body, auth, 200),
                Case(ORIGIN_CASE, cors, "/graphql", body, {**auth, **page}, 200),
                Case(
                    TOKEN_CASE,
                    cors,
                    "/graphql",
                    body,
                    {**json_type, "Authorization": f"Bearer {token}", **page},
                    200,
                ),
            ]
            for case in cases:
                case.write_script(workdir)
                check_answer(client, case)
            check_token_needs_origin(client, cases[-1])
            rows = await warmed_rows(cases, workdir)
            idle_cpu = {server.name: 0.0 for server in started}  # while another is loaded
            for n in range(rounds):
                for case in cases if n % 2 == 0 else cases[::-1]:  # no case always first
                    others = [s for s in started if s is not case.server]
                    before = [cpu_seconds(s.pid) for s in others]
                    await measure(case, rows[case.name], admin, redis_pid, seconds)
                    for s, cpu0 in zip(others, before, strict=True):
                        idle_cpu[s.name] += cpu_seconds(s.pid) - cpu0
            for case in cases:  # still right after the load (the token's budget too)
                check_answer(client, case)
            await asyncio.sleep(1.0)  # at rest again
            for case in cases:
                rows[case.name].rss_mb = case.server.rss_mb()
    finally:
        for server in reversed(started):
            server.stop()
        # Hundreds of thousands of jobs recorded (a cache hit records one): freed in the
        # background, or FLUSHALL outlasts the client's 5 s timeout.
        await admin.flushall(asynchronous=True)
        await admin.aclose()
    out = list(rows.values())
    base = rows[PLAIN_CASE]
    base_cpu = statistics.median(base.cpu_ms)
    summary = [
        placement,
        "idle gateways' CPU while another was loaded, in all: "
        + ", ".join(f"{name} {s * 1000:.0f} ms" for name, s in idle_cpu.items()),
    ]
    apart: dict[str, float] = {}
    for name in (TWIN_CASE, BACKEND_CASE, ORIGIN_CASE, TOKEN_CASE):
        row = rows[name]
        cpu = statistics.median(row.cpu_ms) / base_cpu
        per_round = [c / b for c, b in zip(row.cpu_ms, base.cpu_ms, strict=True)]
        paired = statistics.median(per_round)
        apart[name] = max(abs(cpu - 1), abs(paired - 1))  # both ratios' distance from 100%
        line = (
            f"{name}: {row.median / base.median:.0%} of {PLAIN_CASE}'s req/s, "
            f"{statistics.median(row.cpu_ms):.3f} ms CPU/req = {cpu:.1%} of its CPU "
            f"({(cpu - 1) * base_cpu * 1000:+.0f} µs); each round's own ratio: median "
            f"{paired:.1%}, {min(per_round):.1%}..{max(per_round):.1%}"
        )
        if name == TWIN_CASE:
            line += " (configured as 1: what two processes differ by when nothing differs)"
        if name == BACKEND_CASE:
            # What this run can tell apart: two standard errors (~1.25 sd/√n each) of a
            # median of the twin's per-round ratios (two processes, nothing different).
            control = [t / b for t, b in zip(rows[TWIN_CASE].cpu_ms, base.cpu_ms, strict=True)]
            resolution = (
                2 * 1.2533 * statistics.stdev(control) / math.sqrt(len(control))
                if len(control) > 1
                else math.inf
            )
            if apart[name] <= BACKEND_TARGET:
                verdict = "met"
            elif resolution > BACKEND_TARGET:
                verdict = f"not resolved (this run tells ±{resolution:.1%} apart at best)"
            else:
                verdict = "NOT met"
            line += f"; target within {BACKEND_TARGET:.0%}, served: {verdict}"
        summary.append(line)
    summary.append(
        "gateway.cors.CORS alone (in the bench process, around a no-op app), per request "
        "more than the app alone: " + "; ".join(f"{k} {us:.2f} µs" for k, us in wrapper.items())
    )
    extra = wrapper[CONFIGURED] - wrapper[NOT_CONFIGURED]
    share = extra / (base_cpu * 1000)
    summary.append(
        f"{BACKEND_CASE}, by the wrapper alone (the only code its request runs differently "
        f"from 1's): {extra:+.2f} µs, {share:+.2%} of {PLAIN_CASE}'s CPU/req; target within "
        f"{BACKEND_TARGET:.0%}: " + ("met" if abs(share) <= BACKEND_TARGET else "NOT met")
    )
    errors = sum(r.errors for r in out)
    summary.append(f"wrk errors (non-2xx or socket): {errors}")
    out[-1].summary = summary
    return out
