"""The Redis connection (a real server, or the embedded fakeredis store) and the scripts."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection as AsyncConnection
from redis.exceptions import (
    ClusterDownError,
    DataError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.batching import BatchingCluster, BatchingRedis

HERE = Path(__file__).parent
# The store cannot be reached (or a Cluster is between owners of a slot): a request
# fails closed with 503, a worker leaves its job for a retry.
UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    RedisClusterException,
    ClusterDownError,
    TryAgainError,
)

MAX_CONNECTIONS = 1024  # per process (per node on a Cluster)


def store_trouble(exc: BaseException) -> bool:
    """The store failed us, not the job: unreachable, or redis-py itself broke mid-call
    (its cluster client can use a connection it just dropped while a node restarts,
    raising AttributeError from deep inside). Such a job is left for a retry."""
    if isinstance(exc, UNREACHABLE):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    return module == "redis" or module.startswith("redis.")


NAMES = ("admit", "start", "finish", "credit", "auth", "claim", "settle", "promote")
# Each changes one job record and must change it once however often it is sent: run
# inside once.lua, with a token of its call (admit.lua and credit.lua need no token: a
# new job id, a new top-up key, are theirs).
ONCE = frozenset({"start", "finish", "promote"})


class HiredisPacked(AsyncConnection):
    """redis-py's asyncio connection packs commands in Python (a fifth of a generation
    request's CPU with admission's ~50 arguments); hiredis's C packer does it instead."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD", "CLIENT SETNAME"
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from None


async def connect(redis_url: str | None) -> aioredis.Redis:
    """A client for `redis_url`, or the embedded store when it is unset.

    A node with cluster mode on gets a Redis Cluster client, which sends each command to
    the node owning its slot (the keyspace keeps every script in one slot: see
    `keys.py`). The embedded store (fakeredis with Lua) lives inside one process: fine
    for `make run`, never for several processes.
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
    client = BatchingRedis.from_pool(pool)  # owns the pool: closing the client closes it
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


class Script:
    """A Lua script run by EVALSHA, loaded again when the server has lost it (NOSCRIPT).

    redis-py's `AsyncScript` does the same, but imports and checks for a pipeline on
    every call: ~5% of a REST generation request's CPU. EVALSHA goes to
    `execute_command` itself, past the two wrappers of redis-py's `evalsha`."""

    def __init__(self, client: aioredis.Redis, source: str, *, once: bool = False) -> None:
        self.client = client
        self.source = source
        self.once = once  # wrapped in once.lua: each call carries a token of its own
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(
        self, keys: list[Any], args: list[Any], client: aioredis.Redis | None = None
    ) -> Any:
        client = client or self.client
        if self.once:  # one token per call: a re-send of the same command carries it too
            args = [*args, os.urandom(8).hex()]
        try:
            return await client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or flushed server; another node of a Cluster
            self.sha = await client.script_load(self.source)
            return await client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


@dataclass(frozen=True)
class Scripts:
    admit: Script
    start: Script
    finish: Script
    credit: Script
    auth: Script
    claim: Script
    settle: Script
    promote: Script

    @classmethod
    def register(cls, client: aioredis.Redis) -> Scripts:
        return cls(*(Script(client, source(n), once=n in ONCE) for n in NAMES))

    async def load(self) -> None:
        """SCRIPT LOAD each once at start-up, so requests send only EVALSHA."""
        for name in NAMES:
            script: Script = getattr(self, name)
            script.sha = await script.client.script_load(script.source)


def source(name: str) -> str:
    """The Lua source Redis runs for the script `name` (what its SHA-1 is taken of)."""
    text = (HERE / f"{name}.lua").read_text()
    return (HERE / "once.lua").read_text().replace("-- BODY\n", text) if name in ONCE else text


def flat(mapping: dict[str, Any]) -> list[Any]:
    """A dict as the flat name, value, ... list HSET and our scripts take."""
    out: list[Any] = []
    for k, v in mapping.items():
        if v is not None:
            out += [k, v]
    return out
