"""Job updates published over Redis pub/sub: a change made by any worker reaches every
gateway, whose waiters and open streams follow it on one shared subscription
(`gateway/job_watch.py`)."""

from __future__ import annotations

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
