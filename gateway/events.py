"""Job updates over Redis pub/sub: a change made by any worker reaches every gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import redis.asyncio as aioredis

from gateway.jobs.model import Job
from gateway.jobs.store import JobStore
from gateway.store import keys


class Events:
    def __init__(self, redis: aioredis.Redis, store: JobStore) -> None:
        self.redis = redis
        self.store = store

    async def publish(self, job: Job) -> None:
        await self.redis.publish(keys.events(job.account, job.id), orjson.dumps(job.public()))

    async def publish_stored(self, *job_keys: str) -> None:
        """Publish jobs as stored now (after a script changed them)."""
        for job_key in job_keys:
            job = await self.store.get_by_key(job_key)
            if job is not None:
                await self.publish(job)

    async def follow(
        self, account: str, job_id: str, read: Callable[[], Awaitable[Job | None]] | None = None
    ) -> AsyncIterator[Job]:
        """The job's current state, then each change, ending with its terminal state.

        Subscribes before reading the current state, so no change falls in between.
        `read`: how the record is read each time (the follower's credential checked with
        it: `Gateway.follow`); its errors end the stream. None: read it from the store.
        """
        read = read or (lambda: self.store.get(account, job_id))
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(keys.events(account, job_id))
        try:
            job = await read()
            if job is None:
                return
            yield job
            while not job.ended:
                # A message says when to look; the record says what is true. Without news
                # for a while, look anyway, so a missed message cannot hang the stream.
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                fresh = await read()
                if fresh is None:
                    return
                if message is None and (fresh.status, fresh.metadata) == (job.status, job.metadata):
                    continue
                job = fresh
                yield job
        finally:
            await pubsub.unsubscribe()
            await pubsub.aclose()
