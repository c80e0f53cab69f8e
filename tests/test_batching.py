"""Auto-pipelining (`gateway/store/batching.py`) against real Redis, plain and Cluster:
concurrent commands share round trips, yet each gets its own reply or its own error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ResponseError

from gateway.store.redis import connect


@pytest.fixture
async def client(any_redis_url: str) -> AsyncIterator[Any]:
    """The gateway's own client (`connect`), on plain Redis and on the Cluster node."""
    made = await connect(any_redis_url)
    try:
        yield made
    finally:
        await made.aclose()


async def connections_opened(url: str) -> int:
    probe = await connect(url)
    try:
        return int((await probe.info("stats"))["total_connections_received"])
    finally:
        await probe.aclose()


async def test_concurrent_commands_share_connections_and_keep_their_own_replies(
    client: Any, any_redis_url: str
) -> None:
    await client.set("b:warm", "1")  # the pool's first connection
    before = await connections_opened(any_redis_url)
    await asyncio.gather(*(client.set(f"b:k{i}", str(i)) for i in range(300)))
    replies = await asyncio.gather(*(client.get(f"b:k{i}") for i in range(300)))
    assert replies == [str(i) for i in range(300)]
    # 600 commands issued at once went out in a few pipelines, not on 300 connections
    # (the probes above and below open one each).
    assert await connections_opened(any_redis_url) - before <= 5


async def test_a_failing_command_fails_alone_in_its_batch(client: Any) -> None:
    await client.set("b:string", "x")
    await client.hset("b:hash", mapping={"f": "v"})
    results = await asyncio.gather(
        client.hgetall("b:hash"),
        client.hgetall("b:string"),
        client.get("b:string"),
        return_exceptions=True,
    )
    assert results[0] == {"f": "v"}  # the reply callback still makes a dict
    assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
    assert results[2] == "x"


async def test_scripts_flushed_from_the_server_are_loaded_again_by_a_batch(client: Any) -> None:
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    await script(keys=["b:{n}:counter"])
    await client.execute_command("SCRIPT FLUSH")  # e.g. a restarted Redis
    counts = await asyncio.gather(*(script(keys=["b:{n}:counter"]) for _ in range(50)))
    assert sorted(counts) == list(range(2, 52))


async def test_a_caller_cancelled_while_its_batch_forms_fails_nobody_else(client: Any) -> None:
    await client.set("b:c", "kept")
    first = asyncio.ensure_future(client.get("b:c"))  # collects this turn's batch
    others = [asyncio.ensure_future(client.get("b:c")) for _ in range(20)]
    await asyncio.sleep(0)
    first.cancel()
    assert await asyncio.gather(*others) == ["kept"] * 20
    with pytest.raises(asyncio.CancelledError):
        await first
