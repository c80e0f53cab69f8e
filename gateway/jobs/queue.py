"""The durable job queue: a Redis stream read through a consumer group.

Why a stream and not arq/saq: admission must record the job, charge credits and
enqueue in ONE atomic Lua call (nothing charged is ever left unqueued), which a
library that owns its own enqueue cannot join. A consumer group gives what we need:
each entry is delivered to one worker, stays pending until acknowledged, and an
entry whose worker stopped renewing it is claimed by another (XAUTOCLAIM) with its
delivery count. Execution is at-least-once; the job record's state makes a second
run harmless.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.store import keys


class Queue:
    def __init__(self, redis: aioredis.Redis, *, blocking: bool) -> None:
        self.redis = redis
        self.blocking = blocking  # the embedded store cannot block: poll + local wake-up
        self.wakeup = asyncio.Event()

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.QUEUE, keys.QUEUE_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def notify(self) -> None:
        """A job was just enqueued by this process."""
        self.wakeup.set()

    async def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, str]]:
        """Up to `count` new entries as (entry id, job key); waits up to `block_ms`."""
        if self.blocking:
            reply = await self.redis.xreadgroup(
                keys.QUEUE_GROUP, consumer, {keys.QUEUE: ">"}, count=count, block=block_ms
            )
        else:
            reply = await self.redis.xreadgroup(
                keys.QUEUE_GROUP, consumer, {keys.QUEUE: ">"}, count=count
            )
            if not reply or not reply[0][1]:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), block_ms / 1000)
                return []
        return [(entry_id, fields["job"]) for _, entries in reply for entry_id, fields in entries]

    async def ack(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(keys.QUEUE, keys.QUEUE_GROUP, entry_id)
            pipe.xdel(keys.QUEUE, entry_id)
            await pipe.execute()

    async def touch(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this worker is still running."""
        if entry_ids:
            await self.redis.xclaim(
                keys.QUEUE, keys.QUEUE_GROUP, consumer, 0, entry_ids, justid=True
            )

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[tuple[str, str]]:
        """Entries whose worker went silent, as (entry id, job key). How often a job was
        tried is counted on the job itself (`start.lua`), not here."""
        reply = await self.redis.xautoclaim(
            keys.QUEUE, keys.QUEUE_GROUP, consumer, min_idle_ms, "0-0", count=count
        )
        deleted = reply[2] if len(reply) > 2 else []
        for entry_id in deleted:  # trimmed away under us: nothing to run
            await self.redis.xack(keys.QUEUE, keys.QUEUE_GROUP, entry_id)
        return [(eid, f["job"]) for eid, f in reply[1] if f]
