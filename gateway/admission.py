"""admit(): may this key start this job now, and can it pay? One Lua call decides.

The rate window, the daily count, the concurrency slot and the credit reservation are
checked and taken together by `store/admit.lua`, which also records and enqueues the
job; a refused request takes nothing (see the script for the window's design).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.auth import Principal
from gateway.errors import BadUserInput, InsufficientCredits, RateLimited, Unauthenticated
from gateway.jobs.model import Job
from gateway.store import keys
from gateway.store.redis import Scripts, flat

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Admitted:
    window_used: int
    window_reset: int  # unix seconds
    balance: int
    mode: str = "run"  # run | hit (served from cache) | follow (waits for an identical job)
    outcome: dict[str, str] | None = None  # a hit's stored fields (urls, width, ...)


@dataclass(frozen=True)
class Duplicate:
    """An idempotency key seen before with the same parameters: the earlier job."""

    job_id: str


def utc_day(now_ms: int) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now_ms / 1000))


async def admit(
    redis: aioredis.Redis,
    scripts: Scripts,
    principal: Principal,
    job: Job,
    *,
    now_ms: int,
    lease_ms: int,
    idempotency: tuple[str, str] | None = None,
    hold_slot: bool = True,
    enqueue: bool = True,
    cache_digest: str | None = None,
    retention_ms: int = 7 * DAY_MS,
) -> Admitted | Duplicate:
    account = principal.account
    limits = principal.limits
    idem_key, idem_hash = idempotency or ("", "")
    ms_to_day_end = DAY_MS - now_ms % DAY_MS
    shard = keys.shard_of(account)
    digest = cache_digest or ""
    reply = await scripts.admit(
        keys=[
            keys.account(account),
            keys.rate(account),
            keys.day(account, utc_day(now_ms)),
            keys.running(account),
            keys.ledger(account),
            keys.job(account, job.id),
            keys.jobs(account),
            keys.idempotency(account, idem_key),
            keys.queue(shard),
            keys.cache_entry(shard, digest),
            keys.inflight(shard, digest),
            keys.followers(shard, digest),
            keys.coalescing(shard),
        ],
        args=[
            now_ms,
            -1 if limits.rpm is None else limits.rpm,
            -1 if limits.concurrency is None else limits.concurrency,
            -1 if limits.daily is None else limits.daily,
            job.cost,
            job.id,
            lease_ms,
            ms_to_day_end,
            idem_hash,
            1 if hold_slot else 0,
            1 if enqueue else 0,
            1 if cache_digest else 0,
            retention_ms,
            *flat(job.to_hash()),
        ],
        client=redis,
    )
    verdict = reply[0]
    if verdict == "ok":
        outcome = None
        if len(reply) > 5:
            outcome = dict(zip(("urls", "width", "height", "metadata"), reply[5:], strict=True))
        return Admitted(
            int(reply[1]), math.ceil(int(reply[2]) / 1000), int(reply[3]), str(reply[4]), outcome
        )
    if verdict == "duplicate":
        return Duplicate(str(reply[1]))
    if verdict == "limited":
        which, wait_ms = str(reply[1]), int(reply[2])
        raise RateLimited(which, max(1, math.ceil(wait_ms / 1000)))
    if verdict == "credits":
        raise InsufficientCredits(int(reply[1]), int(reply[2]))
    if verdict == "idempotency_mismatch":
        raise BadUserInput(
            "idempotencyKey was already used with different parameters", field="idempotencyKey"
        )
    raise Unauthenticated("Invalid API key")
