"""Waiting for jobs, cheaply: one pub/sub connection per process for every waiter.

A request that answers when its job ends (OpenAI's images API, `Prefer: wait`, the
providers' synchronous routes; docs/api.md#waiting) waits here (`until_ended`), and so
does every open stream of a job's updates (`follow`: GraphQL's `jobUpdates`, REST's
Server-Sent Events). Each subscribes to its job's update channel (`keys.events`, what
workers publish to) on the process's one shared `PubSub`, so a thousand waiting requests
or open streams hold a thousand futures and one Redis connection, not a thousand
connections taken from the pool every other request needs.

A message only says when to look; the job record says what is true. A waiter reads the
record after subscribing (so no end falls in between) and whenever a message comes, and
also every `recheck` seconds without one, so a message lost while Redis was away cannot
leave it waiting past the job's end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import PubSub

from gateway.jobs.model import Job
from gateway.jobs.store import JobStore
from gateway.store import keys
from gateway.store.redis import store_trouble

log = structlog.get_logger("gateway.job_watch")


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class JobWatch:
    def __init__(self, redis: aioredis.Redis, store: JobStore, recheck: float = 10.0) -> None:
        self.redis = redis
        self.store = store
        self.recheck = recheck
        self.waiting: dict[str, set[asyncio.Future[None]]] = {}  # channel -> its waiters
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one SUBSCRIBE or UNSUBSCRIBE at a time
        self._active = asyncio.Event()  # some channel is waited on

    async def until_ended(self, account: str, job_id: str, timeout: float) -> Job | None:
        """The job once it has ended, or as it stands when `timeout` seconds have passed
        (None: no such job)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        channel = keys.events(account, job_id)
        woken: asyncio.Future[None] = loop.create_future()
        await self._subscribe(channel, woken)
        try:
            while True:
                job = await self.store.get(account, job_id)
                left = deadline - loop.time()
                if job is None or job.ended or left <= 0:
                    return job
                woken = await self._next(channel, woken, min(left, self.recheck))
        finally:
            await self._unsubscribe(channel, woken)

    async def follow(
        self, account: str, job_id: str, read: Callable[[], Awaitable[Job | None]]
    ) -> AsyncIterator[Job]:
        """The job's current state, then each change, ending with its terminal state.
        `read` reads the record (the follower's credential checked with it:
        `Gateway.follow`); its errors end the stream. Subscribed before the first read,
        so no change falls in between; read again at each message and every `recheck`
        seconds without one."""
        channel = keys.events(account, job_id)
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._subscribe(channel, woken)
        try:
            job = await read()
            if job is None:
                return
            shown = job.public()
            yield job
            while not job.ended:
                woken = await self._next(channel, woken, self.recheck)
                fresh = await read()
                if fresh is None:
                    return
                if fresh.public() != shown:  # any change its follower can see
                    job, shown = fresh, fresh.public()
                    yield job
        finally:
            await self._unsubscribe(channel, woken)

    async def _next(
        self, channel: str, woken: asyncio.Future[None], seconds: float
    ) -> asyncio.Future[None]:
        """Until a message on `channel` wakes `woken`, or `seconds` pass (a timer and a
        future, not `wait_for`'s task: thousands wait at once); then the future to wait
        on next, in `woken`'s place among the channel's waiters."""
        timer = asyncio.get_running_loop().call_later(seconds, _wake, woken)
        try:
            await woken
        finally:
            timer.cancel()
        fresh: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self.waiting[channel]
        waiters.discard(woken)
        waiters.add(fresh)
        return fresh

    async def _subscribe(self, channel: str, woken: asyncio.Future[None]) -> None:
        async with self._lock:  # a second waiter of a channel waits for its SUBSCRIBE
            waiters = self.waiting.setdefault(channel, set())
            waiters.add(woken)
            if len(waiters) > 1:
                return
            if self._pubsub is None:
                self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            with contextlib.suppress(Exception):  # Redis away: the recheck still looks
                await self._pubsub.subscribe(channel)
            self._active.set()
            if self._listener is None or self._listener.done():
                self._listener = asyncio.create_task(self._listen())

    async def _unsubscribe(self, channel: str, woken: asyncio.Future[None]) -> None:
        async with self._lock:
            waiters = self.waiting.get(channel)
            if waiters is None:
                return
            waiters.discard(woken)
            if waiters:
                return
            del self.waiting[channel]
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(channel)

    async def _listen(self) -> None:
        """Wake the waiters of each channel a message comes on; on trouble, back off and
        subscribe again to every channel still waited on (and wake them all to look)."""
        delay = 0.5
        while True:
            if not self.waiting:
                self._active.clear()
                await self._active.wait()
            pubsub = self._pubsub
            try:
                if pubsub is None or not pubsub.subscribed:
                    raise ConnectionError("not subscribed")
                message = await pubsub.get_message(timeout=5.0)
                delay = 0.5
                if message is not None:
                    for woken in self.waiting.get(message["channel"], ()):
                        _wake(woken)
            except Exception as exc:
                if not store_trouble(exc) and not isinstance(exc, OSError):
                    log.exception("job watch listener failed")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                await self._resubscribe(pubsub)

    async def _resubscribe(self, broken: PubSub | None) -> None:
        async with self._lock:
            if broken is not None:
                with contextlib.suppress(Exception):
                    await broken.aclose()
            self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            with contextlib.suppress(Exception):
                if self.waiting:
                    await self._pubsub.subscribe(*self.waiting)
            for waiters in self.waiting.values():  # an end may have gone unheard
                for woken in waiters:
                    _wake(woken)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None
