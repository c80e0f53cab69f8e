"""The keyspace's shard count, kept in Redis (`keys.SHARDS`) so that every process agrees.

Each process reads the queues, webhook schedules and cache sweeps of the shards below its
own `GATEWAY_REDIS_SHARDS`, and places new accounts on them (README, "Redis Cluster").
One set lower than the keyspace leaves the jobs of accounts on the other shards queued,
never run nor refunded; one making accounts on shards no worker reads does the same. So:
- a server or worker starting raises the count to its own (ZADD GT: the highest wins,
  whoever writes first) and is refused when the count is higher (`at_start`);
- a running worker looks again at each heartbeat and stops when it was raised past it
  (`still_enough`), as a worker started before the process that raised it would not know;
- `keys create` is refused when its own count is higher than the keyspace's
  (`for_placing`): the workers are raised first;
- a keyspace made before the count was kept takes it from its accounts' ids.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from gateway.store import keys
from gateway.store.redis import RefusedRedis, decoded


class FewerShards(RefusedRedis):
    """This process's `GATEWAY_REDIS_SHARDS` is below the keyspace's."""

    def __init__(self, shards: int, count: int) -> None:
        super().__init__(
            f"GATEWAY_REDIS_SHARDS is {shards}, but this Redis holds a keyspace of {count} "
            f"shards (a process set to {count} has used it): this one would leave the jobs "
            f"of accounts on shards {shards}-{count - 1} unread. Set "
            f"GATEWAY_REDIS_SHARDS={count} on every process (a count raised by mistake, "
            f"before any account was made on the shards it added: DEL {keys.SHARDS})."
        )


class MoreShards(RefusedRedis):
    """`keys create` set higher than the workers read: its account may land on a shard
    none of them reads."""

    def __init__(self, shards: int, count: int) -> None:
        super().__init__(
            f"GATEWAY_REDIS_SHARDS is {shards}, but the keyspace of this Redis has {count} "
            f"shards: a key made now could land on a shard no worker reads. Start the "
            f"workers with GATEWAY_REDIS_SHARDS={shards} first, or set {count} here."
        )


async def _count(redis: aioredis.Redis) -> int | None:
    stored = await redis.zscore(keys.SHARDS, keys.SHARDS_MEMBER)
    return None if stored is None else int(stored)


async def _from_accounts(redis: aioredis.Redis) -> int:
    """The count a keyspace made before it was kept has: one past its highest account's
    shard (0 without accounts). Read once, when the count is missing."""
    highest = -1
    async for account in redis.sscan_iter(keys.ACCOUNTS, count=1000):
        highest = max(highest, keys.shard_of(decoded(account)))
    return highest + 1


async def at_start(redis: aioredis.Redis, shards: int) -> None:
    """A server's or worker's start: raise the count to `shards`; `FewerShards` when it
    is higher."""
    if await _count(redis) is None:
        await redis.zadd(keys.SHARDS, {keys.SHARDS_MEMBER: await _from_accounts(redis)}, gt=True)
    await redis.zadd(keys.SHARDS, {keys.SHARDS_MEMBER: shards}, gt=True)
    count = await _count(redis) or shards
    if count > shards:
        raise FewerShards(shards, count)


async def still_enough(redis: aioredis.Redis, shards: int) -> None:
    """A running worker's look: `FewerShards` once another process raised the count."""
    count = await _count(redis)
    if count is not None and count > shards:
        raise FewerShards(shards, count)


async def for_placing(redis: aioredis.Redis, shards: int) -> None:
    """Before `keys create` places an account on a shard below `shards`: `MoreShards`
    when the keyspace (its accounts', on a keyspace whose count was not kept) has fewer."""
    count = await _count(redis)
    if count is None:  # no server or worker has started on it yet: this sets the count
        count = max(await _from_accounts(redis), shards)
        await redis.zadd(keys.SHARDS, {keys.SHARDS_MEMBER: count}, gt=True)
    elif shards > count:
        raise MoreShards(shards, count)
