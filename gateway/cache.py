"""lookup / settle / release: the result cache and in-flight coalescing (CONTRACT §9).

The lookup itself happens inside admission (`admit.lua`), in the same round trip as
the limits: a hit becomes a completed job at once, an identical request in flight
makes the new job a follower of it. This module holds the rest: which requests are
cacheable, and what a leader's worker does when it ends.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from gateway.config import Settings
from gateway.jobs.model import Job
from gateway.params import GenerationRequest
from gateway.store import keys
from gateway.store.redis import Scripts


class Cache:
    def __init__(self, redis: aioredis.Redis, scripts: Scripts, settings: Settings) -> None:
        self.redis = redis
        self.scripts = scripts
        self.settings = settings
        self.retention_ms = int(settings.retention_days * 86_400_000)
        self.lease_ms = int(settings.job_deadline_seconds * 1000)

    def digest(self, request: GenerationRequest) -> str | None:
        """The cache key of a cacheable request; None when it must run on its own."""
        if not self.settings.cache_enabled or request.cache is False:
            return None
        if request.provider in self.settings.cache_disabled_services:
            return None
        if request.seed is None and request.cache is not True:
            return None  # no seed: the client asked for a new picture
        return request.cache_key()

    async def settle(
        self, job: Job, urls: list[str], width: int, height: int, metadata: dict[str, Any]
    ) -> list[str]:
        """The leader completed: store the entry, complete its followers; their keys."""
        assert job.cache_key
        done = await self.scripts.settle(
            keys=[keys.cache_entry(job.cache_key), keys.inflight(job.cache_key),
                  keys.followers(job.cache_key), keys.WEBHOOKS, keys.COALESCING],
            args=[keys.job(job.account, job.id), job.completed_at or 0, self.retention_ms,
                  orjson.dumps(urls).decode(), width, height,
                  orjson.dumps(metadata).decode()],
            client=self.redis,
        )
        return [str(k) for k in done]

    async def release(self, job: Job, now_ms: int) -> list[str]:
        """The leader failed or was cancelled: let the first waiter that can pay run in its
        place (the others keep waiting, now for it). The keys of jobs that changed."""
        assert job.cache_key
        inflight = keys.inflight(job.cache_key)
        if await self.redis.get(inflight) != keys.job(job.account, job.id):
            return []
        return await self._promote_next(job.cache_key, now_ms)

    async def rescue(self, now_ms: int) -> list[str]:
        """Followers whose leader ended without releasing them (its worker died at that
        instant), or whose leader record is gone: promote one of them. Run periodically."""
        changed: list[str] = []
        for inflight in await self.redis.smembers(keys.COALESCING):
            digest = str(inflight).rsplit(":", 1)[-1]
            leader = await self.redis.get(inflight)
            status = await self.redis.hget(leader, "status") if leader else None
            if status in ("queued", "processing"):
                continue
            if leader and not await self.redis.delete(inflight):
                continue
            changed += await self._promote_next(digest, now_ms)
        return changed

    async def _promote_next(self, digest: str, now_ms: int) -> list[str]:
        inflight, waiting = keys.inflight(digest), keys.followers(digest)
        changed: list[str] = []
        while True:
            # Peek, promote, then remove: a crash in between leaves the waiter listed.
            follower = await self.redis.lindex(waiting, 0)
            if follower is None:
                await self.redis.delete(inflight)
                await self.redis.srem(keys.COALESCING, inflight)
                return changed
            row = await self.redis.hmget(follower, "account", "id")
            verdict = "skip"
            if row[0]:
                account, job_id = row
                verdict = await self.scripts.promote(
                    keys=[follower, keys.account(account), keys.ledger(account), keys.QUEUE,
                          inflight, keys.WEBHOOKS],
                    args=[now_ms, self.lease_ms, job_id, self.retention_ms],
                    client=self.redis,
                )
            await self.redis.lrem(waiting, 1, follower)
            if verdict != "skip":
                changed.append(str(follower))
            if verdict == "promoted":
                return changed

    async def stats(self, account: str) -> dict[str, int]:
        raw = await self.redis.hmget(
            keys.account(account), "cache_hits", "cache_misses", "cache_coalesced",
            "credits_saved",
        )
        hits, misses, coalesced, saved = (int(v or 0) for v in raw)
        return {"hits": hits, "misses": misses, "coalesced": coalesced, "credits_saved": saved}
