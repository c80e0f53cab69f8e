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
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.typing import StreamIdT, XReadGroupResponse

from gateway.store import keys
from gateway.store.scripts import Scripts
from gateway.timeouts import set_within

#: entries renewed per call of renew.lua (~3 ms of Redis each)
RENEW_BATCH = 500


def _parts(handle: str) -> tuple[int, str]:
    """A handle's shard and entry id (`"<shard>/<entry id>"`)."""
    shard, _, entry_id = handle.partition("/")
    return int(shard), entry_id


def by_stream(reply: XReadGroupResponse | None) -> list[list[Any]]:
    """An XREADGROUP reply as our clients get it (RESP2, decoded): `[[stream, [(entry
    id, fields), ...]], ...]`, empty when nothing came. redis-py's type also allows the
    RESP3 map, which they never ask for."""
    return cast(list[list[Any]], reply or [])


class Queue:
    """The queue's streams, one per shard of the keyspace (see `store/keys.py`).

    Entries are handed out as opaque handles, `"<shard>/<entry id>"`: entry ids of two
    streams may be equal. A single stream on a real Redis is read with a blocking
    XREADGROUP; several streams are swept with one pipeline of non-blocking reads (each
    touches one slot, as Redis Cluster requires), and an idle sweep waits `idle_ms` or
    until this process enqueues something."""

    def __init__(
        self,
        redis: aioredis.Redis,
        scripts: Scripts,
        *,
        blocking: bool,
        shards: int = 1,
        idle_ms: int = 100,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.blocking = blocking  # the embedded store cannot block: poll + local wake-up
        self.streams = [keys.queue(n) for n in range(shards)]
        self.idle_ms = idle_ms
        self.next_shard = 0
        self.wakeup = asyncio.Event()

    async def ensure_group(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, keys.QUEUE_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def regroup(self, exc: Exception) -> bool:
        """After NOGROUP (Redis restarted without its data, or flushed: the group made at
        start-up is gone while jobs are admitted again): make it again. True when that
        was the trouble, so the caller tries again instead of failing forever."""
        if not (isinstance(exc, ResponseError) and "NOGROUP" in str(exc)):
            return False
        await self.ensure_group()
        return True

    async def forget_gone(self, keep: str, idle_ms: int) -> int:
        """Delete the group's consumers that hold no entry and have read nothing for
        `idle_ms`: processes gone (each worker reads under a name of its own, made at
        its start), which the group would otherwise keep, one more at every start, for
        ever. An entry a gone consumer still holds keeps it until another worker takes
        the entry over (`reclaim`). `keep`: the caller's own name. How many went."""
        deleted = 0
        for stream in self.streams:
            forgot = await self.scripts.forget(
                stream=stream, group=keys.QUEUE_GROUP, idle_ms=idle_ms, keep=keep
            )
            deleted += forgot.deleted
        return deleted

    def notify(self) -> None:
        """A job was just enqueued by this process."""
        self.wakeup.set()

    async def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, str]]:
        """Up to `count` new entries as (handle, job key); waits up to `block_ms`."""
        if self.blocking and len(self.streams) == 1:
            reply = await self.redis.xreadgroup(
                keys.QUEUE_GROUP,
                consumer,
                {self.streams[0]: ">"},
                count=count,
                block=block_ms,
            )
            return [
                (f"0/{eid}", fields["job"]) for _, got in by_stream(reply) for eid, fields in got
            ]
        # Share `count` among up to `count` shards, starting where the last sweep stopped.
        width = min(len(self.streams), count)
        shards = [(self.next_shard + i) % len(self.streams) for i in range(width)]
        self.next_shard = (self.next_shard + width) % len(self.streams)
        self.wakeup.clear()
        async with self.redis.pipeline(transaction=False) as pipe:
            for i, shard in enumerate(shards):
                share = count // width + (1 if i < count % width else 0)
                pipe.xreadgroup(keys.QUEUE_GROUP, consumer, {self.streams[shard]: ">"}, count=share)
            replies = await pipe.execute()
        found = [
            (f"{shard}/{eid}", fields["job"])
            for shard, reply in zip(shards, replies, strict=True)
            for _, got in by_stream(reply)
            for eid, fields in got
        ]
        if not found:
            wait_ms = self.idle_ms if self.blocking else block_ms
            await set_within(self.wakeup, min(wait_ms, block_ms) / 1000)
        return found

    async def sizes(self) -> tuple[int, int]:
        """(waiting, taken) over every shard: entries no worker has read yet, and entries
        a worker has read and not acknowledged (an acknowledged entry is deleted, so the
        stream's length is their sum). XLEN and XPENDING's summary, O(1) each, in one
        round trip (for the metrics' gauges)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xlen(stream)
                pipe.xpending(stream, keys.QUEUE_GROUP)
            replies = await pipe.execute()
        length = sum(int(n) for n in replies[0::2])
        taken = sum(int(summary["pending"]) for summary in replies[1::2])
        return max(0, length - taken), taken

    async def ack(self, handle: str) -> None:
        shard, entry_id = _parts(handle)
        stream = self.streams[shard]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, keys.QUEUE_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def touch(self, consumer: str, handles: list[str]) -> list[str]:
        """Reset the idle time of entries this worker is still running; the handles of
        those another worker has taken over meanwhile (this one went silent for longer
        than a lease), which it must stop running (`store/renew.lua`)."""
        per_stream: dict[int, list[str]] = {}
        for handle in handles:
            shard, entry_id = _parts(handle)
            per_stream.setdefault(shard, []).append(entry_id)
        batches = [
            (shard, entry_ids[start : start + RENEW_BATCH])
            for shard, entry_ids in per_stream.items()
            for start in range(0, len(entry_ids), RENEW_BATCH)
        ]
        # Sent together (one pipeline), run one after another: other clients' commands
        # pass in between, where one call for 100,000 held Redis for half a second.
        replies = await asyncio.gather(
            *(
                self.scripts.renew(
                    stream=self.streams[shard],
                    group=keys.QUEUE_GROUP,
                    consumer=consumer,
                    entry_ids=entry_ids,
                    client=self.redis,
                )
                for shard, entry_ids in batches
            )
        )
        return [
            f"{shard}/{entry_id}"
            for (shard, _), gone in zip(batches, replies, strict=True)
            for entry_id in gone
        ]

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[tuple[str, str]]:
        """Entries whose worker went silent, as (handle, job key). How often a job was
        tried is counted on the job itself (`start.lua`), not here.

        XPENDING with IDLE finds them wherever they are among the pending entries, and
        XCLAIM (with the same minimum idle time: one another worker renewed meanwhile
        stays its) takes them. Not XAUTOCLAIM: it looks at no more than ten entries per
        one it may take, so a worker with one free slot never reached a dead worker's
        entries behind ten running ones."""
        found: list[tuple[str, str]] = []
        for shard, stream in enumerate(self.streams):
            if len(found) >= count:
                break
            idle = await self.redis.xpending_range(
                stream, keys.QUEUE_GROUP, "-", "+", count - len(found), idle=min_idle_ms
            )
            if not idle:
                continue
            ids: list[StreamIdT] = [str(row["message_id"]) for row in idle]
            # As our clients decode it: (entry id, fields, or None for one deleted since)
            claimed = cast(
                list[tuple[str, dict[str, str] | None]],
                await self.redis.xclaim(stream, keys.QUEUE_GROUP, consumer, min_idle_ms, ids),
            )
            for entry_id, fields in claimed:
                if fields:
                    found.append((f"{shard}/{entry_id}", fields["job"]))
                else:  # deleted under us: nothing to run
                    await self.redis.xack(stream, keys.QUEUE_GROUP, entry_id)
        return found
