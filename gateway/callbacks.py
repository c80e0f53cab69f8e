"""Callbacks from upstreams (Krea's `X-Webhook-URL`, flux-krea's async webhook).

Only a token the gateway handed out (`expect`) can receive a body, so nobody can plant a
result for a job; the token is 192 random bits and lives as long as a job may.

A delivery is kept in Redis (whichever process receives it, and for a worker that takes
the job over later) and announced on one pub/sub channel, so the worker waiting on it
wakes at once instead of polling. Each worker process holds one subscription; a waiter
that misses the announcement (Redis restarting, say) still finds the delivery stored, or
falls back to polling the upstream at its own pace (`Router`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog

from gateway.store import keys
from gateway.store.redis import store_trouble

TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
log = structlog.get_logger("gateway.callbacks")


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Waiter:
    """Wakes when one of its tokens is delivered. Made by `RedisInbox.waiter`."""

    def __init__(self, inbox: RedisInbox, tokens: list[str]) -> None:
        self.inbox = inbox
        self.tokens = tokens
        self.heard: set[str] = set()  # the tokens called back so far
        self.delivered = False  # a callback came since the waiter's owner last looked
        self._woken: asyncio.Future[None] | None = None

    async def check(self) -> bool:
        """Whether a delivery came before this waiter listened (one read per token)."""
        for token in self.tokens:
            if await self.inbox.delivered(token):
                self.wake(token)
        return self.delivered

    @property
    def settled(self) -> bool:
        """Every token has been called back: nothing more will come."""
        return self.heard.issuperset(self.tokens)

    async def wait(self, timeout: float) -> bool:
        """Until delivered or `timeout`. A timer and a future, not `wait_for`'s task:
        thousands of jobs wait at once."""
        if self.delivered:
            return True
        loop = asyncio.get_running_loop()
        woken = self._woken = loop.create_future()
        timer = loop.call_later(timeout, _wake, woken)
        try:
            await woken
        finally:
            timer.cancel()
            self._woken = None
        return self.delivered

    def wake(self, token: str) -> None:
        self.heard.add(token)
        self.delivered = True
        if self._woken is not None:
            _wake(self._woken)

    def nudge(self) -> None:
        """Wake the owner with nothing delivered (it looks at its job again)."""
        if self._woken is not None:
            _wake(self._woken)

    def close(self) -> None:
        for token in self.tokens:
            waiters = self.inbox.waiting.get(token)
            if waiters is not None:
                waiters.discard(self)
                if not waiters:
                    del self.inbox.waiting[token]


class RedisInbox:
    def __init__(self, redis: aioredis.Redis, base_url: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.base_url = base_url.rstrip("/")
        self.ttl_ms = int(ttl_seconds * 1000)
        self.waiting: dict[str, set[Waiter]] = {}
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

    async def waiter(self, tokens: list[str]) -> Waiter:
        """A waiter registered for `tokens`, listening from now on (`close` it after).

        Returns once the process's subscription is up (or after a few seconds without
        Redis), so a delivery after this call cannot go unheard."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 5.0)
        waiter = Waiter(self, tokens)
        for token in tokens:
            self.waiting.setdefault(token, set()).add(waiter)
        return waiter

    async def _listen(self) -> None:
        """One subscription per process; back off and subscribe again when Redis goes."""
        delay = 0.5
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.CALLBACKS)
                await pubsub.get_message(timeout=5.0)  # the subscription's confirmation
                self._subscribed.set()
                # Deliveries announced while the subscription was down went unheard.
                for token, waiters in list(self.waiting.items()):
                    if await self.delivered(token):
                        for waiter in waiters:
                            waiter.wake(token)
                delay = 0.5
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
                    if message is None:
                        continue
                    token = message["data"]
                    for waiter in self.waiting.get(token, ()):
                        waiter.wake(token)
            except Exception as exc:
                self._subscribed.clear()
                if not store_trouble(exc):
                    log.exception("callback listener failed")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
