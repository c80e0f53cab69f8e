"""Callbacks from upstreams (flux-krea's async webhook) kept in Redis until polled.

Only a token the gateway handed out (`expect`) can receive a body, so nobody can plant a
result for a job; the token is 192 random bits and lives as long as a job may.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import redis.asyncio as aioredis

from gateway.store import keys

TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class RedisInbox:
    def __init__(self, redis: aioredis.Redis, base_url: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.base_url = base_url.rstrip("/")
        self.ttl_ms = int(ttl_seconds * 1000)

    def url_for(self, backend: str, token: str) -> str:
        return f"{self.base_url}/v1/callbacks/{backend}/{token}"

    async def expect(self, token: str) -> None:
        await self.redis.set(keys.callback(token), "", px=self.ttl_ms)

    async def deliver(self, token: str, body: dict[str, Any]) -> bool:
        """Store a delivered body; False when the token was never handed out (or expired)."""
        if not TOKEN.match(token):
            return False
        stored = await self.redis.set(
            keys.callback(token), orjson.dumps(body), xx=True, keepttl=True
        )
        return bool(stored)

    async def take(self, token: str) -> dict[str, Any] | None:
        raw = await self.redis.get(keys.callback(token))
        return orjson.loads(raw) if raw else None
