"""Everything a gateway or worker process owns, built once from `Settings` and closed
in order: the Redis client and scripts, the upstream HTTP client, the backends, the
router, the artifact store and the queue. `gateway serve` and `gateway worker` share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx

from gateway.artifacts import LocalArtifactStore
from gateway.callbacks import RedisInbox
from gateway.config import Settings
from gateway.jobs.queue import Queue
from gateway.jobs.worker import Worker
from gateway.providers import build_providers
from gateway.providers.http import UpstreamClient
from gateway.routing import Router
from gateway.service import Gateway
from gateway.store.redis import Scripts, connect
from gateway.webhooks import Webhooks


@dataclass
class Runtime:
    gateway: Gateway
    worker: Worker


@contextlib.asynccontextmanager
async def runtime(
    settings: Settings, clock: Callable[[], float] = time.time
) -> AsyncIterator[Runtime]:
    redis = await connect(settings.redis_url)
    client = UpstreamClient(settings.upstream_timeout)
    # Webhooks pin the address they checked (httpcore's SNI extension): plain httpx.
    hooks = httpx.AsyncClient(timeout=settings.webhook_timeout, follow_redirects=False)
    try:
        scripts = Scripts.register(redis)
        await scripts.load()
        # Upstreams can call us back only at a URL they can reach: the public one.
        inbox = RedisInbox(redis, settings.base_url, settings.job_deadline_seconds)
        router = Router(
            build_providers(settings, client, inbox if settings.public_url else None),
            settings.routes,
            dev=settings.dev,
            backend_concurrency=settings.backend_concurrency,
            poll_interval=settings.poll_interval,
            inbox=inbox if settings.public_url else None,
            callback_fallback=settings.callback_fallback_seconds,
            threshold=settings.breaker_threshold,
            cooldown=settings.breaker_cooldown_seconds,
        )
        queue = Queue(redis, blocking=settings.redis_url is not None, shards=settings.redis_shards)
        await queue.ensure_group()
        artifacts = LocalArtifactStore(settings.storage_dir, settings.base_url)
        gateway = Gateway(
            settings=settings,
            redis=redis,
            scripts=scripts,
            router=router,
            artifacts=artifacts,
            queue=queue,
            clock=clock,
        )
        webhooks = Webhooks(
            redis=redis,
            scripts=scripts,
            store=gateway.store,
            client=hooks,
            settings=settings,
            clock=clock,
        )
        gateway.webhooks = webhooks
        gateway.inbox = inbox
        worker = Worker(
            settings=settings,
            store=gateway.store,
            queue=queue,
            router=router,
            artifacts=artifacts,
            events=gateway.events,
            webhooks=webhooks,
            cache=gateway.cache,
            consumer=f"{socket.gethostname()}-{os.getpid()}-{id(queue):x}",
            clock=clock,
        )
        yield Runtime(gateway, worker)
    finally:
        await inbox.aclose()
        await client.aclose()
        await hooks.aclose()
        await redis.aclose()


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
