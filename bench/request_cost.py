"""Where a request's CPU goes, in-process: the whole ASGI app without the HTTP server.

Scenario `request_cost` (`python -m bench request_cost`): the gateway's app (`build_app`,
the runner's redis-server, no workers, no request lines) and the bare Starlette floor
(`bench/floors.py`) are called directly with ASGI messages by 64 concurrent tasks, as
many as `bench/http.py` keeps in flight; the bench process's own CPU (`process_time`)
per request is the app's cost without uvicorn, the sockets and the kernel. Cases:
- floor: starlette     the bare route
- REST cache hit       `POST /v1/text_to_image` of a picture made once before
- REST job             `GET /v1/jobs/{id}`
Each gateway case runs twice: as it is, and with its one script call (admit.lua or
auth.lua) answered from memory with the reply Redis gave it first. The difference is
what waiting on Redis costs the gateway's process: the Redis client, the socket, and
the request leaving the CPU and coming back (answered from memory, each request runs to
its end without yielding, its code still in the CPU's caches; with Redis, 64
interleave). A third run calls the route's endpoint itself, past every
middleware (request id and line, metrics, CORS, the body limit, the 500 handler) and the
router: what the stack around a handler costs, and the most that serving the route
below it could save. Reported: the median of the rounds, in µs.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import Context, renderer, scenario
from bench.floors import starlette_app
from bench.http import TEXT_TO_IMAGE
from gateway import rest
from gateway.app import build_app
from gateway.config import load_settings
from gateway.runtime import runtime
from gateway.store.scripts import Script

CONCURRENT = 64


@dataclass
class CostRow:
    case: str
    full_us: list[float] = field(default_factory=list)
    redis_answered_us: list[float] = field(default_factory=list)  # the script call replayed
    endpoint_us: list[float] = field(default_factory=list)  # no middleware, no router
    rates: list[float] = field(default_factory=list)  # none: CPU figures (the runner's field)


Call = Callable[[], Awaitable[dict[str, Any]]]


def asgi_call(
    app: Any,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    routed: dict[str, Any] | None = None,
) -> Call:
    """`routed`: what the router would have added to the scope (`app`, `path_params`),
    when `app` is a route's endpoint called directly."""
    scope = {
        **(routed or {}),
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }

    async def call() -> dict[str, Any]:
        sent: list[dict[str, Any]] = []
        asked = False

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if asked:  # the app waits for a disconnect only once it has answered
                await asyncio.Event().wait()
            asked = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(dict(scope), receive, send)
        answer: dict[str, Any] = orjson.loads(sent[1]["body"])
        if sent[0]["status"] not in (200, 202):
            raise SystemExit(f"{method} {path}: {sent[0]['status']} {answer}")
        return answer

    return call


async def cpu_per_call(call: Call, n: int) -> float:
    each = n // CONCURRENT

    async def one() -> None:
        for _ in range(each):
            await call()

    started = time.process_time()
    await asyncio.gather(*(one() for _ in range(CONCURRENT)))
    return (time.process_time() - started) * 1e6 / (each * CONCURRENT)


def replayed(script: Script) -> Callable[[], None]:
    """Answer `script` from memory with the reply Redis gave its next call; undo."""
    real = script.run
    reply: list[Any] = []

    async def run(numkeys: int, argv: list[Any], client: Any) -> Any:
        if not reply:
            reply.append(await real(numkeys, argv, client))
        return reply[0]

    script.run = run  # type: ignore[method-assign]
    return lambda: setattr(script, "run", real)


@scenario("request_cost")
async def request_cost(ctx: Context) -> list[CostRow]:
    n = 3_000 if ctx.quick else 20_000
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        settings = load_settings(
            redis_url=ctx.redis_url,
            storage_dir=Path(tmp),
            inprocess_workers=0,
            read_rpm=10**9,
            access_log=False,
        )
        app = build_app(settings)
        async with app.router.lifespan_context(app):
            gateway = app.state.gateway
            made = await gateway.accounts.create("enterprise", 10**9, name="bench")
            auth = [
                (b"content-type", b"application/json"),
                (b"authorization", f"Bearer {made['key']}".encode()),
            ]
            picture = orjson.dumps({**TEXT_TO_IMAGE, "seed": 7})
            hit = asgi_call(app, "POST", "/v1/text_to_image", auth, picture)
            first = await hit()
            async with runtime(settings) as rt:  # one worker makes the picture once
                stop = asyncio.Event()
                working = asyncio.create_task(rt.worker.run(stop))
                read = asgi_call(app, "GET", f"/v1/jobs/{first['id']}", auth, b"")
                deadline = time.monotonic() + 60
                while (await read())["status"] != "completed":
                    if time.monotonic() > deadline:
                        raise SystemExit("the job to cache did not complete")
                    await asyncio.sleep(0.02)
                stop.set()
                await working
            if not (await hit())["metadata"].get("cached"):
                raise SystemExit("REST cache hit: not answered from the cache")
            floor = asgi_call(
                starlette_app, "POST", "/v1/text_to_image", auth[:1], orjson.dumps(TEXT_TO_IMAGE)
            )
            endpoints = {route.path: route.app for route in rest.routes}
            alone = {
                hit: asgi_call(
                    endpoints["/v1/text_to_image"],
                    "POST",
                    "/v1/text_to_image",
                    auth,
                    picture,
                    routed={"app": app, "path_params": {}},
                ),
                read: asgi_call(
                    endpoints["/v1/jobs/{job_id}"],
                    "GET",
                    f"/v1/jobs/{first['id']}",
                    auth,
                    b"",
                    routed={"app": app, "path_params": {"job_id": first["id"]}},
                ),
            }
            cases: list[tuple[CostRow, Call, Script | None]] = [
                (CostRow("floor: starlette"), floor, None),
                (CostRow("gateway: REST cache hit"), hit, gateway.scripts.admit),
                (CostRow("gateway: REST job"), read, gateway.scripts.auth),
            ]
            for _, call, _ in cases:
                await cpu_per_call(call, n // 4)  # warm
            for call in alone.values():
                await cpu_per_call(call, n // 4)
            for _ in range(ctx.rounds):
                for row, call, script in cases:
                    row.full_us.append(await cpu_per_call(call, n))
                    if script is not None:
                        undo = replayed(script)
                        try:
                            row.redis_answered_us.append(await cpu_per_call(call, n))
                        finally:
                            undo()
                        row.endpoint_us.append(await cpu_per_call(alone[call], n))
    return [row for row, _, _ in cases]


@renderer(CostRow)
def cost_table(rows: list[CostRow], rounds: int) -> str:
    floor = statistics.median(rows[0].full_us)
    lines = [
        f"| in-process, CPU µs a request (median of {rounds}) | whole app | vs floor "
        "| its Redis call answered from memory | the Redis call's share "
        "| its endpoint alone | the middleware and router's share |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        full = statistics.median(row.full_us)
        if row.redis_answered_us:
            without = statistics.median(row.redis_answered_us)
            alone = statistics.median(row.endpoint_us)
            rest = (
                f"{without:.1f} | {full - without:.1f} ({(full - without) / full:.0%}) | "
                f"{alone:.1f} | {full - alone:.1f} ({(full - alone) / full:.0%})"
            )
        else:
            rest = " | | | "
        lines.append(f"| {row.case} | {full:.1f} | {full / floor:.1f}x | {rest} |")
    lines.append(
        "(no HTTP server, sockets or request lines: `bench http` measures those; "
        f"{CONCURRENT} requests in flight)"
    )
    return "\n".join(lines)
