"""The Redis connection (a real server, or the embedded fakeredis store), and what a
failure of the store means.

The Lua scripts are in `scripts.py`; `Scripts`, `Script`, `source` and `NAMES`
are re-exported here, where they used to live."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection as AsyncConnection
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.batching import BatchingCluster, BatchingRedis
from gateway.store.multiplexed import Multiplexed, pack
from gateway.store.scripts import NAMES as NAMES
from gateway.store.scripts import Script as Script
from gateway.store.scripts import Scripts as Scripts
from gateway.store.scripts import source as source

# The store cannot serve us now: unreachable (refused, reset, timed out, still loading
# its data), a Cluster between owners of a slot (CLUSTERDOWN, TRYAGAIN, a slot no node
# covers), a primary turned replica by a failover (READONLY), or full (OOM). Sent again
# later, the same command may well succeed: a request fails closed with 503, a worker
# leaves its job for a retry.
UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # BusyLoadingError and MaxConnectionsError among them
    RedisTimeoutError,
    RedisClusterException,  # the cluster client finds no node for a slot, or none at all
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
    OutOfMemoryError,
)

MAX_CONNECTIONS = 1024  # per process (per node on a Cluster)


def store_trouble(exc: BaseException) -> bool:
    """The store failed us, not the request or the job: told by the exception's type.

    True for the `UNREACHABLE` kinds above. Any other `ResponseError` is a bug, not
    trouble: Redis ran the command and refused it (a Lua runtime error in one of our
    scripts, WRONGTYPE on a key holding another kind of value); sent again it fails the
    same way. The API answers it with a masked 500, a worker fails the job with a refund.

    redis-py can raise AttributeError (or TypeError) instead of ConnectionError when a
    connection is torn down under it: `HiredisPacked` turns those raised while writing
    into the ConnectionError they are (see there), so they are retried, and classified
    by type. Its Cluster client can still raise AttributeError from its own bookkeeping
    while a node is replaced (redis-py issues #3815, #3835), which no type tells apart:
    an AttributeError raised from inside redis-py's own code counts as trouble too
    (nothing of ours runs there; any other exception raised there is classified by its
    type alone)."""
    if isinstance(exc, UNREACHABLE):
        return True
    return isinstance(exc, AttributeError) and _raised_in_redis_py(exc)


def _raised_in_redis_py(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    return module == "redis" or module.startswith("redis.")


# Every client `connect` makes decodes replies (decode_responses=True, the embedded store
# too), where redis-py's types say `bytes | str` for what is always a str here. These
# say so, once, at no cost (a cast, not a copy: job polls read whole hashes).


class RefusedRedis(RuntimeError):
    """A Redis the gateway will not run on (it may evict keys; its keyspace has more
    shards than this process reads); the message says why and what to change."""


def decoded(value: bytes | str) -> str:
    """A string reply of a client made by `connect`."""
    return cast(str, value)


def decoded_members(value: Sequence[object]) -> list[str]:
    """The members of a range of a sorted set or a list (without scores) read by a client
    made by `connect`."""
    return cast(list[str], value)


def decoded_hash(value: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A hash (HGETALL, a stream entry's fields) read by a client made by `connect`."""
    return cast(dict[str, str], value)


class HiredisPacked(AsyncConnection):
    """redis-py's asyncio connection packs commands in Python (a fifth of a generation
    request's CPU with admission's ~50 arguments); hiredis's C packer does it instead."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD", "CLIENT SETNAME"
            args = (*args[0].split(), *args[1:])
        return [pack(*args)]

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        """redis-py's, with the error a write on a connection torn down under it raises
        (AttributeError or TypeError from asyncio's transport: redis-py issue #4287)
        turned into the ConnectionError it is, so that redis-py retries the command on a
        new connection and `store_trouble` knows it by its type. redis-py has already
        closed the connection by then (as it does on any error while writing)."""
        try:
            await super().send_packed_command(command, check_health)
        except (AttributeError, TypeError) as exc:
            raise RedisConnectionError(f"the connection was closed under a write: {exc}") from exc


async def connect(redis_url: str | None) -> aioredis.Redis:
    """A client for `redis_url`, or the embedded store when it is unset.

    A plain node (over TCP or a Unix socket) gets a client whose data commands share one
    multiplexed connection (`multiplexed.py`); over TLS, redis-py's own connections with
    the auto-pipeline (`batching.py`). A node with cluster mode on gets a Redis Cluster
    client, auto-pipelined too, which sends each command to the node owning its slot (the
    keyspace keeps every script in one slot: see `keys.py`). The embedded store (fakeredis
    with Lua) lives inside one process: fine for `make run`, never for several processes.
    """
    if not redis_url:
        import fakeredis  # only the embedded store needs it

        return fakeredis.FakeAsyncRedis(decode_responses=True)
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 5,
        "socket_timeout": 10,
        "health_check_interval": 15,
        "retry_on_timeout": True,
        "connection_class": HiredisPacked,
    }
    # Waits for a free connection when all are busy (redis-py's default pool has 100 and
    # refuses the 101st command outright: a burst of jobs starting would fail).
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url, max_connections=MAX_CONNECTIONS, timeout=30, **options
    )
    # The client owns the pool: closing the client closes it. The multiplexed connection
    # speaks RESP3, redis-py's default, whose reply callbacks the client applies.
    multiplexed = urlsplit(redis_url).scheme in {"redis", "unix"} and str(
        pool.connection_kwargs.get("protocol", 3)
    ) in {"3", "None"}
    client = Multiplexed.over(pool) if multiplexed else BatchingRedis.from_pool(pool)
    try:
        clustered = (await client.info("cluster")).get("cluster_enabled") == 1
    except RedisError:
        return client  # unreachable now: a plain client, which reconnects when it can
    if not clustered:
        return client
    await client.aclose()
    for plain_only in ("health_check_interval", "retry_on_timeout"):
        options.pop(plain_only)
    cluster: Any = BatchingCluster.from_url(redis_url, max_connections=MAX_CONNECTIONS, **options)
    return cast(aioredis.Redis, cluster)
