"""What Redis keeps per request (docs/api.md#redis-memory): `python -m bench memory`.

One `gateway serve` (its in-process workers, the built-in renderer) on the runner's
private Redis. It makes N jobs that run (each its own prompt, README's first request's
size) and N cache hits of one seeded request, over REST, each answered once it ended
(`Prefer: wait`), and reports `MEMORY USAGE` of a record of each kind (the median), of
the cache entry, of the account and the ledger per entry, and Redis's `used_memory`
growth per request: the record, its place in the key's job index and, for 60 s, in the
key's rate window. Redis's own figures, exact on one run: no rounds.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from bench import Context, renderer, scenario
from bench.openai_route import start_gateway
from gateway.store import keys

PROMPT = "a lighthouse on a cliff at dusk, oil painting"  # README's first request
JOBS = 1_000


@dataclass
class MemoryRow:
    what: str
    bytes: float
    notes: str = ""
    rates: list[float] = field(default_factory=list)  # none: Redis's figures, not timed


@renderer(MemoryRow)
def memory_table(rows: list[MemoryRow], rounds: int) -> str:
    lines = ["| Redis memory (`bench memory`) | bytes | |", "|---|---:|---|"]
    lines += [f"| {r.what} | {r.bytes:,.0f} | {r.notes} |" for r in rows]
    return "\n".join(lines)


async def _requests(
    client: httpx.AsyncClient, auth: dict[str, str], bodies: list[dict[str, Any]]
) -> list[str]:
    ids = []
    for body in bodies:
        r = await client.post("/v1/text_to_image", json=body, headers=auth)
        if r.status_code != 200 or r.json()["status"] != "completed":
            raise SystemExit(f"memory: {r.status_code} {r.text[:300]}")
        ids.append(r.json()["id"])
    return ids


async def _usage(admin: aioredis.Redis, account: str, ids: list[str]) -> float:
    sizes = [await admin.memory_usage(keys.job(account, i), samples=0) for i in ids]
    return float(statistics.median(s for s in sizes if s))


@scenario("memory")
async def memory(ctx: Context) -> list[MemoryRow]:
    n = 100 if ctx.quick else JOBS
    admin = aioredis.Redis.from_url(ctx.redis_url, decode_responses=True)
    await admin.flushall()
    rows: list[MemoryRow] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        server, made = start_gateway(ctx.redis_url, Path(tmp), [], GATEWAY_INPROCESS_WORKERS="1")
        account = str(made["id"])
        auth = {"Authorization": f"Bearer {made['key']}", "Prefer": "wait=30"}
        size = {"service": "local", "width": 768, "height": 512}
        try:
            async with httpx.AsyncClient(base_url=server.url(""), timeout=60) as client:

                async def measured(what: str, bodies: list[dict[str, Any]], holds: str) -> None:
                    """The median record of these requests, and Redis's growth per one."""
                    used = int((await admin.info("memory"))["used_memory"])
                    made = await _requests(client, auth, bodies)
                    grown = int((await admin.info("memory"))["used_memory"]) - used
                    rows.append(
                        MemoryRow(f"{what}: its record", await _usage(admin, account, made))
                    )
                    rows.append(MemoryRow(f"{what}: Redis's growth per request", grown / n, holds))

                runs = [{**size, "prompt": f"{PROMPT}, number {i}"} for i in range(n)]
                await measured(
                    "a job that ran",
                    runs,
                    f"{n:,} jobs: record, job index, rate window, ledger entry",
                )
                seeded = {**size, "prompt": PROMPT, "seed": 7}
                await _requests(client, auth, [seeded])  # the entry the hits are served from
                await measured(
                    "a cache hit", [seeded] * n, f"{n:,} hits: record, job index, rate window"
                )
                entry = next(iter(await admin.keys("*:cache:*")))
                rows.append(MemoryRow("the cache entry", await admin.memory_usage(entry)))
                ledger = keys.ledger(account)
                rows.append(
                    MemoryRow(
                        "a ledger entry",
                        (await admin.memory_usage(ledger, samples=0)) / await admin.xlen(ledger),
                    )
                )
                rows.append(
                    MemoryRow("an account", await admin.memory_usage(keys.account(account)))
                )
        finally:
            server.stop()
            await admin.flushall()
            await admin.aclose()
    return rows
