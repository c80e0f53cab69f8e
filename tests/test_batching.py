"""The gateway's Redis client against real Redis, plain and Cluster: auto-pipelined
(`gateway/store/batching.py`) on a Cluster, one multiplexed connection
(`gateway/store/multiplexed.py`) on a plain server. Concurrent commands share round trips,
yet each gets its own reply or its own error; on a plain server, a lost connection, a
late reply and a cancelled caller too."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.batching import BATCHED
from gateway.store.multiplexed import pack
from gateway.store.redis import connect, store_trouble
from tests.conftest import RedisServer
from tests.servers import ReplyCutter


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


# -- the multiplexed connection of a plain Redis (`gateway/store/multiplexed.py`) ----------

#: a script that keeps Redis busy for 20 ms, then counts
SLOW_INCR = (
    "local t = redis.call('TIME') local stop = t[1] * 1000000 + t[2] + 20000 "
    "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop "
    "return redis.call('INCR', KEYS[1])"
)


def test_replies_of_the_multiplexed_commands_are_read_by_plain_callbacks() -> None:
    """`Multiplexed.execute_command` applies redis-py's reply callback without awaiting
    it: none of those of the commands it sends may be a coroutine."""
    callbacks = AsyncRedis().response_callbacks  # the gateway's client's
    assert not [n for n in BATCHED if inspect.iscoroutinefunction(callbacks.get(n))]


async def test_commands_issued_while_others_await_replies_share_one_connection(
    plain_redis_server: RedisServer,
) -> None:
    """Ten slow scripts issued one loop turn apart, each while the earlier ones are still
    running in Redis: all ten ride the process's one data connection (a pool would open
    a connection for each turn's batch still awaiting its reply)."""
    probe = Redis(port=plain_redis_server.port)
    client = await connect(plain_redis_server.url)
    try:
        slow = client.register_script(SLOW_INCR)
        await slow(keys=["m:slow"])  # loaded, and the data connection made
        opened = probe.info("stats")["total_connections_received"]
        calls = []
        for _ in range(10):
            calls.append(asyncio.ensure_future(slow(keys=["m:slow"])))
            await asyncio.sleep(0)
        assert sorted(await asyncio.gather(*calls)) == list(range(2, 12))
        assert probe.info("stats")["total_connections_received"] == opened
    finally:
        probe.close()
        await client.aclose()


async def test_commands_whose_replies_are_lost_with_the_connection_are_sent_again(
    plain_redis_server: RedisServer,
) -> None:
    """A connection cut with 30 commands awaiting their replies: every one is sent again
    on a new connection and gets its own reply, not a ConnectionError."""
    Redis(port=plain_redis_server.port).flushall()
    cutter = ReplyCutter(plain_redis_server.port, b"m:cut")
    async with cutter.running() as proxied:
        client = await connect(f"redis://127.0.0.1:{proxied}/0")
        try:
            await asyncio.gather(*(client.set(f"m:{i}", str(i)) for i in range(29)))
            await client.set("m:cut", "cut")
            cutter.armed = True
            keys = [f"m:{i}" for i in range(29)] + ["m:cut"]
            assert await asyncio.gather(*(client.get(k) for k in keys)) == [
                *(str(i) for i in range(29)),
                "cut",
            ]
            assert cutter.cut == 1
            assert await client.get("m:0") == "0"
        finally:
            await client.aclose()


async def test_a_reply_late_past_the_socket_timeout_fails_the_command_and_the_next_is_answered(
    plain_redis_server: RedisServer,
) -> None:
    """Redis holds every command (CLIENT PAUSE) past the client's socket timeout: the
    command fails with TimeoutError, which is store trouble (a 503, a job left for a
    retry), instead of hanging; once Redis answers again, so does the client."""
    url = f"redis://127.0.0.1:{plain_redis_server.port}/0?socket_timeout=0.1"
    client = await connect(url)
    probe = Redis(port=plain_redis_server.port)
    try:
        await client.set("m:late", "on time")
        probe.execute_command("CLIENT", "PAUSE", 800, "ALL")
        with pytest.raises(RedisTimeoutError) as raised:
            await client.get("m:late")  # then a new connection's HELLO: held too
        assert store_trouble(raised.value)
        deadline = time.monotonic() + 10
        while True:  # the pause ends
            try:
                assert await client.get("m:late") == "on time"
                break
            except RedisTimeoutError:
                assert time.monotonic() < deadline
    finally:
        probe.close()
        await client.aclose()


