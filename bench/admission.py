"""Admissions per second through `gateway.admission.admit`, and Redis round trips each.

Every case runs against the runner's private redis-server: N asyncio tasks share one
client (a connection pool) and admit jobs as fast as they can; a round is a fixed
number of admissions, and the table shows the median rate over the rounds. Round trips
are counted at the client (each send is one); Redis's `INFO commandstats` tells how
many commands it executed for them, the script's inner calls included.

Cases:
- admit, many keys: each task admits for its own key (limits high enough never to
  refuse), at 1, 16 and 64 tasks.
- admit, one key: every task on one hot key (one rate window, one slot set).
- refused (minute): a key whose minute window is full: the cost of saying no.
- auth + admit: what one generation request asks of the store (the key is checked
  inside admission: one round trip).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from bench import (
    EMPTY_STATS,
    TOP_LEVEL,
    Context,
    CountingConnection,
    Row,
    command_stats,
    counting_client,
    scenario,
)
from gateway.accounts import Accounts
from gateway.admission import admit, plan_table
from gateway.auth import Credential, credentials
from gateway.config import Settings, load_settings
from gateway.errors import RateLimited
from gateway.jobs.model import Job
from gateway.store import keys
from gateway.store.redis import Scripts

HUGE = 10**9
PARAMS = {
    "prompt": "a lighthouse at dusk, volumetric light",
    "width": 1024,
    "height": 1024,
    "num_images": 1,
    "seed": 1234,
    "steps": 4,
    "guidance": 3.5,
    "output_format": "png",
}
LEASE_MS = 30_000


def now_ms() -> int:
    return int(time.time() * 1000)


def new_job(account: str) -> Job:
    return Job(
        id=secrets.token_hex(12),
        account=account,
        status="queued",
        provider="local",
        params=PARAMS,
        cost=20,
        created_at=now_ms(),
    )


@dataclass(frozen=True)
class Caller:
    key: str
    credential: Credential


@dataclass
class Bench:
    ctx: Context
    client: aioredis.Redis  # counted: what the code under test sends
    admin: aioredis.Redis  # not counted: set-up, INFO, clean-up
    scripts: Scripts
    settings: Settings
    accounts: Accounts

    @property
    def ops_per_round(self) -> int:
        return 200 if self.ctx.quick else 1000

    @property
    def plans(self) -> str:
        return plan_table(self.settings.plans)

    async def key(self, **limits: int) -> Caller:
        made = await self.accounts.create("enterprise", 10**9, name="bench", **limits)
        return Caller(made["key"], credentials(made["key"]))

    async def admit(self, caller: Caller) -> None:
        await admit(
            self.client,
            self.scripts,
            caller.credential,
            new_job(caller.credential.account),
            plans=self.plans,
            now_ms=now_ms(),
            lease_ms=LEASE_MS,
        )

    async def measure(
        self,
        scenario_name: str,
        case: str,
        tasks: int,
        op: Callable[[int], Awaitable[None]],
    ) -> Row:
        """`op(task)` run by `tasks` tasks: one warm-up round, then the timed rounds."""
        per_task = max(1, self.ops_per_round // tasks)
        ops = per_task * tasks

        async def worker(task: int, n: int) -> None:
            for _ in range(n):
                await op(task)

        async def one_round(n: int = per_task) -> float:
            start = time.perf_counter()
            await asyncio.gather(*(worker(t, n) for t in range(tasks)))
            return time.perf_counter() - start

        await one_round(max(1, per_task // 4))  # warm-up: opens the pool's connections
        rates, sent, stats = [], 0, EMPTY_STATS
        for _ in range(self.ctx.rounds):
            await self.admin.delete(keys.queue(0))  # keep the queue stream from growing
            before, before_sent = await command_stats(self.admin), CountingConnection.sent
            rates.append(ops / await one_round())
            sent += CountingConnection.sent - before_sent
            stats = stats + (await command_stats(self.admin) - before)
        stats = stats.without("info")
        total = ops * self.ctx.rounds
        scripts = [k for k in TOP_LEVEL if stats.calls.get(k)]
        return Row(
            scenario_name,
            case,
            rates,
            round_trips=sent / total,
            redis_commands=sum(stats.calls.values()) / total,
            redis_usec=sum(stats.usec[k] for k in scripts) / total,
            notes=", ".join(f"{k} {stats.calls[k] / total:.2f}/op" for k in scripts),
        )


async def setup(ctx: Context) -> Bench:
    settings = load_settings(redis_url=ctx.redis_url)
    client = counting_client(ctx.redis_url)
    admin = aioredis.Redis.from_url(ctx.redis_url, decode_responses=True)
    await admin.flushall()
    scripts = Scripts.register(client)
    await scripts.load()
    accounts = Accounts(admin, Scripts.register(admin), settings)
    return Bench(ctx, client, admin, scripts, settings, accounts)


async def teardown(bench: Bench) -> None:
    await bench.admin.flushall()
    await bench.client.aclose()
    await bench.admin.aclose()


@scenario("admit")
async def admit_rate(ctx: Context) -> list[Row]:
    bench = await setup(ctx)
    rows = []
    try:
        for tasks in (1, 16, 64):
            callers = [
                await bench.key(rpm=HUGE, concurrency=HUGE, daily=HUGE) for _ in range(tasks)
            ]

            async def op(task: int, callers: list[Caller] = callers) -> None:
                await bench.admit(callers[task])

            rows.append(await bench.measure("admit", f"many keys, {tasks} tasks", tasks, op))

        hot = await bench.key(rpm=HUGE, concurrency=HUGE, daily=HUGE)

        async def hot_op(task: int) -> None:
            await bench.admit(hot)

        rows.append(await bench.measure("admit", "one key, 64 tasks", 64, hot_op))
    finally:
        await teardown(bench)
    return rows


@scenario("refused")
async def refused_rate(ctx: Context) -> list[Row]:
    bench = await setup(ctx)
    try:
        full = await bench.key(rpm=10, concurrency=HUGE, daily=HUGE)
        for _ in range(10):  # fill the minute window
            await bench.admit(full)

        async def op(task: int) -> None:
            try:
                await bench.admit(full)
            except RateLimited:
                return
            raise AssertionError("a full minute window admitted a job")

        return [await bench.measure("refused", "minute window full, 64 tasks", 64, op)]
    finally:
        await teardown(bench)


@scenario("auth+admit")
async def request_rate(ctx: Context) -> list[Row]:
    """What a generation request asks of Redis: the key is checked inside admission."""
    bench = await setup(ctx)
    try:
        made = [await bench.key(rpm=HUGE, concurrency=HUGE, daily=HUGE) for _ in range(64)]

        async def op(task: int) -> None:
            credential = credentials(made[task].key)
            await admit(
                bench.client,
                bench.scripts,
                credential,
                new_job(credential.account),
                plans=bench.plans,
                now_ms=now_ms(),
                lease_ms=LEASE_MS,
            )

        return [await bench.measure("auth+admit", "many keys, 64 tasks", 64, op)]
    finally:
        await teardown(bench)
