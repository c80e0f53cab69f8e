"""Job records as the tests read and change them: one JSON object a key
(gateway/store/record.lua), its id and account being the key's."""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis


async def record(redis: aioredis.Redis, key: str) -> dict[str, Any]:
    """The stored record ({} when there is none)."""
    raw = await redis.get(key)
    return orjson.loads(raw) if raw else {}


async def records(redis: aioredis.Redis, keys: list[str]) -> list[dict[str, Any]]:
    return [orjson.loads(raw) if raw else {} for raw in await redis.mget(keys)] if keys else []


async def change(redis: aioredis.Redis, key: str, **fields: Any) -> None:
    """Overwrite fields of a stored record (as a corrupted or an old one would hold them)."""
    stored = await record(redis, key)
    await redis.set(key, orjson.dumps({**stored, **fields}), keepttl=True)
