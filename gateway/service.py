"""The gateway's operations, one code path for GraphQL and REST.

Resolvers and REST handlers stay thin: they turn their input into a
`GenerationRequest` and call these methods, which raise only `GatewayError`s.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
import redis.asyncio as aioredis

from gateway import pricing
from gateway.accounts import Accounts
from gateway.admission import Admitted, admit, plan_table, utc_day
from gateway.artifacts import ArtifactStore
from gateway.auth import Principal, authenticate, credentials
from gateway.cache import Cache
from gateway.callbacks import RedisInbox
from gateway.config import Settings
from gateway.errors import GatewayError, NotFound, ServiceUnavailable
from gateway.events import Events
from gateway.jobs.model import Job
from gateway.jobs.queue import Queue
from gateway.jobs.store import JobStore
from gateway.params import SEED_MAX, GenerationRequest
from gateway.routing import Router
from gateway.store import keys
from gateway.store.redis import Scripts, store_trouble
from gateway.urlguard import check_url
from gateway.webhooks import Webhooks


@contextlib.contextmanager
def store_errors(
    message: str = "the job store is unreachable; nothing was charged",
) -> Iterator[None]:
    """Redis unreachable: fail closed with a clear 503 (and Retry-After)."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, OSError) or store_trouble(exc):
            raise ServiceUnavailable(message) from exc
        raise


@dataclass(frozen=True)
class Estimate:
    credits: int
    width: int
    height: int
    num_images: int
    backends: list[str]


