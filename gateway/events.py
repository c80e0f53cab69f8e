"""Job updates over Redis pub/sub: a change made by any worker reaches every gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator

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

    async def follow(self, account: str, job_id: str) -> AsyncIterator[Job]:
        """The job's current state, then each change, ending with its terminal state.

        Subscribes before reading the current state, so no change falls in between.
        """
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(keys.events(account, job_id))
        try:
            job = await self.store.get(account, job_id)
            if job is None:
                return
            last = job.status
            yield job
            while not job.ended:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                if message is None:
                    # No news: re-read, so a missed message cannot leave the stream hanging.
                    fresh = await self.store.get(account, job_id)
                    if fresh is None:
                        return
                    if fresh.status == last and fresh.metadata == job.metadata:
                        continue
                job = await self.store.get(account, job_id) or job
                last = job.status
                yield job
        finally:
            await pubsub.unsubscribe()
            await pubsub.aclose()