async def test_a_long_burst_answered_steadily_is_not_taken_for_a_dead_connection(
    plain_redis_server: RedisServer,
) -> None:
    """40 scripts of 20 ms each, sent at once with a 0.3 s socket timeout: Redis answers
    them a few at a time (it reads 16 KB of commands at a time), 0.8 s in all. The last
    waits past the timeout, but replies keep coming: nothing fails, nothing is sent
    twice."""
    url = f"redis://127.0.0.1:{plain_redis_server.port}/0?socket_timeout=0.3"
    client = await connect(url)
    try:
        slow = client.register_script(SLOW_INCR)
        await client.delete("m:burst")
        await slow(keys=["m:burst"], args=["x"])
        padding = "x" * 4096  # four commands to Redis's read
        counts = await asyncio.gather(*(slow(keys=["m:burst"], args=[padding]) for _ in range(40)))
        assert sorted(counts) == list(range(2, 42))
    finally:
        await client.aclose()


async def test_a_caller_cancelled_while_awaiting_its_reply_takes_no_other_reply(
    plain_redis_server: RedisServer,
) -> None:
    probe = Redis(port=plain_redis_server.port)
    probe.flushall()
    client = await connect(plain_redis_server.url)
    try:
        await asyncio.gather(*(client.set(f"m:{i}", str(i)) for i in range(40)))
        opened = probe.info("stats")["total_connections_received"]
        calls = [asyncio.ensure_future(client.get(f"m:{i}")) for i in range(40)]
        await asyncio.sleep(0)  # all issued: one write
        for call in calls[::2]:
            call.cancel()
        assert await asyncio.gather(*calls[1::2]) == [str(i) for i in range(1, 40, 2)]
        assert await client.get("m:0") == "0"
        # ...on the same connection: the replies stayed in step.
        assert probe.info("stats")["total_connections_received"] == opened
    finally:
        probe.close()
        await client.aclose()


async def test_a_password_and_a_database_in_the_url_are_used(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, cluster=False)
    server.start()
    Redis(port=server.port).config_set("requirepass", "s3cret")
    try:
        client = await connect(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        try:
            await client.set("m:db", "three")
            probe = Redis(port=server.port, password="s3cret", db=3)
            assert probe.get("m:db") == b"three"
            probe.close()
        finally:
            await client.aclose()
        refused = await connect(f"redis://:wrong@127.0.0.1:{server.port}/0")
        try:
            with pytest.raises(AuthenticationError):
                await refused.get("m:db")
        finally:
            await refused.aclose()
    finally:
        server.stop()


async def test_a_client_name_and_keepalive_hold_for_every_connection(any_redis_url: str) -> None:
    """`client_name` in GATEWAY_REDIS_URL names every connection the client makes, its
    multiplexed one among them; and that one has TCP keep-alive, with redis-py's own
    timings, as the pool's connections have by default."""
    client = await connect(f"{any_redis_url}?client_name=gw-test")
    try:
        assert await client.client_getname() == "gw-test"  # a pool's connection
        link = getattr(client, "multiplexer", None)
        if link is not None:  # a plain server: the one link the data commands share
            assert await link.execute(pack("CLIENT", "GETNAME")) == "gw-test"
            sock = link.link.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    finally:
        await client.aclose()


async def test_a_reply_that_is_not_utf8_fails_its_own_command_alone(
    plain_redis_server: RedisServer,
) -> None:
    probe = Redis(port=plain_redis_server.port)
    probe.set("m:bytes", b"\xff\xfe")
    probe.set("m:text", "fine")
    client = await connect(plain_redis_server.url)
    try:
        await client.get("m:text")
        opened = probe.info("stats")["total_connections_received"]
        results = await asyncio.gather(
            client.get("m:text"),
            client.get("m:bytes"),
            client.get("m:text"),
            return_exceptions=True,
        )
        assert results[0] == results[2] == "fine"
        assert isinstance(results[1], UnicodeDecodeError)
        assert probe.info("stats")["total_connections_received"] == opened  # still in step
    finally:
        probe.close()
        await client.aclose()


async def test_closing_the_client_fails_the_commands_in_flight_and_sends_none_again(
    plain_redis_server: RedisServer,
) -> None:
    probe = Redis(port=plain_redis_server.port)
    client = await connect(plain_redis_server.url)
    await client.set("m:close", "x")
    opened = probe.info("stats")["total_connections_received"]
    probe.execute_command("CLIENT", "PAUSE", 300, "ALL")
    calls = [asyncio.ensure_future(client.get("m:close")) for _ in range(5)]
    await asyncio.sleep(0)  # issued
    await client.aclose()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    assert probe.info("stats")["total_connections_received"] == opened  # none reopened
    probe.close()
