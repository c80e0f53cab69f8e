"""lookup / settle / release: the result cache and in-flight coalescing.

The lookup itself happens inside admission (`admit.lua`), in the same round trip as
the limits: a hit becomes a completed job at once, an identical request in flight
makes the new job a follower of it. Entries are copied into every shard of the
keyspace (see `store/keys.py`); admission joins requests of the same shard, and with
several shards each shard's leader asks `lead` before it calls an upstream: the first
leads, the others wait for it (the worker) and complete with its images.
This module holds the rest: which requests are cacheable, and what a leader's worker
does when it starts and ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis

from gateway.config import Settings
from gateway.jobs.model import Job
from gateway.params import GenerationRequest
from gateway.store import keys
from gateway.store.redis import decoded
from gateway.store.scripts import Scripts

#: waiters a settle.lua call completes, at most (what that holds Redis for: BENCHMARKS.md)
SETTLED_AT_ONCE = 250
ALL = 2**31 - 1


#: An account's cache statistics, none counted (what a client token is shown: `me`)
NO_STATS: dict[str, int] = {"hits": 0, "misses": 0, "coalesced": 0, "credits_saved": 0}


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
        return request.cache_key

    async def settle(
        self,
        job: Job,
        urls: list[str],
        width: int,
        height: int,
        metadata: dict[str, Any],
        *,
        keep: bool = True,
        entry_of: Job | None = None,
    ) -> list[str]:
        """The leader completed: store the entry, complete its followers; their keys.

        The entry is written into the leader's shard with its followers (one script),
        then copied into every other shard, so any key's admission finds it in its own
        slot. A copy lost to a crash costs a cache miss, never a wrong result. `keep`
        False: the followers, who asked at the same time, get the outcome, but no later
        request does (the entry answers no hit). `entry_of`: the leader of another shard
        whose images `job` completed with; the entry is that one's, as it made it, and is
        written into this shard only (that one copies it into the others)."""
        assert job.cache_key
        shard, digest = keys.shard_of(job.account), job.cache_key
        outcome: dict[str, Any] = {
            "urls": orjson.dumps(urls).decode(),
            "width": width,
            "height": height,
            "metadata": orjson.dumps(metadata).decode(),
            # What a hit's job says, made once here rather than by every hit's script.
            "hit_metadata": orjson.dumps({**metadata, "cached": True, "duration": 0}).decode(),
            # A hit's record refers to the entry for its outcome and params (read.lua).
            "params": orjson.dumps(job.params).decode(),
            "now_ms": job.completed_at or 0,
            "retention_ms": self.retention_ms,
        }
        # Not a preview's waiters: between two calls an identical request would run and
        # lead, and its own waiters join the list this drains (keep True: a hit instead).
        count = SETTLED_AT_ONCE if keep else ALL
        completed: list[str] = []
        more, first = True, entry_of is None
        while more:  # a few hundred waiters a call: none holds Redis long
            reply = await self.scripts.settle(
                cache_entry=keys.cache_entry(shard, digest),
                inflight=keys.inflight(shard, digest),
                followers=keys.followers(shard, digest),
                webhooks=keys.webhooks(shard),
                coalescing=keys.coalescing(shard),
                leader=keys.job(job.account, job.id),
                count=count,
                keep=keep,
                first=first,
                client=self.redis,
                **outcome,
            )
            completed += reply.completed
            more, first = reply.more, False
        # The other shards' copies, sent together (one pipeline: gateway/store/batching.py).
        copies = [n for n in range(self.settings.redis_shards) if n != shard]
        if entry_of is not None:  # dated as the leader's own: its copies say the same
            copies, outcome["now_ms"] = [shard], entry_of.completed_at or 0
        await asyncio.gather(
            *(
                self.scripts.entry(
                    cache_entry=keys.cache_entry(n, digest), client=self.redis, **outcome
                )
                for n in copies
                if keep
            )
        )
        return completed

    @property
    def across_shards(self) -> bool:
        """Whether identical requests of different shards are joined by `lead`."""
        return self.settings.redis_shards > 1

    async def lead(self, job: Job, instead_of: str = "") -> str:
        """The key of the job that makes the images of every shard's identical requests:
        `job`'s own when none had the lead (or `instead_of`, a job that ended without
        images, had it), for as long as a job may run."""
        assert job.cache_key
        return await self.scripts.lead(
            leading=keys.leading(job.cache_key),
            job=keys.job(job.account, job.id),
            lease_ms=self.lease_ms,
            instead_of=instead_of,
            client=self.redis,
        )

    async def unlead(self, job: Job) -> None:
        """`job` ended: it gives up the lead, if it has it."""
        if self.across_shards and job.cache_key:
            await self.scripts.lead(
                leading=keys.leading(job.cache_key),
                job=keys.job(job.account, job.id),
                lease_ms=0,
                client=self.redis,
            )

    async def release(self, job: Job, now_ms: int) -> list[str]:
        """The leader failed or was cancelled: let the first waiter that can pay run in its
        place (the others keep waiting, now for it). The keys of jobs that changed."""
        assert job.cache_key
        shard = keys.shard_of(job.account)
        leader = keys.job(job.account, job.id)
        if await self.redis.get(keys.inflight(shard, job.cache_key)) != leader:
            return []
        return await self._promote_next(shard, job.cache_key, now_ms, leader)

    async def rescue(
        self, now_ms: int, keep: Callable[[str, str], bool] = lambda service, backend: True
    ) -> list[str]:
        """Followers whose leader ended without releasing them (its worker died at that
        instant, or part way through settling them), or whose leader record is gone:
        settle or promote them. Run periodically. `keep(service, backend)`: whether a
        completed leader's outcome is one to cache (`settle`'s `keep`), as its worker
        decides it (`Router.configured`)."""
        changed: list[str] = []
        for shard in range(self.settings.redis_shards):
            for member in await self.redis.smembers(keys.coalescing(shard)):
                inflight = decoded(member)
                digest = inflight.rsplit(":", 1)[-1]
                leader = await self.redis.get(inflight)
                record = (
                    (await self.scripts.read(jobs=[decoded(leader)], client=self.redis)).records[0]
                    if leader
                    else {}
                )
                if record.get("status") in ("queued", "processing"):
                    continue
                if record.get("status") == "completed":  # its worker died before settling
                    done = Job.from_record(record)
                    changed += await self.settle(
                        done,
                        done.urls,
                        done.width or 0,
                        done.height or 0,
                        done.metadata,
                        keep=keep(done.provider, (done.metadata or {}).get("backend") or ""),
                    )
                    continue
                # In the place of the leader read: if a release (or another process's
                # rescue) promoted a waiter meanwhile, promote.lua answers 'moved'.
                changed += await self._promote_next(
                    shard, digest, now_ms, decoded(leader) if leader else ""
                )
        return changed

    async def _promote_next(self, shard: int, digest: str, now_ms: int, leader: str) -> list[str]:
        """Promote the first waiter that can pay, in the place of `leader` (its job key;
        "" when none is in flight): promote.lua does nothing once another release of the
        same leader has promoted one (two cancels at once, a worker and a cancel)."""
        inflight, waiting = keys.inflight(shard, digest), keys.followers(shard, digest)
        changed: list[str] = []
        while True:
            # Peek, promote, then remove: a crash in between leaves the waiter listed.
            first = await self.redis.lindex(waiting, 0)
            if first is None:
                await self.scripts.vacate(
                    inflight=inflight,
                    coalescing=keys.coalescing(shard),
                    leader=leader,
                    client=self.redis,
                )
                return changed
            follower = decoded(first)
            account, job_id = keys.job_parts(follower)  # a record gone is skipped
            # The client token it was made with pays for it (a rare path: one read more).
            [record] = (await self.scripts.read(jobs=[follower], client=self.redis)).records
            reply = await self.scripts.promote(
                job=follower,
                account=keys.account(account),
                ledger=keys.ledger(account),
                queue=keys.queue(shard),
                inflight=inflight,
                webhooks=keys.webhooks(shard),
                client_token=keys.client_token(account, record.get("token") or ""),
                running=keys.running(account),
                now_ms=now_ms,
                lease_ms=self.lease_ms,
                job_id=job_id,
                retention_ms=self.retention_ms,
                leader=leader,
                ledger_keep_ms=self.settings.ledger_keep_ms,
                client=self.redis,
            )
            if reply.verdict in ("moved", "completed"):
                return changed
            await self.redis.lrem(waiting, 1, follower)
            if reply.verdict != "skip":
                changed.append(follower)
            if reply.verdict == "promoted":
                return changed

    async def stats(self, account: str) -> dict[str, int]:
        raw = await self.redis.hmget(
            keys.account(account),
            "cache_hits",
            "cache_misses",
            "cache_coalesced",
            "credits_saved",
        )
        return dict(zip(NO_STATS, (int(v or 0) for v in raw), strict=True))
