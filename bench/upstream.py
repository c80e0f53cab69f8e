"""What one upstream call costs the gateway in CPU: the client every backend gets.

A provider's poll (Krea's `GET /jobs/{id}` shape, `bench/floors.py:upstream_app`) is
served by uvicorn in its own process on loopback; this process sends it with the
gateway's own client (`gateway.providers.http.UpstreamClient` through `request()`, the
retrying helper every adapter uses, over an aiohttp session) and, for reference in the
same rounds, with plain httpx (httpcore's pool) and with a bare aiohttp session (the
floor). Each round sends a fixed number of calls
from 1 and from 64 tasks; the figure is this process's CPU time (user + system) per
call, the median over rounds, and the calls per second.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from bench import Context, renderer, scenario
from bench.http import floor
from gateway.providers.http import UpstreamClient, request

TARGET_MS = 0.5  # the bound at 64 in flight


@dataclass
class UpstreamRow:
    client: str
    inflight: int
    rates: list[float] = field(default_factory=list)  # calls/s per round
    cpu_ms: list[float] = field(default_factory=list)  # CPU ms per call per round


async def _round(
    call: Callable[[], Awaitable[None]], inflight: int, calls: int
) -> tuple[float, float]:
    async def task(n: int) -> None:
        for _ in range(n):
            await call()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(task(calls // inflight) for _ in range(inflight)))
    sent = calls // inflight * inflight
    return sent / (time.perf_counter() - wall), (time.process_time() - cpu) / sent * 1000


@scenario("upstream")
async def upstream_cost(ctx: Context) -> list[UpstreamRow]:
    calls = 640 if ctx.quick else 3200
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
        server = floor("upstream", "upstream_app", Path(tmp))
        url = server.url("/jobs/bench")
        gateway = UpstreamClient(30.0)
        plain = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128)
        )
        session = aiohttp.ClientSession()

        async def via_gateway() -> None:
            await request(gateway, "GET", url, upstream="bench", idempotent=True)

        async def via_httpx() -> None:
            (await plain.get(url)).raise_for_status()

        async def via_aiohttp() -> None:
            async with session.get(url) as response:
                response.raise_for_status()
                await response.read()

        clients = {
            "gateway (request() over aiohttp)": via_gateway,
            "httpx (httpcore)": via_httpx,
            "aiohttp session (floor)": via_aiohttp,
        }
        rows = {(name, n): UpstreamRow(name, n) for name in clients for n in (1, 64)}
        try:
            for call in clients.values():  # warm-up: connections open, code paths hot
                await _round(call, 64, calls // 4)
            for _ in range(ctx.rounds):  # interleaved, so noise hits every client alike
                for (name, inflight), row in rows.items():
                    rate, cpu = await _round(clients[name], inflight, calls)
                    row.rates.append(rate)
                    row.cpu_ms.append(cpu)
        finally:
            await gateway.aclose()
            await plain.aclose()
            await session.close()
            server.stop()
    return list(rows.values())


@renderer(UpstreamRow)
def upstream_table(rows: list[UpstreamRow], rounds: int) -> str:
    floor_cpu = {r.inflight: statistics.median(r.cpu_ms) for r in rows if "floor" in r.client}
    lines = [
        ("client", "in flight", "calls/s", "CPU ms/call", "vs floor", "target"),
        ("------", "---------", "-------", "-----------", "--------", "------"),
    ]
    for r in rows:
        cpu = statistics.median(r.cpu_ms)
        target = ""
        if r.client.startswith("gateway") and r.inflight == 64:
            target = f"{'met' if cpu <= TARGET_MS else 'NOT met'} (<= {TARGET_MS} ms)"
        lines.append(
            (
                r.client,
                str(r.inflight),
                f"{statistics.median(r.rates):,.0f}",
                f"{cpu:.3f}",
                f"{cpu / floor_cpu[r.inflight]:.1f}x",
                target,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    body = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )
    return f"{body}\n\nmedians of {rounds} rounds; CPU of the calling process only"
