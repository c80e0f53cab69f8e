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

import orjson
import redis.asyncio as aioredis

from gateway.auth import Credential, Principal, TokenGrant, plan_limits
from gateway.config import PlanLimits
from gateway.errors import (
    BadUserInput,
    Forbidden,
    GatewayError,
    InsufficientCredits,
    RateLimited,
    Unauthenticated,
)
from gateway.jobs.model import Job
from gateway.store import keys
from gateway.store.scripts import Hit, Scripts

DAY_MS = 86_400_000


#: why admit.lua refused a client token (its `forbidden` verdict's rule)
TOKEN_RULES = {
    "origin": "this client token is not valid from this origin",
    "service": "this client token may not use this service",
    "jobs": "this client token has made all the jobs it may (maxJobs)",
}


@dataclass(frozen=True)
class Admitted:
    principal: Principal  # the caller as admission saw it: balance and window after it
    mode: str = "run"  # run | hit (served from cache) | follow (waits for an identical job)
    outcome: Hit | None = None  # a hit's stored fields (urls, width, ...)


@dataclass(frozen=True)
class Duplicate:
    """An idempotency key seen before with the same parameters, or the job a client
    sending the same request left (`rejoin`): the earlier job."""

    principal: Principal
    job_id: str


def utc_day(now_ms: int) -> str:
    return _day_name(now_ms // DAY_MS)


@functools.lru_cache(maxsize=4)
def _day_name(day: int) -> str:
    return time.strftime("%Y%m%d", time.gmtime(day * 86_400))


def plan_table(plans: dict[str, PlanLimits]) -> str:
    """The plans as admit.lua and auth.lua read them (`store/limits.lua`):
    `;name:rpm:concurrency:daily;...` (-1: none). Made once, at start-up."""

    def n(v: int | None) -> int:
        return -1 if v is None else v

    for name in plans:
        if not name or ":" in name or ";" in name:
            raise ValueError(f"a plan's name cannot be empty or hold ':' or ';': {name!r}")
    return "".join(
        f";{name}:{n(p.rpm)}:{n(p.concurrency)}:{n(p.daily)}" for name, p in plans.items()
    )


async def admit(
    redis: aioredis.Redis,
    scripts: Scripts,
    credential: Credential,
    job: Job,
    *,
    plans: str,
    now_ms: int,
    lease_ms: int,
    idempotency: tuple[str, str] | None = None,
    cache_digest: str | None = None,
    retention_ms: int = 7 * DAY_MS,
    origin: str = "",
    ledger_keep_ms: int = 0,
    rejoin: str = "",
) -> Admitted | Duplicate:
    """Check the key or client token (of the account `job.account`) and admit `job`: one
    round trip. Refusals raise, carrying the key's X-RateLimit-* headers. `origin`: the
    request's Origin header, which a token restricted to origins must carry. `rejoin`
    (never with `idempotency`): the request's fingerprint, to join the job a client that
    sent it left (`keys.left`: a Duplicate of it), if there is one."""
    account = job.account
    token = credential.token
    idem_key, idem_hash = idempotency or ("", "")
    if token:  # a token's idempotency keys are its own
        idem_key = f"{token}:{idem_key}"
    if rejoin:
        idem_store, idem_hash = keys.left(account, token, rejoin), rejoin
    else:
        idem_store = keys.idempotency(account, idem_key)
    shard = keys.shard_of(account)
    digest = cache_digest or ""
    head, rest = job.record_parts()
    reply = await scripts.admit(
        account=keys.account(account),
        rate=keys.rate(account),
        day=keys.day(account, utc_day(now_ms)),
        running=keys.running(account),
        ledger=keys.ledger(account),
        job=keys.job(account, job.id),
        jobs=keys.jobs(account),
        idempotency=idem_store,
        queue=keys.queue(shard),
        cache_entry=keys.cache_entry(shard, digest),
        inflight=keys.inflight(shard, digest),
        followers=keys.followers(shard, digest),
        coalescing=keys.coalescing(shard),
        client_token=keys.client_token(account, token),
        token_jobs=keys.token_jobs(account, token),
        webhooks=keys.webhooks(shard),
        now_ms=now_ms,
        secret_hash=credential.secret_hash,
        plans=plans,
        cost=job.cost,
        job_id=job.id,
        lease_ms=lease_ms,
        ms_to_day_end=DAY_MS - now_ms % DAY_MS,
        idempotency_hash=idem_hash,
        cacheable=bool(cache_digest),
        retention_ms=retention_ms,
        token=bool(token),
        origin=origin.lower(),
        service=job.provider,
        record_head=orjson.dumps(head),
        record_rest=orjson.dumps(rest),
        webhook=bool(job.webhook_url),
        ledger_keep_ms=ledger_keep_ms,
        idempotency_only=bool(rejoin),
        client=redis,
    )
    verdict = reply.verdict
    if verdict == "unauthenticated":
        what = "client token: unknown, expired or revoked" if token else "API key"
        raise Unauthenticated(f"Invalid {what}")

    principal = Principal(
        account=account,
        name="",
        plan=reply.plan,
        credits=reply.balance,
        limits=plan_limits(reply.rpm, reply.concurrency, reply.daily),
        webhook_secret="",
        window_used=reply.window_used,
        window_reset=reply.window_reset,
        token=TokenGrant.admitted(token) if token else None,
    )
    if verdict == "ok":
        return Admitted(principal, reply.mode, reply.hit)
    if verdict == "duplicate":
        return Duplicate(principal, reply.job_id)
    refusal: GatewayError
    if verdict == "limited":
        refusal = RateLimited(
            reply.limit,
            max(1, math.ceil(reply.wait_ms / 1000)),
            # the headers describe the limit that refused it (the minute's: the key's own)
            allowed={"day": reply.daily, "concurrency": reply.concurrency}.get(reply.limit),
            reset=math.ceil((now_ms + reply.wait_ms) / 1000),
        )
    elif verdict == "credits":
        # A token sees its own budget, never its account's balance (as `me` shows it):
        # a budget that would do means the account behind it is short.
        short = token and principal.credits >= reply.cost
        why = "; the account behind this client token is short of credits" if short else ""
        refusal = InsufficientCredits(reply.cost, principal.credits, why)
    elif verdict == "forbidden":
        refusal = Forbidden(TOKEN_RULES[reply.rule])
    else:  # idempotency_mismatch
        refusal = BadUserInput(
            "idempotencyKey was already used with different parameters", field="idempotencyKey"
        )
    refusal.headers = refusal.headers or principal.rate_headers()
    raise refusal
