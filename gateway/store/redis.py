"""The Redis connection (a real server, or the embedded fakeredis store) and the scripts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

HERE = Path(__file__).parent
NAMES = ("admit", "start", "finish", "credit", "auth", "claim", "settle", "promote")


def connect(redis_url: str | None) -> aioredis.Redis:
    """A client for `redis_url`, or the embedded store when it is unset.

    The embedded store (fakeredis with Lua) lives inside one process: fine for
    `make run`, never for several processes.
    """
    if redis_url:
        return aioredis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=10,
            health_check_interval=15,
            retry_on_timeout=True,
        )
    import fakeredis  # only the embedded store needs it

    return fakeredis.FakeAsyncRedis(decode_responses=True)


@dataclass(frozen=True)
class Scripts:
    admit: AsyncScript
    start: AsyncScript
    finish: AsyncScript
    credit: AsyncScript
    auth: AsyncScript
    claim: AsyncScript
    settle: AsyncScript
    promote: AsyncScript

    @classmethod
    def register(cls, client: aioredis.Redis) -> Scripts:
        def load(name: str) -> AsyncScript:
            return client.register_script((HERE / f"{name}.lua").read_text())

        return cls(*(load(n) for n in NAMES))

    async def load(self) -> None:
        """SCRIPT LOAD each once at start-up, so requests send only EVALSHA."""
        for name in NAMES:
            script = getattr(self, name)
            script.sha = await script.registered_client.script_load(script.script)


def flat(mapping: dict[str, Any]) -> list[Any]:
    """A dict as the flat name, value, ... list HSET and our scripts take."""
    out: list[Any] = []
    for k, v in mapping.items():
        if v is not None:
            out += [k, v]
    return out
