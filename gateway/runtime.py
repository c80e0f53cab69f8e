"""Everything a gateway or worker process owns, built once from `Settings` and closed
in order: the Redis client and scripts, the upstream HTTP clients, the backends, the
router, the artifact store, the queue, the job store, the service and the worker.
`gateway serve` and `gateway worker` share it.

With `gateway/app.py` (the web application) and `gateway/cli.py` (the commands), this is
the composition root: the only modules that wire the parts together. The parts below it
import none of them, and the domain never imports the GraphQL layer (`schema/`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import NoPermissionError, ResponseError

from gateway.artifacts import ArtifactStore, LocalArtifactStore
from gateway.cache import Cache
from gateway.callbacks import RedisInbox
from gateway.config import Settings
from gateway.events import Events
from gateway.job_watch import JobWatch
from gateway.jobs.queue import Queue
from gateway.jobs.store import JobStore
from gateway.jobs.worker import Worker
from gateway.providers import build_providers
from gateway.providers.http import UpstreamClient
from gateway.routing import Router
from gateway.service import Gateway
from gateway.store import shards
from gateway.store.persisted import PersistedQueries
from gateway.store.redis import RefusedRedis, Scripts, connect
from gateway.urlguard import Lookups
from gateway.webhooks import Webhooks
from gateway.webhooks import session as webhook_session

#: The only `maxmemory-policy` under which Redis never drops a key to make room. Every
#: other one may evict balances, ledgers or job records: `allkeys-*` any key, and the
#: `volatile-*` ones every key with a TTL, which job records, cache entries and
#: idempotency keys all have (a job would vanish before its retention).
SAFE_POLICY = "noeviction"


class EvictingRedis(RefusedRedis):
    """The Redis (or one node of the Cluster) may evict keys: the gateway refuses it."""


async def check_eviction_policy(redis: aioredis.Redis) -> None:
    """Refuse a Redis whose `maxmemory-policy` can evict keys (docs/api.md#redis): raise
    `EvictingRedis` naming the policy and the node. On a Cluster every node the client
    knows is asked (a replica becomes a primary on failover). A server that refuses
    CONFIG GET (managed Redis, an ACL, a renamed command) is read through INFO's memory
    section, which says the same; one that refuses both cannot be checked: a warning is
    logged and start-up goes on."""
    log = structlog.get_logger("gateway")
    get_nodes = getattr(redis, "get_nodes", None)
    targets: list[tuple[str, dict[str, Any]]] = []
    if callable(get_nodes):  # a Redis Cluster client: learn its nodes first
        await redis.initialize()
        targets = [(str(node.name), {"target_nodes": node}) for node in get_nodes()]
    else:
        kwargs = getattr(getattr(redis, "connection_pool", None), "connection_kwargs", {})
        targets = [(f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}", {})]
    for name, extra in targets:
        try:
            policy = await _policy(redis, extra)
        except (NoPermissionError, ResponseError) as exc:
            log.warning(
                "cannot read Redis maxmemory-policy: make sure it is noeviction",
                node=name,
                error=str(exc),
            )
            continue
        if policy != SAFE_POLICY:
            raise EvictingRedis(
                f"Redis at {name} has maxmemory-policy {policy}: it may evict keys "
                f"(balances, ledgers, job records) when full. Set maxmemory-policy "
                f"{SAFE_POLICY} (redis-server --maxmemory-policy {SAFE_POLICY}, or "
                f"CONFIG SET maxmemory-policy {SAFE_POLICY}) and start again."
            )


async def _policy(redis: aioredis.Redis, extra: dict[str, Any]) -> str:
    """The node's `maxmemory-policy`: CONFIG GET's, else (refused, as managed services
    do, or answered empty, as a proxy may) INFO memory's `maxmemory_policy`; a
    ResponseError when neither tells."""
    try:
        reply = await redis.execute_command("CONFIG", "GET", "maxmemory-policy", **extra)
    except (NoPermissionError, ResponseError):
        reply = None
    if said := _policy_of(reply):
        return said
    info = await redis.execute_command("INFO", "memory", **extra)
    policy = info.get("maxmemory_policy") if isinstance(info, dict) else None
    if not policy:  # an old server, or a proxy answering INFO itself
        raise ResponseError("neither CONFIG GET nor INFO tells maxmemory-policy")
    return str(policy)


def _policy_of(reply: Any) -> str:
    """The value of CONFIG GET maxmemory-policy, as a dict or a flat list."""
    if isinstance(reply, dict):
        value = reply.get("maxmemory-policy", "")
    elif isinstance(reply, list | tuple) and len(reply) >= 2:
        value = reply[1]
    else:
        value = ""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Runtime:
    gateway: Gateway
    worker: Worker
    persisted: PersistedQueries  # APQ documents (`schema/persisted.py` serves the protocol)


@contextlib.asynccontextmanager
async def runtime(
    settings: Settings, clock: Callable[[], float] = time.time
) -> AsyncIterator[Runtime]:
    """Build the parts in order, each given what it needs when it is made; close what
    was opened, last first, when the block ends or when building fails part way (the
    error that stopped it is the one raised)."""
    async with contextlib.AsyncExitStack() as opened:
        redis = await connect(settings.redis_url)
        opened.push_async_callback(redis.aclose)
        if settings.redis_url:  # the embedded store is this process's alone
            await check_eviction_policy(redis)
            await shards.at_start(redis, settings.redis_shards)
        client = UpstreamClient(settings.upstream_timeout, allow=settings.allow_cidrs)
        opened.push_async_callback(client.aclose)
        hooks = webhook_session(settings)
        opened.push_async_callback(hooks.close)
        scripts = Scripts.register(redis)
        await scripts.load()
        # Upstreams call back only where they can reach us: `callback_url`, when set.
        inbox = RedisInbox(
            redis, settings.callback_url or settings.base_url, settings.job_deadline_seconds
        )
        opened.push_async_callback(inbox.aclose)
        callbacks = inbox if settings.callback_url else None
        router = Router(
            build_providers(settings, client, callbacks),
            settings.routes,
            dev=settings.dev,
            backend_concurrency=settings.backend_concurrency,
            poll_interval=settings.poll_interval,
            inbox=callbacks,
            callback_fallback=settings.callback_fallback_seconds,
            threshold=settings.breaker_threshold,
            cooldown=settings.breaker_cooldown_seconds,
        )
        queue = Queue(
            redis, scripts, blocking=settings.redis_url is not None, shards=settings.redis_shards
        )
        await queue.ensure_group()
        artifacts: ArtifactStore
        if settings.storage_url:
            from gateway.artifacts_s3 import open_s3  # botocore loaded only where it is used

            artifacts = await opened.enter_async_context(open_s3(settings))
        else:
            artifacts = LocalArtifactStore(settings.storage_dir, settings.base_url)
        store = JobStore(redis, scripts, settings.retention_days, settings.ledger_keep_ms)
        events = Events(redis, store)
        watch = JobWatch(redis, store)
        opened.push_async_callback(watch.aclose)
        cache = Cache(redis, scripts, settings)
        lookups = Lookups()  # user-supplied URLs' names, bounded for the whole process
        webhooks = Webhooks(
            redis=redis,
            scripts=scripts,
            store=store,
            client=hooks,
            settings=settings,
            clock=clock,
            lookups=lookups,
        )
        gateway = Gateway(
            settings=settings,
            redis=redis,
            scripts=scripts,
            router=router,
            artifacts=artifacts,
            queue=queue,
            store=store,
            events=events,
            cache=cache,
            webhooks=webhooks,
            inbox=inbox,
            watch=watch,
            lookups=lookups,
            clock=clock,
        )
        worker = Worker(
            settings=settings,
            store=store,
            queue=queue,
            router=router,
            artifacts=artifacts,
            events=events,
            webhooks=webhooks,
            cache=cache,
            consumer=f"{socket.gethostname()}-{os.getpid()}-{id(queue):x}",
            clock=clock,
            # the embedded store is this process's alone: no other can raise its count
            keyspace=(
                functools.partial(shards.still_enough, redis, settings.redis_shards)
                if settings.redis_url
                else None
            ),
        )
        persisted = PersistedQueries(
            scripts,
            max_documents=settings.apq_max_documents,
            max_document_bytes=settings.apq_max_document_bytes,
        )
        yield Runtime(gateway, worker, persisted)


@contextlib.asynccontextmanager
async def running_worker(worker: Worker, grace: float) -> AsyncIterator[asyncio.Event]:
    """Run the worker loop in the background until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, grace=grace))
    try:
        yield stop
    finally:
        stop.set()
        await task