class Gateway:
    def __init__(
        self,
        *,
        settings: Settings,
        redis: aioredis.Redis,
        scripts: Scripts,
        router: Router,
        artifacts: ArtifactStore,
        queue: Queue,
        store: JobStore,
        events: Events,
        cache: Cache,
        webhooks: Webhooks,
        inbox: RedisInbox,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Every part comes built (by `gateway/runtime.py`); the job store, events, cache
        and webhooks are the worker's too."""
        self.settings = settings
        self.redis = redis
        self.scripts = scripts
        self.router = router
        self.artifacts = artifacts
        self.queue = queue
        self.store = store
        self.events = events
        self.cache = cache
        self.webhooks = webhooks
        self.inbox = inbox  # receives the upstreams' callbacks (`POST /v1/callbacks/...`)
        self.clock = clock
        self.accounts = Accounts(redis, scripts, settings)
        self.plans = plan_table(settings.plans)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def authenticate(self, key: str | None, *, read: bool = False) -> Principal:
        with store_errors():
            return await authenticate(
                self.redis,
                self.scripts,
                self.settings,
                key,
                self.now_ms(),
                plans=self.plans,
                read=read,
            )

    async def _refuse(self, api_key: str | None, exc: GatewayError) -> NoReturn:
        """A generation request refused before admission (bad input, nothing routable):
        a bad key still gets its 401, a good one its X-RateLimit-* headers."""
        principal = await self.authenticate(api_key)
        exc.headers = {**principal.rate_headers(), **exc.headers}
        raise exc

    def estimate(self, request: GenerationRequest) -> Estimate:
        backends = self.router.route(request.provider)
        width, height = request.size()
        credits = pricing.cost(width, height, request.num_images)
        return Estimate(credits, width, height, request.num_images, backends)

    async def generate(
        self, api_key: str | None, parse: Callable[[], Awaitable[GenerationRequest]]
    ) -> tuple[Job, Principal]:
        """Check the key, parse and validate the input, price, admit and enqueue, the key
        check and admission in one Lua call; the job and the caller as admission left it.

        `parse` reads the caller's input (GraphQL or REST): a refusal before admission
        is answered here, once, with the key still checked."""
        account, secret_hash = credentials(api_key)
        try:
            request = await parse()
            self.router.enabled(request.provider)  # unknown -> 400, nothing enabled -> 503
            if request.webhook_url:
                await check_url(request.webhook_url, self.settings.allow_cidrs)
            credits = pricing.cost(*request.size(), request.num_images)
        except GatewayError as exc:
            await self._refuse(api_key, exc)
        # A seed is fixed at admission, so a retry or failover makes the same picture.
        # One read of the system's randomness for the job id and the seed.
        raw = os.urandom(16)
        seed = request.seed if request.seed is not None else int.from_bytes(raw[12:]) & SEED_MAX
        params = request.image_fields(seed)
        now = self.now_ms()
        job = Job(
            id=raw[:12].hex(),
            account=account,
            status="queued",
            provider=request.provider,
            params=params,
            cost=credits,
            created_at=now,
            webhook_url=request.webhook_url,
            cache_key=self.cache.digest(request),
        )
        idempotency = (
            (request.idempotency_key, request.fingerprint()) if request.idempotency_key else None
        )
        with store_errors():
            verdict = await admit(
                self.redis,
                self.scripts,
                secret_hash,
                job,
                plans=self.plans,
                now_ms=now,
                # A queued job holds its slot until it ends (bounded by the deadline);
                # once a worker starts it, the slot becomes a short lease it renews.
                lease_ms=int(self.settings.job_deadline_seconds * 1000),
                idempotency=idempotency,
                cache_digest=job.cache_key,
                retention_ms=self.cache.retention_ms,
            )
            if not isinstance(verdict, Admitted):
                earlier = await self.store.get(account, verdict.job_id)
                if earlier is None:
                    raise NotFound("the job of this idempotencyKey no longer exists")
                return earlier, verdict.principal
        if verdict.mode == "run":
            self.queue.notify()
        else:
            job.cost = 0  # a cache hit or a request coalesced into one in flight
        if verdict.outcome:
            job.status, job.completed_at = "completed", now
            job.urls = orjson.loads(verdict.outcome["urls"])
            job.width = int(verdict.outcome["width"])
            job.height = int(verdict.outcome["height"])
            job.metadata = orjson.loads(verdict.outcome["metadata"])
        return job, verdict.principal

    async def job(self, principal: Principal, job_id: str) -> Job | None:
        with store_errors():
            return await self.store.get(principal.account, job_id)

    async def jobs(
        self, principal: Principal, first: int, after: str | None, status: str | None
    ) -> tuple[list[Job], bool]:
        with store_errors():
            return await self.store.page(principal.account, first, after, status)

    async def cancel(self, principal: Principal, job_id: str) -> Job:
        """Cancel a job that has not ended: refunded at once, its slot freed.

        A queued job never starts; a running one is stopped by its worker at its next
        poll (and cancelled upstream where the provider allows).
        """
        with store_errors():
            job = await self.store.get(principal.account, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            if not job.ended:
                await self.store.finish(
                    job, "cancelled", self.now_ms(), refund=True, error="cancelled by the client"
                )
                job = await self.store.get(principal.account, job_id) or job
                await self.events.publish(job)
                if job.cache_key:  # a waiter runs in its place
                    promoted = await self.cache.release(job, self.now_ms())
                    if promoted:
                        self.queue.notify()
                        await self.events.publish_stored(*promoted)
            return job

    async def follow(self, principal: Principal, job_id: str) -> AsyncIterator[Job]:
        job = await self.job(principal, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        async for update in self.events.follow(principal.account, job_id):
            yield update

    async def me(self, principal: Principal) -> dict[str, Any]:
        """Plan, balance, and each limit with its use and reset time."""
        now = self.now_ms()
        account = principal.account
        with store_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(keys.account(account), "credits")
                pipe.get(keys.day(account, utc_day(now)))
                pipe.zcount(keys.running(account), now, "+inf")
                pipe.get(keys.reads(account, now // 60000))
                credits, today, running, reads = await pipe.execute()
        limits = principal.limits
        day_reset = (now // 86_400_000 + 1) * 86_400

        def usage(name: str, limit: int | None, used: int, reset: int | None) -> dict[str, Any]:
            remaining = None if limit is None else max(0, limit - used)
            return {
                "name": name,
                "limit": limit,
                "used": used,
                "remaining": remaining,
                "reset": reset,
            }

        cache = await self.cache.stats(account)
        return {
            "cache": cache,
            "id": account,
            "name": principal.name,
            "plan": principal.plan,
            "credits": int(credits or 0),
            "limits": [
                usage("minute", limits.rpm, principal.window_used, principal.window_reset),
                usage("day", limits.daily, int(today or 0), day_reset),
                usage("concurrency", limits.concurrency, int(running or 0), None),
                usage("read", self.settings.read_rpm, int(reads or 0), (now // 60000 + 1) * 60),
            ],
        }

    async def webhook_deliveries(self, principal: Principal, job_id: str) -> list[dict[str, Any]]:
        with store_errors():
            if await self.store.get(principal.account, job_id) is None:
                raise NotFound(f"no job {job_id}")
            return await self.webhooks.attempts(principal.account, job_id)

    async def resend_webhook(self, principal: Principal, job_id: str) -> None:
        with store_errors():
            job = await self.store.get(principal.account, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            await self.webhooks.resend(job)

    def providers(self) -> list[dict[str, Any]]:
        return self.router.describe()

    async def ready(self) -> dict[str, bool]:
        try:
            redis_ok = bool(await self.redis.ping())
        except Exception:
            redis_ok = False
        return {"redis": redis_ok, "storage": await self.artifacts.ready()}
