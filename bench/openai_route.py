"""OpenAI's images route (`POST /v1/images/generations`, docs/api.md#openai): what its
answer from the cache costs against GraphQL's, and what requests waiting for their
jobs cost the process that holds them.

The measured gateway runs alone on one core (`taskset -c LAST gateway serve`); the
bench process, wrk, redis-server and any worker share the others. Figures are ratios
and CPU/RSS read from /proc, never wall-clock assertions.

Scenario `openai` (`python -m bench openai`): two cases interleaved in each round,
wrk `-t2 -c64` as in `bench/http.py`:
- gateway: cache hit  the seeded GraphQL `generate` of `bench/http.py`, answered from
                      the cache (a worker ran it once before the rounds);
- openai: cache hit   `POST /v1/images/generations` `{"model": "local", "prompt", "size":
                      "1024x1024", "seed": 7}`, the same picture: answered from the cache
                      (checked: its job's `metadata.cached`), without waiting.
Target: the OpenAI route's req/s at least 90% of GraphQL's.

Scenario `waiting` (`python -m bench waiting`; BENCH_WAITING_REQUESTS=N, default 1,000):
a gateway with no in-process workers (`GATEWAY_INPROCESS_WORKERS=0`) is sent N
concurrent `POST /v1/images/generations` (one aiohttp session in the bench process, a
connection each). Once every one is admitted and waiting (N jobs queued and N job
channels subscribed in Redis, `PUBSUB CHANNELS`), the gateway's CPU is read from
/proc/PID/stat over 10 s and its RSS against before the load. Targets: under 0.1 core
and under 50 MB for the N. Then a `gateway worker` process starts: every request must
get its 200 with its image's URL; reported, how long until all were answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import redis.asyncio as aioredis

from bench import Context, command_stats, free_port, renderer, scenario
from bench.http import (
    CACHE_CASE,
    CACHEABLE_VARIABLES,
    GENERATE,
    OPENAI_CACHEABLE,
    OPENAI_HIT_CASE,
    ROOT,
    Case,
    HttpRow,
    Server,
    complete_one,
    cpu_seconds,
    create_key,
    fresh_redis,
    gateway_binary,
    gateway_env,
    measure,
    spawn,
    warmed_rows,
)
from bench.serving import one_core_for_the_server, stop
from gateway.store import keys

OPENAI_TARGET = 0.90  # of the GraphQL cache hit's req/s

WAITING = int(os.environ.get("BENCH_WAITING_REQUESTS", "1000"))
WAIT_WINDOW = 10.0  # seconds over which the waiting gateway's CPU is read
WAIT_CPU_TARGET, WAIT_RSS_TARGET_MB = 0.1, 50.0


# -- the measured server alone on one core ----------------------------------------------


def start_gateway(
    redis_url: str, workdir: Path, prefix: list[str], **env: str
) -> tuple[Server, dict[str, Any]]:
    storage = workdir / "outputs"
    made = create_key(redis_url, storage)
    port = free_port()
    full_env = gateway_env(redis_url, port, storage)
    full_env.update(env)
    server = spawn("gateway", [*prefix, gateway_binary(), "serve"], full_env, port, workdir)
    return server, made


# -- openai: cache hit --------------------------------------------------------------------


def check_openai_hit(client: httpx.Client, case: Case, key: str) -> None:
    """The OpenAI answer is a URL, and its job was answered from the cache."""
    response = client.post(case.server.url(case.path), content=case.body, headers=case.headers)
    body = response.json()
    if response.status_code != 200 or not body.get("data") or "url" not in body["data"][0]:
        raise SystemExit(f"{OPENAI_HIT_CASE}: {response.status_code} {response.text[:500]}")
    job_id = response.headers["x-gateway-job-id"]
    job = client.get(case.server.url(f"/v1/jobs/{job_id}"), headers={"X-API-Key": key}).json()
    if not (job.get("metadata") or {}).get("cached"):
        raise SystemExit(f"{OPENAI_HIT_CASE}: not answered from the cache: {job}")


@scenario("openai")
async def openai_cache_hit(ctx: Context) -> list[HttpRow]:
    """The OpenAI route's cache hit against GraphQL's, interleaved in each round, the
    gateway alone on one core (`python -m bench openai`)."""
    rounds, seconds = ctx.timed()
    admin, redis_pid = await fresh_redis(ctx)
    gateway: Server | None = None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-openai-") as tmp,
            one_core_for_the_server(redis_pid) as (prefix, placement),
            httpx.Client(timeout=60) as client,
        ):
            workdir = Path(tmp)
            gateway, made = start_gateway(ctx.redis_url, workdir, prefix)
            auth = {"Content-Type": "application/json", "Authorization": f"Bearer {made['key']}"}
            graphql = json.dumps({"query": GENERATE, "variables": CACHEABLE_VARIABLES}).encode()
            complete_one(ctx.redis_url, workdir / "outputs", client, gateway, graphql, auth)
            cases = [
                Case(CACHE_CASE, gateway, "/graphql", graphql, auth, 200),
                Case(
                    OPENAI_HIT_CASE,
                    gateway,
                    "/v1/images/generations",
                    json.dumps(OPENAI_CACHEABLE).encode(),
                    auth,
                    200,
                ),
            ]
            for case in cases:
                case.write_script(workdir)
                answer = case.check(client)
                if case.name == CACHE_CASE and not answer["data"]["generate"]["metadata"].get(
                    "cached"
                ):
                    raise SystemExit(f"{CACHE_CASE}: not answered from the cache: {answer}")
            check_openai_hit(client, cases[1], made["key"])
            rows = await warmed_rows(cases, workdir)
            for _ in range(rounds):
                for case in cases:
                    await measure(case, rows[case.name], admin, redis_pid, seconds)
            await asyncio.sleep(1.0)  # at rest again
            for case in cases:
                rows[case.name].rss_mb = gateway.rss_mb()
    finally:
        if gateway is not None:
            gateway.stop()
        await admin.flushall()
        await admin.aclose()
    out = list(rows.values())
    openai, graphql_hit = rows[OPENAI_HIT_CASE], rows[CACHE_CASE]
    share = openai.median / graphql_hit.median
    per_round = [o / g for o, g in zip(openai.rates, graphql_hit.rates, strict=True)]
    cpu = statistics.median(openai.cpu_ms) / statistics.median(graphql_hit.cpu_ms)
    out[-1].summary = [
        placement,
        f"{OPENAI_HIT_CASE}: {share:.0%} of {CACHE_CASE}'s req/s (rounds "
        f"{min(per_round):.0%}..{max(per_round):.0%}), {cpu:.0%} of its CPU per request; "
        f"target {OPENAI_TARGET:.0%}: " + ("met" if share >= OPENAI_TARGET else "NOT met"),
    ]
    return out


# -- 1,000 waiting requests ---------------------------------------------------------------


@dataclass
class WaitRow:
    requests: int
    placement: str = ""
    admitted_s: float = 0.0  # first request sent -> all admitted and subscribed
    channels: int = 0  # job channels subscribed in Redis while all wait
    pubsub_connections: int = 0  # Redis connections in pub/sub mode while all wait
    waiting_cores: float = 0.0  # the gateway's CPU over the window
    window_s: float = 0.0
    redis_cmds_per_s: float = 0.0  # commands Redis ran over the window (the gateway's)
    rss_before_mb: float = 0.0
    rss_waiting_mb: float = 0.0
    rss_after_mb: float = 0.0  # at rest once all were answered
    answered_ok: int = 0  # 200 with an image URL
    failures: list[str] = field(default_factory=list)
    answered_s: float = 0.0  # worker started -> the last answer
    first_answer_s: float = 0.0  # worker started -> the first answer
    rates: list[float] = field(default_factory=list)  # answers/s once the worker ran


async def queue_length(admin: aioredis.Redis, account: str) -> int:
    """Jobs in the account's shard's queue (a stream), not yet taken by a worker."""
    return int(await admin.xlen(keys.queue(keys.shard_of(account))))


async def pubsub_connections(admin: aioredis.Redis) -> int:
    return sum(1 for c in await admin.client_list() if int(c.get("sub", 0)) > 0)


@scenario("waiting")
async def waiting(ctx: Context) -> list[WaitRow]:
    """N OpenAI image requests waiting for jobs no worker runs yet; then a worker."""
    n = int(os.environ.get("BENCH_WAITING_REQUESTS", 100 if ctx.quick else WAITING))
    row = WaitRow(n)
    admin, redis_pid = await fresh_redis(ctx)
    gateway: Server | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-waiting-") as tmp,
            one_core_for_the_server(redis_pid) as (prefix, row.placement),
        ):
            workdir = Path(tmp)
            gateway, made = start_gateway(
                ctx.redis_url, workdir, prefix, GATEWAY_SYNC_WAIT_SECONDS="600"
            )
            auth = {"Authorization": f"Bearer {made['key']}"}
            connector = aiohttp.TCPConnector(limit=0, force_close=False)
            timeout = aiohttp.ClientTimeout(total=900)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                # Warm-up, nothing waits: the routes' code loaded, one admission made.
                async with session.get(gateway.url("/v1/models"), headers=auth) as r:
                    assert r.status == 200, await r.text()
                body = {"model": "local", "prompt": "a quiet harbour", "size": "512x512"}
                async with session.post(
                    gateway.url("/v1/images/generations"),
                    json={**body, "model": "nope"},
                    headers=auth,
                ) as r:
                    assert r.status == 404, await r.text()
                async with session.post(
                    gateway.url("/v1/text_to_image"),
                    json={"service": "local", "prompt": "warm-up", "width": 512, "height": 512},
                    headers=auth,
                ) as r:
                    assert r.status == 202, await r.text()
                await asyncio.sleep(1.0)
                row.rss_before_mb = gateway.rss_mb()
                queued_before = await queue_length(admin, made["id"])

                async def one(i: int) -> tuple[int, str, float]:
                    async with session.post(
                        gateway.url("/v1/images/generations"),
                        json={**body, "prompt": f"a quiet harbour, number {i}"},
                        headers=auth,
                    ) as r:
                        text = await r.text()
                        return r.status, text, time.monotonic()

                sent = time.monotonic()
                tasks = [asyncio.create_task(one(i)) for i in range(n)]
                try:
                    deadline = sent + 120
                    while True:
                        await asyncio.sleep(0.1)
                        channels = len(await admin.pubsub_channels())
                        queued = await queue_length(admin, made["id"]) - queued_before
                        if channels >= n and queued >= n:
                            break
                        done = [t for t in tasks if t.done()]
                        if done or time.monotonic() > deadline:
                            early = (done[0].exception() or done[0].result()) if done else None
                            raise SystemExit(
                                f"waiting: {channels} channels, {queued} queued of {n}; "
                                f"an early answer: {early}"
                            )
                    row.admitted_s = time.monotonic() - sent
                    row.channels = len(await admin.pubsub_channels())
                    row.pubsub_connections = await pubsub_connections(admin)
                    await asyncio.sleep(1.0)  # the last admissions' work done
                    stats0 = await command_stats(admin)
                    cpu0, t0 = cpu_seconds(gateway.pid), time.monotonic()
                    await asyncio.sleep(WAIT_WINDOW)
                    cpu1, t1 = cpu_seconds(gateway.pid), time.monotonic()
                    stats = (await command_stats(admin) - stats0).without(
                        "info", "client|list", "pubsub|channels", "xlen"
                    )
                    row.window_s = t1 - t0
                    row.waiting_cores = (cpu1 - cpu0) / row.window_s
                    row.redis_cmds_per_s = sum(stats.calls.values()) / row.window_s
                    row.rss_waiting_mb = gateway.rss_mb()
                    if any(t.done() for t in tasks):
                        raise SystemExit("waiting: a request was answered before any worker ran")

                    with (workdir / "worker.log").open("wb") as log:
                        worker = subprocess.Popen(
                            [gateway_binary(), "worker"],
                            env=gateway_env(ctx.redis_url, 0, workdir / "outputs"),
                            cwd=ROOT,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    started = time.monotonic()
                    answers = await asyncio.gather(*tasks, return_exceptions=True)
                finally:  # none left behind when the scenario gives up
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
            ends = []
            for answer in answers:
                if isinstance(answer, BaseException):
                    if len(row.failures) < 3:
                        row.failures.append(repr(answer))
                    continue
                status, text, at = answer
                ends.append(at - started)
                try:
                    data = json.loads(text)["data"]
                    ok = status == 200 and len(data) == 1 and data[0]["url"].startswith("http")
                except (ValueError, KeyError, TypeError, AttributeError):
                    ok = False
                if ok:
                    row.answered_ok += 1
                elif len(row.failures) < 3:
                    row.failures.append(f"{status} {text[:200]}")
            if ends:
                row.first_answer_s, row.answered_s = min(ends), max(ends)
                row.rates = [row.answered_ok / row.answered_s]
            await asyncio.sleep(1.0)
            row.rss_after_mb = gateway.rss_mb()
    finally:
        if worker is not None:
            stop(worker)
        if gateway is not None:
            gateway.stop()
        await admin.flushall()
        await admin.aclose()
    return [row]


@renderer(WaitRow)
def waiting_table(rows: list[WaitRow], rounds: int) -> str:
    lines = []
    for r in rows:
        grew = r.rss_waiting_mb - r.rss_before_mb
        lines += [
            f"{r.requests:,} concurrent POST /v1/images/generations waiting for their jobs "
            "(no worker yet) in one gateway process:",
            f"  {r.placement}",
            f"  all admitted and waiting after {r.admitted_s:.1f} s: {r.channels:,} job "
            f"channels subscribed on {r.pubsub_connections} pub/sub connection(s)",
            f"  gateway CPU while all wait: {r.waiting_cores:.4f} cores over {r.window_s:.1f} s "
            f"(Redis ran {r.redis_cmds_per_s:.0f} commands/s); target under "
            f"{WAIT_CPU_TARGET} core: "
            + ("met" if r.waiting_cores < WAIT_CPU_TARGET else "NOT met"),
            f"  gateway RSS: {r.rss_before_mb:.1f} MB before, {r.rss_waiting_mb:.1f} MB while all "
            f"wait (+{grew:.1f} MB, {grew * 1024 / r.requests:.1f} KB a request), "
            f"{r.rss_after_mb:.1f} MB once all were answered; target under "
            f"{WAIT_RSS_TARGET_MB:.0f} MB: " + ("met" if grew < WAIT_RSS_TARGET_MB else "NOT met"),
            f"  then a `gateway worker`: {r.answered_ok:,} of {r.requests:,} answered 200 with "
            f"their image; the first {r.first_answer_s:.2f} s and the last "
            f"{r.answered_s:.2f} s after it started",
        ]
        lines += [f"  failed: {f}" for f in r.failures]
    return "\n".join(lines)
