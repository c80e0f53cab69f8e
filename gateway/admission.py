"""admit(): is this key valid, may it start this job now, and can it pay? One Lua call.

The key check, the rate window, the daily count, the concurrency slot and the credit
reservation are decided and taken together by `store/admit.lua`, which also records
and enqueues the job; a refused request takes nothing (see the script for the window's
design). A generation request thus costs one Redis round trip in all.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.auth import Principal
from gateway.config import PlanLimits
from gateway.errors import (
    BadUserInput,
    GatewayError,
    InsufficientCredits,
    RateLimited,
    Unauthenticated,
)
from gateway.jobs.model import Job
from gateway.store import keys
from gateway.store.redis import Scripts, flat

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Admitted:
    principal: Principal  # the caller as admission saw it: balance and window after it
    mode: str = "run"  # run | hit (served from cache) | follow (waits for an identical job)
    outcome: dict[str, str] | None = None  # a hit's stored fields (urls, width, ...)


@dataclass(frozen=True)
class Duplicate:
    """An idempotency key seen before with the same parameters: the earlier job."""

    principal: Principal
    job_id: str


def utc_day(now_ms: int) -> str:
    return _day_name(now_ms // DAY_MS)


@functools.lru_cache(maxsize=4)
def _day_name(day: int) -> str:
    return time.strftime("%Y%m%d", time.gmtime(day * 86_400))


def plan_table(plans: dict[str, PlanLimits]) -> str:
    """The plans as admit.lua reads them: `name:rpm:concurrency:daily;...` (-1: none)."""

    def n(v: int | None) -> int:
        return -1 if v is None else v

    return ";".join(
        f"{name}:{n(p.rpm)}:{n(p.concurrency)}:{n(p.daily)}" for name, p in plans.items()
    )


@functools.lru_cache(maxsize=256)  # a few plans: one model each, not one per request
def _limits(rpm: int, concurrency: int, daily: int) -> PlanLimits:
    """The limits admit.lua reports (-1: none)."""

    def limit(v: int) -> int | None:
        return None if v < 0 else v

    return PlanLimits(rpm=limit(rpm), concurrency=limit(concurrency), daily=limit(daily))


async def admit(
    redis: aioredis.Redis,
    scripts: Scripts,
    secret_hash: str,
    job: Job,
    *,
    plans: str,
    now_ms: int,
    lease_ms: int,
    idempotency: tuple[str, str] | None = None,
    hold_slot: bool = True,
    enqueue: bool = True,
    cache_digest: str | None = None,
    retention_ms: int = 7 * DAY_MS,
) -> Admitted | Duplicate:
    """Check the key (its account is `job.account`, its secret's hash `secret_hash`) and
    admit `job`: one round trip. Refusals raise, carrying the key's X-RateLimit-* headers."""
    account = job.account
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
            secret_hash,
            plans,
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
    if verdict == "unauthenticated":
        raise Unauthenticated("Invalid API key")

    principal = Principal(
        account=account,
        name="",
        plan=str(reply[7]),
        credits=int(reply[6]),
        limits=_limits(int(reply[1]), int(reply[2]), int(reply[3])),
        webhook_secret="",
        window_used=int(reply[4]),
        window_reset=math.ceil((int(reply[5]) + 60000) / 1000),
    )
    rest = reply[8:]
    if verdict == "ok":
        outcome = None
        if len(rest) > 1:
            outcome = dict(zip(("urls", "width", "height", "metadata"), rest[1:], strict=True))
        return Admitted(principal, str(rest[0]), outcome)
    if verdict == "duplicate":
        return Duplicate(principal, str(rest[0]))
    refusal: GatewayError
    if verdict == "limited":
        refusal = RateLimited(str(rest[0]), max(1, math.ceil(int(rest[1]) / 1000)))
    elif verdict == "credits":
        refusal = InsufficientCredits(int(rest[0]), principal.credits)
    else:  # idempotency_mismatch
        refusal = BadUserInput(
            "idempotencyKey was already used with different parameters", field="idempotencyKey"
        )
    refusal.headers = principal.rate_headers()
    raise refusal
