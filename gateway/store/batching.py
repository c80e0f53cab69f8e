"""Auto-pipelining: the commands issued in one event-loop turn go out as one pipeline.

The client of a Redis Cluster and of a Redis over TLS; a plain Redis gets one
multiplexed connection instead (`multiplexed.py`), which sends the same commands.

redis-py sends each command on its own round trip and spends 80-180 µs of CPU on it;
the 64 requests a busy gateway serves at once, or the hundreds of jobs a worker starts
at once, issue their commands in the same loop turns, and sent as one pipeline each
costs 20-40 µs (BENCHMARKS.md). redis-py has no auto-pipelining (ioredis's
`enableAutoPipelining` is the model), hence this class.

Nothing changes for the caller: each command gets its own reply or its own error (a
script's NOSCRIPT included, so a `Script` still reloads), a connection failure fails
every command of its batch alike, and a command issued alone is sent alone. Only the
plain data commands the gateway uses (`BATCHED`) are batched; blocking reads, SCRIPT
LOAD, INFO and everything else go out as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

BATCHED = frozenset(
    {
        "EVALSHA",
        "GET",
        "SET",
        "STRLEN",
        "DEL",
        "EXISTS",
        "EXPIRE",
        "PEXPIRE",
        "INCR",
        "HGET",
        "HGETALL",
        "HSET",
        "HMGET",
        "HDEL",
        "HINCRBY",
        "HSETNX",
        "ZADD",
        "ZREM",
        "ZRANGE",
        "ZRANGEBYSCORE",
        "ZREVRANGE",
        "ZREVRANK",
        "ZSCORE",
        "ZCARD",
        "SADD",
        "SREM",
        "SMEMBERS",
        "SISMEMBER",
        "XACK",
        "XADD",
        "XRANGE",
        "XLEN",
        "PUBLISH",
    }
)

Pending = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class AutoPipeline:
    """Mixed into redis-py's client classes (below); overrides `execute_command`."""

    _pending: list[Pending] | None = None
    _sending: set[asyncio.Task[None]] | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if args[0] not in BATCHED:
            return await super().execute_command(*args, **options)  # type: ignore[misc]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._pending is not None:  # another command of this turn collects the batch
            self._pending.append((args, options, future))
            return await future
        self._pending = []
        try:
            await asyncio.sleep(0)  # one turn: the others issued now join the batch
        except BaseException:  # cancelled: the others still go
            batch, self._pending = self._pending, None
            if batch:
                self._spawn(batch)
            raise
        batch, self._pending = self._pending, None
        if not batch:  # alone: sent as it always was
            return await super().execute_command(*args, **options)  # type: ignore[misc]
        batch.insert(0, (args, options, future))
        self._spawn(batch)  # a task of its own: a caller cancelled meanwhile fails nobody
        return await future

    def _spawn(self, batch: list[Pending]) -> None:
        if self._sending is None:
            self._sending = set()
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[Pending]) -> None:
        try:
            async with self.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
                for args, options, _ in batch:
                    pipe.execute_command(*args, **options)
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection, not a command: all fail alike
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException as exc:  # cancelled (the client is closing)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            raise
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller gave up waiting
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


# redis-py's own command mixins disagree on `command_info`'s signature (its typing, not
# ours): mypy reports it on every class that combines them.
class BatchingRedis(AutoPipeline, Redis):  # type: ignore[misc]
    pass


class BatchingCluster(AutoPipeline, RedisCluster):  # type: ignore[misc]
    pass
