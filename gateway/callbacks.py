"""Callbacks from upstreams (Krea's `X-Webhook-URL`, flux-krea's async webhook).

Only a token the gateway handed out (`expect`) can receive a body, so nobody can plant a
result for a job; the token is 192 random bits and lives as long as a job may.

A delivery is kept in Redis (whichever process receives it, and for a worker that takes
the job over later) and announced on one pub/sub channel, so the worker waiting on it
wakes at once instead of polling. Each worker process holds one subscription; a waiter
that misses the announcement (Redis restarting, say) still finds the delivery stored, or
falls back to polling the upstream (`gateway/upstream_wait.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog

from gateway.store import keys
from gateway.store.redis import store_trouble
from gateway.timeouts import set_within

TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
CATCH_UP_BATCH = 1000
log = structlog.get_logger("gateway.callbacks")


class Waiter:
    """One job waiting upstream: woken by its callbacks (`RedisInbox`), by the sweep of
    `UpstreamWait` at its next poll or its deadline, or by a `nudge`.

    A worker holds one per job in flight, tens of thousands at once: slots, no timer, no
    task, no set; a future only while its owner sleeps."""

    __slots__ = ("delivered", "due", "heard", "tokens", "woken")

    def __init__(self, tokens: tuple[str, ...] = ()) -> None:
        self.tokens = tokens  # of the callbacks announcing the job's end (none: polled)
        self.heard = 0  # bit i set: tokens[i] has been called back
        self.delivered = False  # a callback came since the owner last looked
        self.woken: asyncio.Future[None] | None = None  # set while the owner sleeps
        self.due = math.inf  # when the sweep wakes it (on `UpstreamWait`'s clock)

    @property
    def settled(self) -> bool:
        """Every token has been called back: nothing more will come."""
        return self.heard == (1 << len(self.tokens)) - 1

    def wake(self, token: str) -> None:
        """`token` was called back."""
        if token in self.tokens:
            self.heard |= 1 << self.tokens.index(token)
            self.delivered = True
            self.nudge()

    def nudge(self) -> None:
        """Wake the owner if it sleeps (it looks at its job again)."""
        woken = self.woken
        if woken is not None and not woken.done():
            woken.set_result(None)

    def __lt__(self, other: Waiter) -> bool:
        """Any order: two heap entries due at the same instant compare their waiters."""
        return id(self) < id(other)


class RedisInbox:
    def __init__(self, redis: aioredis.Redis, base_url: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.base_url = base_url.rstrip("/")
        self.ttl_ms = int(ttl_seconds * 1000)
        # token -> its waiter (a list in the odd case of two waiting on one token)
        self.waiting: dict[str, Waiter | list[Waiter]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def url_for(self, backend: str, token: str) -> str:
        return f"{self.base_url}/v1/callbacks/{backend}/{token}"

    async def expect(self, token: str) -> None:
        await self.redis.set(keys.callback(token), "", px=self.ttl_ms)

    async def deliver(self, token: str, body: dict[str, Any]) -> bool:
        """Store a delivered body and wake its waiter; False when the token was never
        handed out (or expired)."""
        if not TOKEN.match(token):
            return False
        stored = await self.redis.set(
            keys.callback(token), orjson.dumps(body), xx=True, keepttl=True
        )
        if stored:
            await self.redis.publish(keys.CALLBACKS, token)
        return bool(stored)

    async def delivered(self, token: str) -> bool:
        """Whether the upstream has called back with `token` (an expected token holds "")."""
        return bool(await self.redis.strlen(keys.callback(token)))

    async def take(self, token: str) -> dict[str, Any] | None:
        raw = await self.redis.get(keys.callback(token))
        return orjson.loads(raw) if raw else None

    async def listen(self, waiter: Waiter) -> None:
        """Register `waiter` for its tokens, listening from now on (`forget` it after).

        Returns once the process's subscription is up (or after a few seconds without
        Redis), so a delivery after this call cannot go unheard."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())
        if not self._subscribed.is_set():
            await set_within(self._subscribed, 5.0)
        for token in waiter.tokens:
            there = self.waiting.get(token)
            if there is None:
                self.waiting[token] = waiter
            elif isinstance(there, list):
                there.append(waiter)
            elif there is not waiter:
                self.waiting[token] = [there, waiter]

    def forget(self, waiter: Waiter) -> None:
        for token in waiter.tokens:
            there = self.waiting.get(token)
            if there is waiter:
                del self.waiting[token]
            elif isinstance(there, list) and waiter in there:
                there.remove(waiter)
                if not there:
                    del self.waiting[token]

    async def check(self, waiter: Waiter) -> bool:
        """Whether a delivery came before `waiter` listened (one read per token); wakes
        it for each."""
        for token in waiter.tokens:
            if await self.delivered(token):
                waiter.wake(token)
        return waiter.delivered

    def _wake(self, token: str) -> None:
        there = self.waiting.get(token)
        if isinstance(there, list):
            for waiter in there:
                waiter.wake(token)
        elif there is not None:
            there.wake(token)

    async def _listen(self) -> None:
        """One subscription per process; back off and subscribe again when Redis goes."""
        delay = 0.5
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.CALLBACKS)
                await pubsub.get_message(timeout=5.0)  # the subscription's confirmation
                self._subscribed.set()
                await self._catch_up()
                delay = 0.5
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
                    if message is None:
                        continue
                    self._wake(message["data"])
            except Exception as exc:
                self._subscribed.clear()
                if not store_trouble(exc):
                    log.exception("callback listener failed")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _catch_up(self) -> None:
        """Deliveries announced while the subscription was down went unheard: look each
        waiting token up (pipelined, a thousand a round trip: a worker may hold
        thousands)."""
        tokens = list(self.waiting)
        for start in range(0, len(tokens), CATCH_UP_BATCH):
            batch = tokens[start : start + CATCH_UP_BATCH]
            async with self.redis.pipeline(transaction=False) as pipe:
                for token in batch:
                    pipe.strlen(keys.callback(token))
                lengths = await pipe.execute()
            for token, length in zip(batch, lengths, strict=True):
                if length:  # an expected token holds ""
                    self._wake(token)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
