"""Clients too slow to send their request (Slowloris) do not hold a connection for ever
(gateway/client_deadlines.py); slow but steady ones, kept-alive connections and
WebSockets are not cut."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import websockets

from tests.harness import Harness, gateway

TIMEOUT = 0.5  # GATEWAY_CLIENT_TIMEOUT_SECONDS in these tests
BOUND = 10.0  # how long a test waits for the server to act, at most


@contextlib.asynccontextmanager
async def connection(
    gw: Harness,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    url = urlsplit(gw.base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """`data` a byte at a time, `every` seconds apart, until the server hangs up."""
    with contextlib.suppress(OSError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every)


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer on a kept-alive connection: its head (its body read past)."""
    head = await reader.readuntil(b"\r\n\r\n")
    (length,) = (
        int(line.partition(b":")[2]) for line in head.lower().split(b"\r\n") if b"length:" in line
    )
    await reader.readexactly(length)
    return head


async def test_a_connection_that_sends_nothing_is_closed(redis_url: str, storage_dir: Path) -> None:
    async with (
        gateway(redis_url, storage_dir, client_timeout_seconds=TIMEOUT) as gw,
        connection(gw) as (reader, _),
    ):
        assert await asyncio.wait_for(reader.read(), BOUND) == b""  # closed, nothing said


async def test_headers_sent_a_byte_at_a_time_are_refused_with_408(
    redis_url: str, storage_dir: Path
) -> None:
    """Each byte comes well within the timeout, but the head never ends: the deadline
    holds from its first byte, so the server answers 408 and hangs up."""
    head = b"POST /v1/text_to_image HTTP/1.1\r\nHost: gw\r\n" + b"X-Slow: a\r\n" * 1000
    async with (
        gateway(redis_url, storage_dir, client_timeout_seconds=TIMEOUT) as gw,
        connection(gw) as (reader, writer),
    ):
        sender = asyncio.create_task(trickle(writer, head, TIMEOUT / 10))
        answer = await asyncio.wait_for(reader.read(), BOUND)
        sender.cancel()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        status, _, body = answer.partition(b"\r\n\r\n")
        assert b"connection: close" in status.lower()
        assert json.loads(body)["error"]["code"] == "REQUEST_TIMEOUT"


async def test_a_body_that_stops_halfway_closes_the_connection(
    redis_url: str, storage_dir: Path
) -> None:
    """Nothing is admitted from a body that never ends, and its connection is let go."""
    async with (
        gateway(redis_url, storage_dir, client_timeout_seconds=TIMEOUT) as gw,
        connection(gw) as (reader, writer),
    ):
        key = await gw.key()
        writer.write(
            b"POST /v1/text_to_image HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b'Authorization: Bearer %b\r\nContent-Length: 100\r\n\r\n{"service": ' % key.encode()
        )
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), BOUND) == b""
        assert (await gw.gql("{ jobs(first: 5) { nodes { id } } }", key=key)).json()["data"][
            "jobs"
        ]["nodes"] == []


async def test_slow_but_steady_clients_kept_alive_connections_and_websockets_stay(
    redis_url: str, storage_dir: Path
) -> None:
    """A head sent in pieces, each within the timeout, whole before it, is answered; a
    kept-alive connection quiet for longer than the timeout between requests (uvicorn's
    keep-alive governs it) serves the next one; a WebSocket quiet that long stays open."""
    request = b"GET /v1/jobs/0123456789abcdef01234567 HTTP/1.1\r\nHost: gw\r\nX-API-Key: %b\r\n\r\n"
    async with (
        gateway(redis_url, storage_dir, client_timeout_seconds=TIMEOUT) as gw,
        connection(gw) as (reader, writer),
    ):
        key = await gw.key()
        whole = request % key.encode()
        for piece in (whole[:20], whole[20:40], whole[40:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(TIMEOUT / 5)
        assert (await asyncio.wait_for(answer(reader), BOUND)).startswith(b"HTTP/1.1 404 ")
        await asyncio.sleep(TIMEOUT * 2)  # quiet between requests for longer than the timeout
        writer.write(whole)
        await writer.drain()
        assert (await asyncio.wait_for(answer(reader), BOUND)).startswith(b"HTTP/1.1 404 ")

        url = gw.base.replace("http://", "ws://") + "/graphql"
        async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            await ws.send(
                json.dumps(
                    {"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}
                )
            )
            assert json.loads(await asyncio.wait_for(ws.recv(), BOUND))["type"] == "connection_ack"
            await asyncio.sleep(TIMEOUT * 2)  # quiet for longer than the timeout
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), BOUND))["type"] == "pong"
